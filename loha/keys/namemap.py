"""Which weight of a model a network file's module name means.

A network file names each module the way the tool that wrote it saw the model:
kohya's sd-scripts write ``lora_unet_`` + the diffusers path for SD1.x/SD2.x but the
LDM path for SDXL, LyCORIS' wrapper writes ``lycoris_`` + the diffusers path, text
encoders appear with and without ``text_model_`` (transformers 5 dropped that level
of ``CLIPTextModel``), and every ``.`` became ``_``.  Underscores also occur inside
path parts (``down_blocks``, ``to_q``), so a file name cannot be parsed back into a
path.  This module therefore works forward: it enumerates the weights the model
has, generates every spelling a file may use for each, and answers lookups from
that table.  A name that is in no spelling of any weight matches nothing.

Two model layouts are supported, each for SD1.x, SD2.x and SDXL:

* :func:`map_state_dict`: LDM/CompVis state dicts, as checkpoints on disk and
  ComfyUI hold them (OpenCLIP text encoders keep their fused ``in_proj_weight``;
  q/k/v become row slices of it).
* :func:`map_modules`: diffusers/transformers modules of a pipeline.

Block ids (``Target.block``) are `loha.keys.unet`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import LohaError
from ..families import (FAMILIES, KOHYA_UNET_LAYOUT, LYCORIS_PREFIX, PIPELINE_COMPONENTS, TEXT_MODEL_LEVEL,
                        TEXT_PREFIXES, UNET_PREFIX, UNET_STATE_PREFIXES, family_of_widths)
from .text import TEXT_PATH, TEXT_PROJECTION, shape_of, state_text_projections, state_text_weights, weight_path
from .unet import DIFFUSERS_ALIASES, unet_places

__all__ = ["Target", "NameMap", "map_state_dict", "map_modules", "bias_key"]


@dataclass(frozen=True)
class Target:
    """One patchable weight (or one q/k/v row slice of a fused OpenCLIP weight)."""

    component: str  # "unet", "te1" or "te2"
    path: str  # diffusers path (UNet) or HF CLIP path without "text_model." (encoders)
    key: str  # key of the whole weight tensor in the model's flat namespace
    rows: tuple[int, int] | None  # [start, stop) rows of that tensor, or None for all
    shape: tuple[int, ...]  # the shape ΔW must have (the slice's when rows is set)
    block: str  # block id for per-block strengths (see loha.keys.unet); "" for none
    transposed: bool = False  # the tensor is stored input-major (OpenCLIP's text_projection)


class NameMap:
    """Every spelling of every patchable weight of one model, for lookups by file name.

    `targets` are the Linear/Conv weights networks factor; `extra_targets` are weights only
    a network's dense changes reach (norm layers: lycoris ``train_norm``; text projections:
    OneTrainer): looked up the same way, but no trainer or converter plans for them.
    """

    def __init__(self, family: str, entries: Iterable[tuple[Target, list[str]]],
                 extras: Iterable[tuple[Target, list[str]]] = ()):
        self.family = family
        self.targets: list[Target] = []
        self.extra_targets: list[Target] = []
        self._names: dict[Target, list[str]] = {}
        self._by_name: dict[str, Target] = {}
        for is_extra, (target, names) in [*((False, e) for e in entries), *((True, e) for e in extras)]:
            (self.extra_targets if is_extra else self.targets).append(target)
            self._names[target] = names
            for name in names:
                other = self._by_name.setdefault(name, target)
                if other != target:
                    raise LohaError(
                        f"two weights answer to the name {name!r}: {other.key} and {target.key}"
                    )

    def lookup(self, name: str) -> Target | None:
        """The target a file's module name (the part before ``.hada_w1_a`` …) means, or None."""
        return self._by_name.get(name)

    def names(self, target: Target) -> list[str]:
        """Every spelling of ``target``; the first is the kohya name a tool would write."""
        return list(self._names[target])

    def __repr__(self) -> str:
        return f"NameMap({self.family!r}, {len(self.targets)} targets)"


def bias_key(weight_key: str) -> str:
    """The bias next to a weight (full-diff modules' ``diff_b`` goes there)."""
    return weight_key[: -len("weight")] + "bias"


# --------------------------------------------------------------------------- entry points


def map_state_dict(shapes: Mapping, *, family: str | None = None) -> NameMap:
    """Name map for an LDM/CompVis state dict (checkpoint or ComfyUI layout).

    ``shapes`` maps state-dict keys to tensors, to anything with ``.shape``, or to
    shape tuples; only the shapes of weight keys are read, so meta tensors and lazy
    mappings work.  ``Target.key`` is the state-dict key.  ``family`` skips detection.
    """
    unet, norms = {}, {}
    for key in shapes:
        ldm_path = weight_path(key, UNET_STATE_PREFIXES)
        if ldm_path is not None:
            shape = shape_of(shapes[key])
            (unet if len(shape) >= 2 else norms if len(shape) == 1 else {})[ldm_path] = (key, shape)
    return _build(unet, from_ldm=True, text=list(state_text_weights(shapes)), family=family,
                  norms=norms, projections=list(state_text_projections(shapes)))


