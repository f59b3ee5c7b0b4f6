"""Model structures without weights: diffusers/transformers modules on the meta device.

Converting between naming schemes (kohya ↔ PEFT), writing LoRA factors in the shapes
loaders expect, reading a checkpoint into modules: all need a base model's module
paths and weight shapes, never its weights. These build the modules on the meta
device from a configuration (`configs.PUBLISHED` for a family, or what a checkpoint's
shapes tell) or from the ``config.json`` files of a diffusers model folder, in about
a second.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import LohaError
from ..families import FAMILIES, PIPELINE_COMPONENTS, PROJECTED_TEXT_ENCODERS
from .configs import PUBLISHED, PUBLISHED_TRANSFORMERS


def require_diffusers(purpose: str) -> None:
    """Refuse in one line naming the extra where the optional diffusers/transformers are missing."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise LohaError(f"{purpose} needs diffusers and transformers ({exc.name} is missing): "
                        "pip install 'loha[diffusers]'") from None


def _classes():
    """The diffusers/transformers classes the structures are built from."""
    require_diffusers("building model structures")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return UNet2DConditionModel, AutoencoderKL, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def build_part(attr: str, config: dict) -> torch.nn.Module:
    """The diffusers/transformers module of pipeline attribute `attr` for `config`
    (on whatever device is current: wrap in ``torch.device("meta")`` for no weights)."""
    UNet2DConditionModel, AutoencoderKL, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection = _classes()
    if attr == "unet":
        return UNet2DConditionModel(**config)
    if attr == "vae":
        return AutoencoderKL(**config)
    cls = CLIPTextModelWithProjection if attr in PROJECTED_TEXT_ENCODERS else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def published_transformer(name: str) -> dict[str, torch.nn.Module]:
    """A published diffusion transformer and its text encoders by pipeline attribute, on the
    current device (wrap in ``torch.device("meta")`` for no weights); `configs.PUBLISHED_TRANSFORMERS`."""
    require_diffusers("building model structures")
    import diffusers
    import transformers

    if name not in PUBLISHED_TRANSFORMERS:
        raise LohaError(f"no published transformer {name!r} (known: {', '.join(PUBLISHED_TRANSFORMERS)})")
    parts = {}
    for attr, (cls_name, config) in PUBLISHED_TRANSFORMERS[name].items():
        if attr == "transformer":
            parts[attr] = getattr(diffusers, cls_name)(**config)
        else:
            cls = getattr(transformers, cls_name)
            parts[attr] = cls(cls.config_class(**config))
    return parts


def standard_modules(family: str) -> dict[str, torch.nn.Module]:
    """{"unet": …, "text_encoder": …[, "text_encoder_2": …]} of a family, on the meta device."""
    if family not in FAMILIES:
        raise LohaError(f"no standard architecture for family {family!r} (known: {', '.join(FAMILIES)})")
    with torch.device("meta"):
        return {attr: build_part(attr, config) for attr, config in PUBLISHED[family].items()
                if attr in PIPELINE_COMPONENTS}


def folder_modules(folder: str) -> dict[str, torch.nn.Module]:
    """The UNet and text encoders of a diffusers model folder, from its configs, on the meta device."""
    UNet2DConditionModel, _, _, CLIPTextModel, CLIPTextModelWithProjection = _classes()
    from transformers import AutoConfig

    modules = {}
    with torch.device("meta"):
        for attr in PIPELINE_COMPONENTS:
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
