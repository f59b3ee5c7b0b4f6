"""Model structures without weights: the name map of a base model a file is converted for.

Converting between naming schemes (kohya ↔ PEFT) and writing LoRA factors in the
shapes loaders expect (conv kernels) needs the base model's module paths and weight
shapes, never its weights. This builds the diffusers/transformers modules on the meta
device, either from the standard SD1.x/SD2.x/SDXL configurations below or from the
``config.json`` files of a diffusers model folder, in about a second.
"""

from __future__ import annotations

import json
import os

import torch

from .errors import LohaError

#: UNet2DConditionModel arguments per family (what shapes and names depend on).
UNET_CONFIGS = {
    "sd1": {"cross_attention_dim": 768},
    "sd2": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
    "sdxl": {
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
#: Text encoders per family: pipeline attribute -> (CLIPTextConfig arguments, with projection).
TEXT_CONFIGS = {
    "sd1": {"text_encoder": (_CLIP_L, False)},
    "sd2": {"text_encoder": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                              "num_attention_heads": 16}, False)},
    "sdxl": {
        "text_encoder": (_CLIP_L, False),
        "text_encoder_2": ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                            "num_attention_heads": 20, "projection_dim": 1280}, True),
    },
}
#: Folders of a diffusers model that networks patch.
PARTS = ("unet", "text_encoder", "text_encoder_2")


def standard_modules(family: str) -> dict[str, torch.nn.Module]:
    """{"unet": …, "text_encoder": …[, "text_encoder_2": …]} of a family, on the meta device."""
    if family not in UNET_CONFIGS:
        raise LohaError(f"no standard architecture for family {family!r} (known: {', '.join(UNET_CONFIGS)})")
    UNet2DConditionModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection = _classes()
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**UNET_CONFIGS[family])}
        for attr, (config, projection) in TEXT_CONFIGS[family].items():
            cls = CLIPTextModelWithProjection if projection else CLIPTextModel
            modules[attr] = cls(CLIPTextConfig(**config))
    return modules


def folder_modules(folder: str) -> dict[str, torch.nn.Module]:
    """The UNet and text encoders of a diffusers model folder, from its configs, on the meta device."""
    from transformers import AutoConfig

    UNet2DConditionModel, _, CLIPTextModel, CLIPTextModelWithProjection = _classes()
    modules = {}
    with torch.device("meta"):
        for attr in PARTS:
            config_path = os.path.join(folder, attr, "config.json")
            if not os.path.isfile(config_path):
                continue
            if attr == "unet":
                with open(config_path, encoding="utf-8") as f:
                    modules[attr] = UNet2DConditionModel.from_config(json.load(f))
                continue
            config = AutoConfig.from_pretrained(os.path.join(folder, attr))
            projection = "CLIPTextModelWithProjection" in (config.architectures or ())
            modules[attr] = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    if not modules:
        raise LohaError(f"{folder}: not a diffusers model folder (no unet/ or text_encoder/ with a config.json)")
    return modules


def _classes():
    """The diffusers/transformers classes the structures are built from (an optional dependency)."""
    try:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as exc:
        raise LohaError(f"model structures need diffusers and transformers (pip install 'loha[diffusers]'): {exc}") from None
    return UNet2DConditionModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
