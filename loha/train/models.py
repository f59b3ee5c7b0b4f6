"""Base models to train on: an LDM checkpoint file, a diffusers folder, or the demo model.

SD1.x/SD2.x train as `BaseModel` (one text encoder), SDXL as `SDXLModel` (CLIP-L and
OpenCLIP-G, pooled text and size conditioning as kohya's sdxl_train_network feeds them).
A checkpoint is read into diffusers/transformers modules by `loha.models.from_ldm`
(built on `loha.keys`' block tables), so the modules the trainer wraps carry exactly
the names a file must use; its VAE comes from the checkpoint too. A checkpoint
carries no tokenizer, and none is needed: CLIP's byte-pair vocabulary ships with the
package (`clip_tokenizer/`, see its LICENSE), padded as each encoder was trained
(CLIP-L with the end token, OpenCLIP's ViT-H and ViT-bigG with "!"). A tokenizer
folder still wins when given.

The demo model is SD1.5's architecture at small widths with seeded random weights
(`loha.models.configs.DEMO`, and a byte-level tokenizer), so the trainer runs anywhere
with nothing downloaded; its checkpoint (`loha demo`) trains like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import LohaError
from ..keys import map_modules
from ..models.configs import DEMO
from ..models.structures import require_diffusers

#: Metadata a checkpoint written by `save_base_checkpoint` carries: the parts' configs
#: (`from_ldm.diffusers_parts` overrides) and the tokenizer kind.
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
        return self.encode_text(to_device(self.tokenize(captions), device), clip_skip)

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


@dataclass
class SDXLModel(BaseModel):
    """SDXL: two text encoders, pooled text and size conditioning, as kohya's
    sdxl_train_network (and diffusers' StableDiffusionXLPipeline) feed the UNet.

    - ids: a pair, CLIP-L's (`tokenizer`) and OpenCLIP-G's (`tokenizer_2`), each padded
      as its own tokenizer pads (OpenCLIP-G's pads with "!").
    - conditioning: a pair ``(context, pooled)``. context = concat(hidden_states[-2] of
      `text_encoder`, hidden_states[-2] of `text_encoder_2`) on the last axis (no final
      layer norm); pooled = `text_encoder_2`'s ``text_embeds`` (its projection output).
      `clip_skip` k takes hidden_states[-(k + 1)]: 1 (the default) is the penultimate
      layer SDXL is trained on, k is diffusers' ``clip_skip=k - 1``.
    - time_ids per sample: (original_h, original_w, crop_top, crop_left, target_h,
      target_w) = (H, W, 0, 0, H, W) with H×W the bucket's image size in pixels (read
      off the latents): every image is resized to its bucket, never cropped.

    Under fp16 the VAE stays in fp32 (kohya's --no_half_vae): SDXL's VAE overflows in fp16.
    """

    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None

    def parts(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def to(self, device, dtype=None) -> "SDXLModel":
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        for module, to in ((self.unet, dtype), (self.text_encoder, dtype), (self.text_encoder_2, dtype),
                           (self.vae, vae_dtype)):
            module.requires_grad_(False)
            module.to(device=device, **({"dtype": to} if to is not None else {}))
        return self

    def modes(self, checkpointing: bool, text_encoder: bool) -> None:
        super().modes(checkpointing, text_encoder)
        if checkpointing and text_encoder:
            self.text_encoder_2.gradient_checkpointing_enable()
        self.text_encoder_2.train(checkpointing and text_encoder)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(captions), self.tokenizer_2(captions)

    def encode_text(self, ids, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if clip_skip < 1:
            raise LohaError(f"clip_skip {clip_skip} must be ≥ 1")
        first = self.text_encoder(ids[0], output_hidden_states=True)
        second = self.text_encoder_2(ids[1], output_hidden_states=True)
        layer = -(clip_skip + 1)
        context = torch.cat([first.hidden_states[layer], second.hidden_states[layer]], dim=-1)
        return context, second.text_embeds

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 6) size conditioning for latents of one bucket (see the class docstring)."""
        h, w = (side * self.vae_factor for side in latents.shape[-2:])
        row = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
        return row.expand(latents.shape[0], 6)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, context) -> torch.Tensor:
        hidden, pooled = context
        dtype = self.unet.dtype
        added = {"text_embeds": pooled.to(dtype), "time_ids": self.time_ids(noisy).to(dtype)}
        return self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype),
                         added_cond_kwargs=added).sample


