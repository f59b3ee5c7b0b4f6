"""Base models to train on: an LDM checkpoint file, a diffusers folder, or the demo model.

A checkpoint is read into diffusers/transformers modules by `loha.checkpoint`
(built on `loha.keys`' block tables), so the modules the trainer wraps carry exactly
the names a file must use. Checkpoints carry no tokenizer: pass the folder of one
(``vocab.json`` + ``merges.txt``, e.g. a diffusers model's ``tokenizer/``).

The demo model is SD1.5's architecture at small widths with seeded random weights
(`loha.demo`'s UNet and text encoder, a small VAE, a byte-level tokenizer), so the
trainer runs anywhere with nothing downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import LohaError

#: The demo VAE: SD's AutoencoderKL (8× downsampling, 4 latent channels) at small widths.
DEMO_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128, scaling_factor=0.18215,
)
#: Metadata a checkpoint written by `write_checkpoint` carries: the parts' configs
#: (`loha.checkpoint` overrides) and the tokenizer kind.
CONFIG_KEY = "loha.train.configs"
TOKENIZER_KEY = "loha.train.tokenizer"


class ByteTokenizer:
    """The demo's tokenizer: one id per UTF-8 byte, CLIP's BOS/EOS/padding layout."""

    name = "bytes"

    def __init__(self, bos: int = 0, pad: int = 1, eos: int = 2, length: int = 77):
        self.bos, self.pad, self.eos, self.length = bos, pad, eos, length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = [self.bos, *(3 + b for b in text.lower().encode("utf-8"))][: self.length - 1] + [self.eos]
            rows.append(ids + [self.pad] * (self.length - len(ids)))
        return torch.tensor(rows)


class HFTokenizer:
    """A transformers CLIP tokenizer, padded to the text encoder's positions as SD pipelines do.

    The length comes from the encoder, not the tokenizer: tokenizer folders that hosts
    ship (ComfyUI's among them) claim a `model_max_length` of 8192.
    """

    def __init__(self, tokenizer, length: int):
        self.tokenizer = tokenizer
        self.length = length
        self.name = getattr(tokenizer, "name_or_path", "clip")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = self.tokenizer(texts, padding="max_length", max_length=self.length,
                             truncation=True, return_tensors="pt")
        return out.input_ids


@dataclass
class BaseModel:
    """A diffusers/transformers base model, as the training loop uses one.

    The loop calls only the methods below, so another host's model (ComfyUI's
    MODEL/CLIP/VAE) trains through the same loop by providing them; `parts()` is what
    `LohaNetwork` wraps (a mapping of diffusers parts, or one LDM-layout module).
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: object
    family: str
    name: str
    prediction_type: str = "epsilon"
    configs: dict = field(default_factory=dict)

    def parts(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def to(self, device, dtype=None) -> "BaseModel":
        for module in (self.unet, self.text_encoder, self.vae):
            module.requires_grad_(False)
            module.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        return self

    def modes(self, checkpointing: bool, text_encoder: bool) -> None:
        """Training modes: diffusers checkpoints only modules in training mode."""
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
            if text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train(checkpointing)
        self.text_encoder.train(checkpointing and text_encoder)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents as the UNet sees them (the distribution's mean)."""
        param = next(self.vae.parameters())
        return self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        return self.vae.decode((latents / self.vae.config.scaling_factor).to(param.device, param.dtype)).sample

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    def encode_captions(self, captions: list[str], clip_skip: int = 1) -> torch.Tensor:
        """Conditioning for captions (no gradient needed: the frozen-encoder path and samples)."""
        device = next(self.text_encoder.parameters()).device
        return self.encode_text(self.tokenize(captions).to(device), clip_skip)

    def encode_text(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        out = self.text_encoder(ids, output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            return out.last_hidden_state
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(out.hidden_states[-clip_skip])

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's noise (or v) prediction."""
        dtype = self.unet.dtype
        return self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=context.to(dtype)).sample


def _need_diffusers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise LohaError(f"training needs diffusers and transformers ({exc.name} is missing): "
                        "pip install 'loha[diffusers]'") from None


def _quiet():
    import logging

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _build(unet_config: dict, text_config: dict, vae_config: dict, seed: int | None):
    _need_diffusers()
    _quiet()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    modules = []
    for offset, make in enumerate((lambda: UNet2DConditionModel(**unet_config),
                                   lambda: CLIPTextModel(CLIPTextConfig(**text_config)),
                                   lambda: AutoencoderKL(**vae_config))):
        if seed is not None:
            torch.manual_seed(seed + offset)
        modules.append(make().eval())
    return modules


def demo_model(seed: int = 0) -> BaseModel:
    """The demo model: SD1.5's structure at small widths, seeded random weights."""
    from ..demo import DEMO_TEXT, DEMO_UNET

    unet, text, vae = _build(DEMO_UNET, DEMO_TEXT, DEMO_VAE, seed)
    configs = {"unet": DEMO_UNET, "text_encoder": DEMO_TEXT, "vae": DEMO_VAE}
    return BaseModel(unet, text, vae, ByteTokenizer(length=DEMO_TEXT["max_position_embeddings"]), "sd1",
                     f"loha-demo-sd1-seed{seed}", configs=configs)


def from_diffusers(folder: str) -> BaseModel:
    """A diffusers model folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/)."""
    _need_diffusers()
    _quiet()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise LohaError(f"{folder}: SDXL (text_encoder_2) is not supported by the trainer yet; SD1.x/SD2.x only")
    for sub in ("unet", "text_encoder", "vae", "tokenizer"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise LohaError(f"{folder}: not a diffusers model folder (no {sub}/)")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    tokenizer = HFTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                            text.config.max_position_embeddings)
    prediction = "epsilon"
    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        with open(scheduler, encoding="utf-8") as f:
            prediction = json.load(f).get("prediction_type", "epsilon")
    from ..keys import map_modules

    family = map_modules({"unet": unet, "text_encoder": text}).family
    return BaseModel(unet, text, vae, tokenizer, family, os.path.basename(os.path.normpath(folder)), prediction)


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state), {}


def from_checkpoint(path: str, tokenizer: str | None = None, vae: str | None = None) -> BaseModel:
    """An SD1.x/SD2.x LDM checkpoint (.safetensors, or .ckpt loaded with weights_only).

    `loha.checkpoint` reads the architecture off the shapes and loads every tensor;
    a checkpoint written by `write_checkpoint` also carries what shapes cannot tell.
    """
    _need_diffusers()
    _quiet()
    from ..checkpoint import diffusers_parts

    if not os.path.isfile(path):
        raise LohaError(f"{path}: no such checkpoint")
    state, meta = _read_checkpoint(path)
    configs = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    parts = diffusers_parts(state, overrides=configs)
    if "text_encoder_2" in parts:
        raise LohaError(f"{path}: SDXL is not supported by the trainer yet; SD1.x/SD2.x only")
    if vae is not None:
        parts["vae"] = from_diffusers_vae(vae)
    if "vae" not in parts:
        raise LohaError(f"{path}: holds no VAE (first_stage_model.*); pass one (a diffusers VAE folder)")
    from ..keys import map_modules

    family = map_modules(parts).family
    return BaseModel(parts["unet"], parts["text_encoder"], parts["vae"], _tokenizer(path, meta, tokenizer, parts["text_encoder"]),
                     family, os.path.splitext(os.path.basename(path))[0], configs=configs or {})


def from_diffusers_vae(folder: str):
    _need_diffusers()
    from diffusers import AutoencoderKL

    sub = "vae" if os.path.isdir(os.path.join(folder, "vae")) else None
    return AutoencoderKL.from_pretrained(folder, subfolder=sub).eval()


def _tokenizer(path: str, meta: dict, folder: str | None, text_encoder):
    if folder is not None:
        from transformers import CLIPTokenizer

        sub = "tokenizer" if os.path.isdir(os.path.join(folder, "tokenizer")) else None
        return HFTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder=sub),
                           text_encoder.config.max_position_embeddings)
    if meta.get(TOKENIZER_KEY) == ByteTokenizer.name:
        return ByteTokenizer(length=json.loads(meta[CONFIG_KEY])["text_encoder"]["max_position_embeddings"])
    raise LohaError(f"{path}: a checkpoint carries no tokenizer; pass --tokenizer FOLDER "
                    "(vocab.json + merges.txt, e.g. a diffusers SD1.5 model's tokenizer/)")


def write_checkpoint(model: BaseModel, path: str) -> str:
    """Save a model built from configs (the demo) as an LDM checkpoint (VAE included) that
    `from_checkpoint` reads back, its configs and tokenizer kind in the metadata."""
    from ..checkpoint import save_checkpoint

    meta = {CONFIG_KEY: json.dumps(model.configs)}
    if isinstance(model.tokenizer, ByteTokenizer):
        meta[TOKENIZER_KEY] = ByteTokenizer.name
    parts = {"unet": model.unet, "text_encoder": model.text_encoder, "vae": model.vae}
    return save_checkpoint(path, parts, metadata=meta, family=model.family)


def load_base(source: str, tokenizer: str | None = None, vae: str | None = None, seed: int = 0) -> BaseModel:
    """"demo", a diffusers folder, or a checkpoint file."""
    if source == "demo":
        return demo_model(seed)
    if os.path.isdir(source):
        return from_diffusers(source)
    return from_checkpoint(source, tokenizer, vae)
