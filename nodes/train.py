"""Train LoHa: train a LoHa on ComfyUI's MODEL/CLIP/VAE and a folder of images.

The training loop is loha's (`loha.train.Trainer`); this module only adapts ComfyUI's
objects to what the loop calls (`ComfyBase`): the LoHa modules wrap the LDM-layout
diffusion model through `loha.keys`' name map (so the file carries the kohya names
every loader reads), latents come from the VAE and the model's latent format, the
text encoder stays frozen and encodes each caption once. The file goes to the first
"loras" folder, so LoraLoader and LoHa Loader list it right away. ComfyUI's
progress bar follows the steps; Cancel stops the run after the current step and the
file is still written with what it has.
"""

from __future__ import annotations

import os

import torch

from loha.errors import LohaError

from . import host
from .loaders import CATEGORY

_PREDICTIONS = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


class ComfyBase:
    """ComfyUI's MODEL/CLIP/VAE with the methods `loha.train` calls on a base model."""

    def __init__(self, model, clip, vae):
        from loha.keys import map_state_dict

        self.patcher, self.clip, self.vae = model, clip, vae
        self.model = model.model  # BaseModel: .diffusion_model is the LDM UNet
        self.family = map_state_dict({k: v.shape for k, v in self.model.state_dict().items()}).family
        kind = getattr(self.model.model_type, "name", str(self.model.model_type))
        if kind not in _PREDICTIONS:
            raise LohaError(f"Train LoHa: models of type {kind} are not supported (epsilon and v-prediction are)")
        self.prediction_type = _PREDICTIONS[kind]
        self.name = getattr(model, "name", None) or "comfyui-model"

    def parts(self):
        return self.model

    def to(self, device, dtype=None) -> "ComfyBase":
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        _outside_inference_mode(self.model.diffusion_model)
        self.model.requires_grad_(False)
        return self

    def modes(self, checkpointing: bool, text_encoder: bool) -> None:
        if checkpointing or text_encoder:
            raise LohaError("Train LoHa in ComfyUI trains the diffusion model only, without checkpointing")
        self.model.diffusion_model.train(False)

    @property
    def vae_factor(self) -> int:
        return int(getattr(self.vae, "downscale_ratio", 8))

    @property
    def latent_channels(self) -> int:
        return int(self.model.latent_format.latent_channels)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.vae.encode(((pixels + 1) / 2).permute(0, 2, 3, 1))
        return self.model.latent_format.process_in(raw.float())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.model.latent_format.process_out(latents))
        return images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2) * 2 - 1

    def tokenize(self, captions):
        raise LohaError("Train LoHa in ComfyUI keeps the text encoder frozen")

    @property
    def sized(self) -> bool:
        """Whether the model takes pooled text and size conditioning (SDXL's `y`)."""
        return getattr(self.model, "adm_channels", 0) > 0 and hasattr(self.model, "encode_adm")

    def encode_captions(self, captions: list[str], clip_skip: int = 1):
        """The context of each caption; with SDXL also the pooled text, as (context, pooled)."""
        if not self.sized:
            return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(c)) for c in captions])
        pairs = [self.clip.encode_from_tokens(self.clip.tokenize(c), return_pooled=True) for c in captions]
        return torch.cat([c for c, _ in pairs]), torch.cat([p for _, p in pairs])

    def predict(self, noisy, timesteps, context):
        dtype = self.model.get_dtype()
        extra = {}
        if self.sized:  # SDXL: ComfyUI's own size embedding, (H, W, 0, 0, H, W) as the loop feeds diffusers
            context, pooled = context
            h, w = (side * self.vae_factor for side in noisy.shape[-2:])
            y = self.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                      target_width=w, target_height=h)
            extra["y"] = y.to(noisy.device, dtype)
        return self.model.diffusion_model(noisy.to(dtype), timesteps, context=context.to(dtype), **extra)


def _outside_inference_mode(module: torch.nn.Module) -> None:
    """Swap inference tensors for equal normal ones, in place, one at a time.

    ComfyUI loads models inside `torch.inference_mode()`, and autograd refuses to save
    such tensors for backward (every frozen layer the gradient flows through saves its
    weight). The values stay bit for bit the same, so later graphs see the same model.
    """
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and param.is_inference():
                sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.is_inference():
                sub._buffers[name] = buffer.clone()


class TrainLoha:
    DESCRIPTION = ("Trains a LoHa on a folder of images (same-name .txt captions; N_name/ folders repeat their "
                   "images N times) and saves it in the loras folder. Cancel stops it and keeps what it has.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the LoHa file was written.",)
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from loha.train.modules import PRESET_HELP

        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to train the LoHa for (SD1.x/SD2.x/SDXL)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder; encodes each caption once (not trained)."}),
            "vae": ("VAE", {"tooltip": "Its VAE; encodes each image once."}),
            "folder": ("STRING", {"default": "", "tooltip": "Image folder: images with same-name .txt captions, "
                                  "N_name/ subfolders repeated N times. Empty: loha's bundled sample images."}),
            "name": ("STRING", {"default": "my-loha", "tooltip": "File name in the loras folder."}),
            "preset": (list(PRESET_HELP), {"default": "attn-mlp", "tooltip": "; ".join(
                f"{k}: {v}" for k, v in PRESET_HELP.items())}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Rank of each Hadamard factor."}),
            "alpha": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 256.0, "tooltip": "ΔW is scaled by alpha/rank."}),
            "steps": ("INT", {"default": 500, "min": 1, "max": 1000000, "tooltip": "Optimiser steps."}),
            "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                        "tooltip": "AdamW learning rate (constant)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step (one bucket)."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                   "tooltip": "Bucket area = resolution²; images keep their aspect ratio."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Fixes the initial factors, the batch order, the noise and the timesteps."}),
        }}

    def train(self, model, clip, vae, folder, name, preset, rank, alpha, steps, learning_rate, batch_size,
              resolution, seed):
        import comfy.model_management
        import folder_paths

        from loha.train import SAMPLE_DATA, Callbacks, NetworkSpec, TrainConfig, Trainer

        name = name.strip() or "my-loha"
        out = os.path.join(folder_paths.get_folder_paths(host.LORA_FOLDER)[0],
                           name if name.endswith(".safetensors") else name + ".safetensors")
        config = TrainConfig(data=folder.strip() or SAMPLE_DATA, output=out, model="comfyui",
                             network=NetworkSpec(preset=preset, rank=rank, alpha=alpha, conv_rank=max(1, rank // 2),
                                                 conv_alpha=max(alpha / 2, 1e-3)),
                             resolution=resolution, batch_size=batch_size, steps=steps, learning_rate=learning_rate,
                             seed=seed, device=str(comfy.model_management.get_torch_device()))
        bar = host.progress(steps)
        callbacks = Callbacks()

        def progress(step, total, loss, lr):
            bar.update_absolute(step, total)
            if comfy.model_management.processing_interrupted():
                callbacks.stop.set()

        callbacks.progress = progress
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs every node under inference_mode
            result = Trainer(config, callbacks, base=ComfyBase(model, clip, vae)).run()
        return {"ui": {"text": [f"{result.path} ({result.steps} steps)"]}, "result": (result.path,)}


NODES = {"LohaTrain": (TrainLoha, "Train LoHa")}