def to_device(value, device):
    """A tensor, or a tuple of them (SDXL's ids and conditioning), on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return tuple(to_device(v, device) for v in value)


def take(value, index):
    """Rows `index` of a tensor, or of each tensor of a tuple."""
    if isinstance(value, torch.Tensor):
        return value[index]
    return tuple(take(v, index) for v in value)


def _assemble(parts: dict, vae, tokenizers: tuple, family: str, name: str, prediction: str = "epsilon",
              configs: dict | None = None) -> BaseModel:
    """BaseModel, or SDXLModel when the parts hold a second text encoder."""
    common = dict(unet=parts["unet"], text_encoder=parts["text_encoder"], vae=vae, tokenizer=tokenizers[0],
                  family=family, name=name, prediction_type=prediction, configs=configs or {})
    if "text_encoder_2" in parts:
        return SDXLModel(**common, text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizers[1])
    return BaseModel(**common)



def _quiet():
    import logging

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _build(unet_config: dict, text_config: dict, vae_config: dict, seed: int | None):
    require_diffusers("training")
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
    unet, text, vae = _build(DEMO["unet"], DEMO["text_encoder"], DEMO["vae"], seed)
    return BaseModel(unet, text, vae, ByteTokenizer(length=DEMO["text_encoder"]["max_position_embeddings"]), "sd1",
                     f"loha-demo-sd1-seed{seed}", configs=dict(DEMO))


def from_diffusers(folder: str) -> BaseModel:
    """A diffusers model folder: unet/, text_encoder/, vae/, scheduler/, and tokenizer/ (the
    shipped CLIP vocabulary when absent); SDXL's also text_encoder_2/ (and tokenizer_2/)."""
    require_diffusers("training")
    _quiet()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    for sub in ("unet", "text_encoder", "vae"):
        if not os.path.isdir(os.path.join(folder, sub)):
            what = "an SDXL model folder" if sdxl else "a diffusers model folder"
            raise LohaError(f"{folder}: not {what} (no {sub}/)")
    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
             "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()}
    if sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    family = map_modules(parts).family
    has_folders = all(os.path.isdir(os.path.join(folder, sub)) for sub, text in _TOKENIZERS if text in parts)
    tokenizers = _tokenizers(folder, {}, folder if has_folders else None, parts, family)
    prediction = "epsilon"
    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        with open(scheduler, encoding="utf-8") as f:
            prediction = json.load(f).get("prediction_type", "epsilon")
    return _assemble(parts, vae, tokenizers, family, os.path.basename(os.path.normpath(folder)), prediction)


#: (tokenizer subfolder, the text encoder it feeds), in order.
_TOKENIZERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
#: CLIP's byte-pair vocabulary (OpenAI CLIP's, MIT; see clip_tokenizer/LICENSE) and its size.
CLIP_VOCABULARY = os.path.join(os.path.dirname(__file__), "clip_tokenizer")
CLIP_VOCAB_SIZE = 49408
#: How each text-encoder kind pads its 77 positions: CLIP-L with the end token, OpenCLIP with "!" (id 0),
#: as diffusers' SD2 `tokenizer/` and SDXL `tokenizer_2/` (and ComfyUI's SD2/SDXL tokenizers) do.
PAD_TOKENS = {"clip": "<|endoftext|>", "openclip": "!"}


