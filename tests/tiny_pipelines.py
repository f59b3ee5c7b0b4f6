"""Tiny SD1-like and SDXL-like diffusers pipelines (seeded random weights, no downloads).

The UNets and CLIPs are tiny_models'; text widths add up to the UNet's cross-attention
width as in the real families (768; 768 + 1280 for SDXL). The tokenizer is a CLIP BPE
tokenizer over single letters written to a temporary folder. Also: the pipeline's
weights as an LDM checkpoint state dict (through loha.keys' own targets and renaming),
and back.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

import tiny_models as T
from loha import keys
from loha.keys.text import TEXT_PARTS

MAX_TOKENS = 16  # tiny_models' CLIPs have 16 positions
PROMPT = "a photo of a cat"


def tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    with tempfile.TemporaryDirectory(prefix="loha-test-tokenizer-") as folder:  # read once, at construction
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                             model_max_length=MAX_TOKENS, pad_token="!")


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                         layers_per_block=1).eval()


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing", clip_sample=False,
                         set_alpha_to_one=False)


def sd1_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae(seed), text_encoder=T.clip_text(hidden=768, seed=seed + 1),
                                   tokenizer=tokenizer(), unet=T.sd1_unet(seed), scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae(seed), text_encoder=T.clip_text(hidden=768, seed=seed + 1),
        text_encoder_2=T.clip_text(hidden=1280, seed=seed + 2, projection=True),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=T.sdxl_unet(seed), scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINES = {"sd1": sd1_pipeline, "sdxl": sdxl_pipeline}


def parts(pipe) -> dict:
    """{"unet": …, "text_encoder": …[, "text_encoder_2": …]} of a pipeline (or such a dict itself)."""
    if isinstance(pipe, dict):
        return pipe
    return {k: getattr(pipe, k) for k in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, k, None) is not None}


def run(pipe, seed: int = 0) -> torch.Tensor:
    """Latents after one denoising step (classifier-free guidance on, so both prompts count)."""
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=1, height=8, width=8, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images


def weights(pipe) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer of the patchable parts."""
    return {f"{p}.{k}": v.detach().clone() for p, m in parts(pipe).items() for k, v in m.state_dict().items()}


def assert_weights_equal(expected: dict, pipe) -> None:
    now = weights(pipe)
    assert expected.keys() == now.keys()
    for key in expected:
        assert torch.equal(expected[key], now[key]), key


# --------------------------------------------------------------------------- LDM layout

# Where each text encoder lives in an LDM checkpoint: (prefix, OpenCLIP layout).
LDM_TEXT = {
    "sd1": {"te1": ("cond_stage_model.transformer.text_model.", False)},
    "sdxl": {"te1": ("conditioner.embedders.0.transformer.text_model.", False),
             "te2": ("conditioner.embedders.1.model.transformer.", True)},
}
LDM_UNET = "model.diffusion_model."


def _ldm_places(pipe) -> list[tuple]:
    """(target, LDM key, rows) for every patchable weight of the pipeline, from loha.keys' targets."""
    names = keys.map_modules(parts(pipe))
    unet_keys = keys.unet_key_map((f"{t.path}.weight" for t in names.targets if t.component == "unet"), from_ldm=False)
    places = []
    for target in names.targets:
        if target.component == "unet":
            places.append((target, LDM_UNET + unet_keys[f"{target.path}.weight"], None))
            continue
        prefix, openclip = LDM_TEXT[names.family][target.component]
        if not openclip:
            places.append((target, f"{prefix}{target.path}.weight", None))
            continue
        layer, part = target.path.removeprefix("encoder.layers.").split(".", 1)
        param, third = TEXT_PARTS[part]
        width = target.shape[0]
        rows = None if third is None else (third * width, (third + 1) * width)
        places.append((target, f"{prefix}resblocks.{layer}.{param}", rows))
    return places


def _live(pipe, target) -> torch.Tensor:
    attr, _, path = target.key.partition(".")
    return parts(pipe)[attr].get_parameter(path).data


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's (or parts') patchable weights as an LDM checkpoint holds them (OpenCLIP q/k/v fused)."""
    state: dict[str, list] = {}
    for target, key, rows in _ldm_places(pipe):
        state.setdefault(key, []).append((rows[0] if rows else 0, _live(pipe, target).clone()))
    return {key: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])]) for key, pieces in state.items()}


def load_ldm_state_dict(pipe, state: dict[str, torch.Tensor]) -> None:
    """Copy an LDM state dict made by `ldm_state_dict` back into the pipeline."""
    for target, key, rows in _ldm_places(pipe):
        value = state[key] if rows is None else state[key][rows[0] : rows[1]]
        _live(pipe, target).copy_(value)
