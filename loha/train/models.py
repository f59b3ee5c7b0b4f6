"""Base models to train on: an LDM checkpoint file, a diffusers folder, or the demo model.

A checkpoint is read through our own name map (`loha.demo.from_ldm`, built on
`loha.keys`' block tables) into diffusers/transformers modules, so the modules the
trainer wraps carry exactly the names a file must use. Its VAE is converted with
diffusers' LDM converter. Checkpoints carry no tokenizer: pass the folder of one
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

#: AutoencoderKL of SD1/SD2 (the LDM VAE every such checkpoint holds).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)
#: The demo VAE: the same 8× downsampling at small widths.
DEMO_VAE = dict(SD_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128)
#: Metadata keys a checkpoint written by `write_checkpoint` carries (configs, tokenizer).
CONFIG_KEYS = {"unet": "loha.unet_config", "text_encoder": "loha.text_config", "vae": "loha.vae_config"}
TOKENIZER_KEY = "loha.tokenizer"
#: kohya/LDM key prefix of the VAE in a checkpoint.
VAE_PREFIX = "first_stage_model."


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
    """A transformers CLIP tokenizer, padded to its model length as SD pipelines do."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "clip")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return out.input_ids


@dataclass
class BaseModel:
    """What training needs from a base model; `parts()` is what `keys.map_modules` reads."""

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
            module.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        return self


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
    tokenizer = HFTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
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
    """An SD1.x LDM checkpoint (.safetensors, or .ckpt loaded with weights_only)."""
    from ..demo import SD15_TEXT, SD15_UNET, from_ldm
    from ..keys import map_state_dict

    if not os.path.isfile(path):
        raise LohaError(f"{path}: no such checkpoint")
    state, meta = _read_checkpoint(path)
    family = map_state_dict(state).family
    if family != "sd1":
        raise LohaError(f"{path}: a {family} checkpoint; the trainer reads SD1.x checkpoints, "
                        "or any SD1.x/SD2.x model as a diffusers folder")
    configs = {part: json.loads(meta[key]) if key in meta else default
               for (part, key), default in zip(CONFIG_KEYS.items(), (SD15_UNET, SD15_TEXT, SD_VAE))}
    unet_module, text_module, vae_module = _build(configs["unet"], configs["text_encoder"], configs["vae"], None)
    from_ldm(state, unet_module, text_module)
    if vae is not None:
        vae_module = from_diffusers_vae(vae)
    elif any(k.startswith(VAE_PREFIX) for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        vae_module.load_state_dict(convert_ldm_vae_checkpoint(state, configs["vae"]))
    else:
        raise LohaError(f"{path}: holds no VAE ({VAE_PREFIX}*); pass one (a diffusers VAE folder)")
    return BaseModel(unet_module, text_module, vae_module, _tokenizer(path, meta, tokenizer, configs), family,
                     os.path.splitext(os.path.basename(path))[0], configs=configs)


def from_diffusers_vae(folder: str):
    _need_diffusers()
    from diffusers import AutoencoderKL

    sub = "vae" if os.path.isdir(os.path.join(folder, "vae")) else None
    return AutoencoderKL.from_pretrained(folder, subfolder=sub).eval()


def _tokenizer(path: str, meta: dict, folder: str | None, configs: dict):
    if folder is not None:
        from transformers import CLIPTokenizer

        sub = "tokenizer" if os.path.isdir(os.path.join(folder, "tokenizer")) else None
        return HFTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder=sub))
    if meta.get(TOKENIZER_KEY) == ByteTokenizer.name:
        return ByteTokenizer(length=configs["text_encoder"]["max_position_embeddings"])
    raise LohaError(f"{path}: a checkpoint carries no tokenizer; pass --tokenizer FOLDER "
                    "(vocab.json + merges.txt, e.g. a diffusers SD1.5 model's tokenizer/)")


def write_checkpoint(model: BaseModel, path: str) -> str:
    """Save a model built from configs (the demo) as an LDM checkpoint that
    `from_checkpoint` reads back: UNet and text encoder in LDM layout, configs and
    tokenizer in the metadata; the VAE under diffusers names in a `path`.vae folder."""
    from safetensors.torch import save_file

    from ..demo import to_ldm

    meta = {key: json.dumps(model.configs[part]) for part, key in CONFIG_KEYS.items()}
    if isinstance(model.tokenizer, ByteTokenizer):
        meta[TOKENIZER_KEY] = ByteTokenizer.name
    save_file(to_ldm(model.unet.state_dict(), model.text_encoder.state_dict()), path, metadata=meta)
    model.vae.save_pretrained(path + ".vae")
    return path


def load_base(source: str, tokenizer: str | None = None, vae: str | None = None, seed: int = 0) -> BaseModel:
    """"demo", a diffusers folder, or a checkpoint file."""
    if source == "demo":
        return demo_model(seed)
    if os.path.isdir(source):
        return from_diffusers(source)
    return from_checkpoint(source, tokenizer, vae)