def clip_tokenizer(kind: str, length: int = 77) -> "HFTokenizer":
    """The shipped CLIP tokenizer, padded as a `kind` ("clip" or "openclip") encoder was trained."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(os.path.join(CLIP_VOCABULARY, "vocab.json"),
                              os.path.join(CLIP_VOCABULARY, "merges.txt"), pad_token=PAD_TOKENS[kind])
    tokenizer.name_or_path = f"loha-{kind}"
    return HFTokenizer(tokenizer, length)


def from_checkpoint(path: str, tokenizer: str | None = None, vae: str | None = None,
                    prediction: str | None = None) -> BaseModel:
    """An SD1.x/SD2.x/SDXL LDM checkpoint (.safetensors, or .ckpt loaded with weights_only).

    `loha.models.from_ldm` reads the architecture off the shapes (fp32, fp16 or bf16
    tensors; full, pruned or EMA-only files) and loads every tensor; the prediction type
    comes from `from_ldm.prediction_type` unless `prediction` says it.
    """
    require_diffusers("training")
    _quiet()
    from ..files.checkpoint import read_checkpoint

    if not os.path.isfile(path):
        raise LohaError(f"{path}: no such checkpoint")
    state, meta = read_checkpoint(path)
    return from_state(state, meta, os.path.splitext(os.path.basename(path))[0], tokenizer, vae, prediction,
                      label=path)


def from_state(state, meta: dict, name: str, tokenizer: str | None = None, vae: str | None = None,
               prediction: str | None = None, label: str = "checkpoint", device="cpu") -> BaseModel:
    """`from_checkpoint` on a state dict already read (on the meta device: the structure alone)."""
    from ..families import family_of_checkpoint
    from ..models.from_ldm import diffusers_parts, prediction_type

    family = family_of_checkpoint(state)
    configs = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    parts = diffusers_parts(state, family, device=device, overrides=configs)
    if vae is not None:
        parts["vae"] = from_diffusers_vae(vae)
    if "vae" not in parts:
        raise LohaError(f"{label}: holds no VAE (first_stage_model.*); pass one (a diffusers VAE folder)",
                        option="vae")
    family = map_modules(parts).family
    return _assemble(parts, parts["vae"], _tokenizers(label, meta, tokenizer, parts, family), family, name,
                     prediction or prediction_type(state, family), configs=configs)


def from_diffusers_vae(folder: str):
    require_diffusers("training")
    from diffusers import AutoencoderKL

    sub = "vae" if os.path.isdir(os.path.join(folder, "vae")) else None
    return AutoencoderKL.from_pretrained(folder, subfolder=sub).eval()


def _tokenizers(path: str, meta: dict, folder: str | None, parts: dict, family: str) -> tuple:
    """One tokenizer per text encoder of the parts: from `folder` (its tokenizer/ and, for
    SDXL, tokenizer_2/; an SD1/SD2 tokenizer may also be the folder itself); else the
    shipped CLIP vocabulary for encoders with CLIP's vocabulary, the byte tokenizer for
    the demo's (or a `save_base_checkpoint` file that names it)."""
    from ..families import checkpoint_parts

    sdxl = "text_encoder_2" in parts
    if folder is not None:
        from transformers import CLIPTokenizer

        if sdxl and not all(os.path.isdir(os.path.join(folder, sub)) for sub, _ in _TOKENIZERS):
            raise LohaError(f"{path}: an SDXL checkpoint needs a tokenizer folder with tokenizer/ and tokenizer_2/ "
                            f"subfolders (a diffusers SDXL model folder); {folder} lacks them", option="tokenizer")
        out = []
        for sub, text in _TOKENIZERS:
            if text not in parts:
                continue
            sub = sub if os.path.isdir(os.path.join(folder, sub)) else None
            out.append(HFTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder=sub),
                                   parts[text].config.max_position_embeddings))
        return tuple(out)
    out = []
    for sub, text in _TOKENIZERS:
        if text not in parts:
            continue
        config = parts[text].config
        if meta.get(TOKENIZER_KEY) == ByteTokenizer.name or _is_demo_text(config):
            out.append(ByteTokenizer(length=config.max_position_embeddings))
        elif config.vocab_size == CLIP_VOCAB_SIZE:
            out.append(clip_tokenizer(checkpoint_parts(family)[text].kind, config.max_position_embeddings))
        else:
            wanted = ("a tokenizer folder with tokenizer/ and tokenizer_2/ subfolders (a diffusers SDXL model folder)"
                      if sdxl else "a tokenizer folder (vocab.json + merges.txt)")
            raise LohaError(f"{path}: {text} has a vocabulary of {config.vocab_size} tokens, not CLIP's "
                            f"{CLIP_VOCAB_SIZE}, so the shipped tokenizer does not fit; give {wanted}",
                            option="tokenizer")
    return tuple(out)


def _is_demo_text(config) -> bool:
    return all(getattr(config, key) == value for key, value in DEMO["text_encoder"].items())


def save_base_checkpoint(model: BaseModel, path: str) -> str:
    """Save a model built from configs (the demo) as an LDM checkpoint (VAE included) that
    `from_checkpoint` reads back, its configs and tokenizer kind in the metadata."""
    from ..models.to_ldm import save_checkpoint

    meta = {CONFIG_KEY: json.dumps(model.configs)}
    if isinstance(model.tokenizer, ByteTokenizer):
        meta[TOKENIZER_KEY] = ByteTokenizer.name
    parts = {**model.parts(), "vae": model.vae}
    return save_checkpoint(path, parts, metadata=meta, family=model.family)


def load_base(source: str, tokenizer: str | None = None, vae: str | None = None, seed: int = 0,
              prediction: str | None = None) -> BaseModel:
    """"demo", a diffusers folder, or a checkpoint file."""
    if source == "demo":
        return demo_model(seed)
    if os.path.isdir(source):
        return from_diffusers(source)
    return from_checkpoint(source, tokenizer, vae, prediction)