def map_modules(modules: Mapping, *, family: str | None = None) -> NameMap:
    """Name map for diffusers/transformers modules keyed by pipeline attribute.

    ``modules`` is like ``{"unet": …, "text_encoder": …, "text_encoder_2": …}`` (any
    subset; other keys such as ``vae`` and None values are ignored, so
    ``pipe.components`` works).  ``Target.key`` is ``f"{attr}.{module_path}.weight"``.
    Text encoders may have a ``text_model.`` level (transformers 4, and
    ``CLIPTextModelWithProjection``) or not (``CLIPTextModel`` on transformers 5).
    """
    unet, norms = {}, {}
    text, projections = [], []
    for attr, model in modules.items():
        component = PIPELINE_COMPONENTS.get(attr)
        if component is None or model is None:
            continue
        for path, module in model.named_modules():
            key = f"{attr}.{path}.weight"
            if component == "unet" and _norm_shape(module) is not None:
                norms[path] = (key, _norm_shape(module))
            shape = _patchable_shape(module)
            if shape is None:
                continue
            if component == "unet":
                unet[path] = (key, shape)
            elif match := TEXT_PATH.fullmatch(path.removeprefix(TEXT_MODEL_LEVEL)):
                text.append((component, match.group(0), key, None, shape))
            elif path == TEXT_PROJECTION:
                projections.append((component, key, False, shape))
    return _build(unet, from_ldm=False, text=text, family=family, norms=norms, projections=projections)


# --------------------------------------------------------------------------- reading models


def _norm_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """Weight shape of a GroupNorm/LayerNorm with a learned scale, None for anything else."""
    if not isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return None
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if weight is not None and weight.dim() == 1 else None


def _patchable_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """Weight shape of a Linear/Conv module, None for anything else."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return None
    weight = module.weight
    return tuple(weight.shape) if weight is not None and weight.dim() >= 2 else None


# --------------------------------------------------------------------------- building the map


def _build(unet: Mapping, from_ldm: bool, text: list, family: str | None, norms: Mapping | None = None,
           projections: list = ()) -> NameMap:
    """Targets and spellings for a model's UNet weights and text-encoder weights.

    ``unet`` maps module paths (LDM paths if ``from_ldm``, else diffusers paths) to
    (key, shape); ``text`` holds (component, HF path, key, rows, shape) tuples.
    ``norms`` (UNet norm layers, as ``unet``) and ``projections`` ((component, key,
    transposed, stored shape) of text projections) become extra targets.
    """
    if family is None:
        family = family_of_widths(_context_dim(unet), _text_widths(text))
    elif family not in FAMILIES:
        raise LohaError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")

    place_of = unet_places(unet, from_ldm=from_ldm)
    entries = []
    for path, (key, shape) in unet.items():
        place = place_of(path)
        if place is not None:
            target = Target("unet", place.diffusers, key, None, shape, place.block)
            entries.append((target, _unet_names(family, place.diffusers, place.ldm)))
    for component, path, key, rows, shape in text:
        target = Target(component, path, key, rows, shape, "BASE")
        entries.append((target, _text_names(family, component, path)))
    extras = []
    for path, (key, shape) in (norms or {}).items():
        place = place_of(path)
        if place is not None:
            target = Target("unet", place.diffusers, key, None, shape, place.block)
            extras.append((target, _unet_names(family, place.diffusers, place.ldm)))
    for component, key, transposed, shape in projections:
        if component not in TEXT_PREFIXES[family] or len(shape) != 2:
            continue
        shape = (shape[1], shape[0]) if transposed else shape
        target = Target(component, TEXT_PROJECTION, key, None, shape, "BASE", transposed)
        extras.append((target, _text_names(family, component, TEXT_PROJECTION)))
    return NameMap(family, entries, extras)


def _context_dim(unet: Mapping) -> int | None:
    for path, (_, shape) in unet.items():
        if path.endswith("attn2.to_k"):
            return shape[1]
    return None


def _text_widths(text: list) -> dict[str, int]:
    return {
        component: shape[0]
        for component, path, _, _, shape in text
        if path.endswith("self_attn.q_proj")
    }


def _unet_names(family: str, diffusers_path: str, ldm_path: str) -> list[str]:
    diffusers_name = diffusers_path.replace(".", "_")
    ldm_name = ldm_path.replace(".", "_")
    kohya = [UNET_PREFIX + diffusers_name, UNET_PREFIX + ldm_name]
    if KOHYA_UNET_LAYOUT[family] == "ldm":
        kohya.reverse()
    names = [*kohya, LYCORIS_PREFIX + diffusers_name]
    first, _, rest = diffusers_path.partition(".")
    if first in DIFFUSERS_ALIASES:
        alias = f"{DIFFUSERS_ALIASES[first]}.{rest}".replace(".", "_")
        names += [UNET_PREFIX + alias, LYCORIS_PREFIX + alias]
    return names


def _text_names(family: str, component: str, path: str) -> list[str]:
    prefixes = TEXT_PREFIXES[family].get(component)
    if prefixes is None:
        raise LohaError(f"a {family} model has no text encoder {component!r}")
    name = path.replace(".", "_")
    level = TEXT_MODEL_LEVEL.replace(".", "_")
    return [prefix + middle + name for prefix in prefixes for middle in (level, "")]
