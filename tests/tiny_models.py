"""Small real models with seeded random weights, and LoHa files made by lycoris-lora.

The UNets keep the real families' cross-attention widths (768 for SD1, 2048 for SDXL)
and two res blocks per level, so names, family detection and the LDM layout behave
as on full-size models, while channels stay tiny.
"""

from __future__ import annotations

import copy
import logging

import torch

from loha.models.configs import PUBLISHED


def sd1_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


#: SDXL's UNet (blocks, transformer depths, added conditions) at tiny widths;
#: `bench/apply.py --tiny` checks itself on it too.
SDXL_UNET = dict(
    PUBLISHED["sdxl"]["unet"],
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=8,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=8,
)


def sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SDXL_UNET).eval()


def clip_text(hidden: int = 32, layers: int = 2, seed: int = 0, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=32,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        max_position_embeddings=16,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def sd1_parts(seed: int = 0) -> dict:
    return {"unet": sd1_unet(seed), "text_encoder": clip_text(seed=seed + 1)}


def sdxl_parts(seed: int = 0) -> dict:
    return {
        "unet": sdxl_unet(seed),
        "text_encoder": clip_text(seed=seed + 1),
        "text_encoder_2": clip_text(hidden=32, seed=seed + 2, projection=True),
    }


# lycoris-lora 4.1.3's "full" preset names time_embedding both by class (TimestepEmbedding)
# and by path, and then refuses the duplicate on a diffusers UNet; this is "full" without
# the duplicate (and with SDXL's add_embedding, a TimestepEmbedding too).
FULL_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def _preset_file() -> str:
    import os
    import tempfile

    path = os.path.join(tempfile.gettempdir(), "loha-test-lycoris-full-preset.toml")
    with open(path, "w") as f:
        f.write(FULL_PRESET)
    return path


def lycoris_network(parts: dict, seed: int = 0, dim: int = 4, alpha: float = 2.0, conv_dim: int = 4,
                    conv_alpha: float = 2.0, algo: str = "loha", **kwargs):
    """A network made by lycoris-lora (LoHa unless `algo` says "lora", "lokr", "full" …),
    hooked into `parts` (LyCORIS's forward path).

    The zero-initialised factor is randomised so ΔW ≠ 0. The parts' outputs change from
    now on: pass a copy to keep them clean (`make_loha_file` does).
    """
    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # its INFO lines drown test output
    tes = [parts[k] for k in ("text_encoder", "text_encoder_2") if k in parts]
    te = tes if len(tes) > 1 else tes[0]
    net = create_network(1.0, dim, alpha, None, te, parts["unet"], algo=algo,
                         conv_dim=conv_dim, conv_alpha=conv_alpha, preset=_preset_file(), **kwargs)
    net.apply_to(te, parts["unet"], True, True)  # also registers the modules for state_dict()
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in net.unet_loras + net.text_encoder_loras:
            if algo == "loha" and hasattr(module, "hada_w2_a"):  # not train_norm's norm modules
                module.hada_w2_a.normal_(std=0.1)
            for param in module.parameters():  # the zero-initialised factor of other algorithms
                if not param.any():
                    param.normal_(std=0.1 if algo != "full" else 0.01)
            if getattr(module, "wd", False):
                module.dora_scale.mul_(1 + 0.1 * torch.randn_like(module.dora_scale))
    return net


def make_loha_file(parts: dict, path, dtype=torch.float32, metadata=None, **kwargs) -> str:
    """Write a LoHa file for `parts` with lycoris-lora (built on a copy; `parts` stay clean)."""
    net = lycoris_network(copy.deepcopy(parts), **kwargs)
    net.save_weights(str(path), dtype, metadata or {"ss_network_module": "lycoris.kohya"})
    return str(path)


def make_mixed_file(parts: dict, path, seed: int = 0) -> str:
    """One file of several module kinds, each part of it written by lycoris-lora for `parts`:
    LoHa (Tucker convs) on attention, LoCon LoRA on resnets, LoKr on the text encoders,
    full-diff (with diff_b) on conv_in, and a DoRA LoHa on the time embedding."""
    from safetensors.torch import save_file

    def tensors(**kwargs):
        net = lycoris_network(copy.deepcopy(parts), seed=seed, **kwargs)
        return {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}

    chosen = {}
    for name, kind in (("attentions", tensors(use_tucker=True)), ("resnets", tensors(algo="lora", use_tucker=True)),
                       ("lora_te", tensors(algo="lokr")), ("conv_in", tensors(algo="full")),
                       ("time_embedding", tensors(dora_wd=True))):
        chosen.update({k: v for k, v in kind.items() if name in k})
    generator = torch.Generator().manual_seed(seed)
    for key in [k for k in chosen if k.endswith(".diff_b")]:  # lycoris-lora writes a zero bias change
        chosen[key] = 0.05 * torch.randn(chosen[key].shape, generator=generator)
    save_file(chosen, str(path), {"ss_network_module": "lycoris.kohya"})
    return str(path)


def unet_inputs(unet, seed: int = 0) -> dict:
    """Seeded inputs for a UNet2DConditionModel forward (SDXL's added conditions too)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    kwargs = {
        "sample": torch.randn(1, cfg.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 5, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, text_dim, generator=g),
            "time_ids": torch.randn(1, 6, generator=g),
        }
    return kwargs


def run_parts(parts: dict, seed: int = 0) -> dict:
    """Outputs of every part on fixed inputs, for comparing patched models."""
    out = {}
    with torch.no_grad():
        unet = parts["unet"]
        out["unet"] = unet(**unet_inputs(unet, seed)).sample
        ids = torch.tensor([[0, 5, 17, 42, 2]])
        for key in ("text_encoder", "text_encoder_2"):
            if key in parts:
                out[key] = parts[key](ids).last_hidden_state
    return out


def lycoris_outputs(make_parts, kwargs, path, multiplier):
    """Outputs of fresh `make_parts()` with LyCORIS's forward path applying the file at `path`.

    LyCORIS modules hook the layers they were built on, so the network is built anew on
    the reference copy and loaded from the file (its fp16/bf16-rounded values).
    """
    ref = make_parts()
    net = lycoris_network(ref, **kwargs)
    net.load_weights(path)
    for module in net.unet_loras + net.text_encoder_loras:
        module.multiplier = multiplier
    return run_parts(ref)


def assert_outputs_close(ours, theirs, base):
    for part in theirs:
        change = (theirs[part] - base[part]).abs().max()
        assert change > 1e-3, f"{part}: the network changes nothing; the test would prove nothing"
        torch.testing.assert_close(ours[part], theirs[part], rtol=2e-4, atol=2e-4, msg=part)
