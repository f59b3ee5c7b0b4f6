"""Which weight of a model a network file's module name means.

A network file names each module the way the tool that wrote it saw the model:
kohya's sd-scripts write ``lora_unet_`` + the diffusers path for SD1.x/SD2.x but the
LDM path for SDXL and the checkpoint path for Flux and SD3, LyCORIS' wrapper
(SimpleTuner) writes ``lycoris_`` + the diffusers path, OneTrainer ``lora_transformer_``,
diffusers and ai-toolkit ``transformer.`` + the path as it is, text encoders appear with
and without ``text_model_`` (transformers 5 dropped that level of ``CLIPTextModel``),
and every ``.`` became ``_`` where an underscore prefix is used. Underscores also occur
inside path parts (``down_blocks``, ``to_q``), so a file name cannot be parsed back into
a path. This module therefore works forward: it enumerates the weights the model has,
generates every spelling a file may use for each from its module path, and answers
lookups from that table. A name that is in no spelling of any weight matches nothing.

No family is needed: any module tree, or any state dict, is mapped by its own paths.
Families add what paths alone cannot say:

* SD1.x/SD2.x/SDXL UNets answer to both their diffusers and their LDM paths, with
  block ids for per-block strengths (`loha.keys.unet`);
* Flux and SD3/3.5 checkpoints fuse weights diffusers keeps apart: a diffusers-named
  module lands on rows of a fused weight, a checkpoint-named one spans several
  diffusers weights (`loha.keys.layouts`, `Target.pieces`);
* OpenCLIP text encoders fuse q/k/v (`loha.keys.text`).

Beside the weights networks factor (`NameMap.targets`), norm layers and CLIP text
projections are extra targets (`NameMap.extra_targets`): only dense changes reach them
(lycoris ``train_norm``'s ``w_norm``/``b_norm``; OneTrainer's ``text_projection``).

Two entry points: :func:`map_state_dict` for state dicts (checkpoints on disk, ComfyUI
and Forge models, a diffusion model's own file) and :func:`map_modules` for modules
keyed by pipeline attribute (diffusers/transformers models, any ``nn.Module``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import LohaError
from ..families import (COMFY_DENOISER_PREFIX, DENOISER_PREFIXES, FAMILIES, KNOWN_FAMILIES, KOHYA_UNET_LAYOUT,
                        LAYOUT_FAMILIES, LYCORIS_PREFIX, PART_COMPONENTS, PEFT_PREFIX, TEXT_ATTRIBUTES,
                        TEXT_MODEL_LEVEL, UNET_PREFIX, UNET_STATE_PREFIXES, family_of_names, sd_family,
                        text_prefixes)
from . import layouts
from .text import (COMFY_TEXT_PREFIX, T5_PATH, TEXT_PATH, TEXT_PROJECTION, shape_of, state_text_projections,
                   state_text_weights, weight_path)
from .unet import DIFFUSERS_ALIASES, unet_places

__all__ = ["Target", "NameMap", "map_state_dict", "map_modules", "bias_key"]

#: Where SD UNet paths begin, in either layout.
_SD_UNET_STARTS = {"ldm": ("input_blocks.", "middle_block.", "output_blocks."),
                   "diffusers": ("down_blocks.", "mid_block.", "up_blocks.")}


@dataclass(frozen=True)
class Target:
    """One patchable weight, a row slice of one, or (``pieces``) rows of several.

    A name for a module a checkpoint fuses but the model keeps apart (kohya's
    ``double_blocks_0_img_attn_qkv`` on a diffusers Flux) has ``pieces``: ΔW's rows go
    to them in order, each piece a plain target; ``key`` then lists their keys.
    """

    component: str  # "unet" (the diffusion model), "te1", "te2" or "te3"
    path: str  # diffusers path (SD UNet, DiT), HF path without "text_model." (encoders), or the module path
    key: str  # key of the whole weight tensor in the model's flat namespace
    rows: tuple[int, int] | None  # [start, stop) rows of that tensor, or None for all
    shape: tuple[int, ...]  # the shape ΔW must have (the slice's when rows is set)
    block: str  # block id for per-block strengths (SD, see loha.keys.unet), else ""
    pieces: tuple[Target, ...] = ()
    transposed: bool = False  # the tensor is stored input-major (OpenCLIP's text_projection)


def pieces_target(component: str, path: str, pieces: Iterable[Target]) -> Target:
    """A target over several weights (or row blocks of them), stacked in the order given."""
    pieces = tuple(pieces)
    if len(pieces) == 1 and pieces[0].path == path:
        return pieces[0]
    rows = sum(piece.shape[0] for piece in pieces)
    key = " + ".join(piece.key if piece.rows is None else f"{piece.key}[{piece.rows[0]}:{piece.rows[1]}]"
                     for piece in pieces)
    return Target(component, path, key, None, (rows, *pieces[0].shape[1:]), pieces[0].block, pieces)


class NameMap:
    """Every spelling of every patchable weight of one model, for lookups by file name.

    A spelling two weights share (an odd model whose paths differ only in "." against
    "_") belongs to neither: `lookup` gives None and `ambiguous` names both keys.
    `targets` are the Linear/Conv weights networks factor; `extra_targets` (norm layers,
    text projections) are looked up the same way, but no converter plans for them (the trainer
    trains norm layers only under ``train_norm``).
    """

    def __init__(self, family: str | None, entries: Iterable[tuple[Target, list[str]]],
                 extras: Iterable[tuple[Target, list[str]]] = ()):
        self.family = family
        self.targets: list[Target] = []
        self.extra_targets: list[Target] = []
        self._names: dict[Target, list[str]] = {}
        self._by_name: dict[str, Target] = {}
        self._ambiguous: dict[str, list[str]] = {}
        for target, names in entries:
            self._add(target, names)
        for target, names in extras:
            self._add(target, names, extra=True)

    def _add(self, target: Target, names: Iterable[str], extra: bool = False) -> list[str]:
        if target not in self._names:
            (self.extra_targets if extra else self.targets).append(target)
            self._names[target] = []
        added = []
        for name in names:
            if name in self._ambiguous:
                self._ambiguous[name].append(target.key)
                continue
            other = self._by_name.setdefault(name, target)
            if other != target:
                del self._by_name[name]
                self._names[other].remove(name)
                self._ambiguous[name] = [other.key, target.key]
            elif name not in self._names[target]:
                self._names[target].append(name)
                added.append(name)
        return added

    def lookup(self, name: str) -> Target | None:
        """The target a file's module name (the part before ``.hada_w1_a`` …) means, or None."""
        return self._by_name.get(name)

    def ambiguous(self, name: str) -> list[str]:
        """The keys of the weights that share `name` (empty when it is not shared)."""
        return list(self._ambiguous.get(name, ()))

    def names(self, target: Target) -> list[str]:
        """Every spelling of ``target``; the first is the kohya name a tool would write."""
        return list(self._names[target])

    def extend(self, extra: Mapping[str, Target]) -> list[str]:
        """Add names from elsewhere (a host's own key map) where this map has none; returns those added."""
        added = []
        for name, target in extra.items():
            if name not in self._by_name and name not in self._ambiguous:
                added += self._add(target, [name])
        return added

    def __repr__(self) -> str:
        return f"NameMap({self.family!r}, {len(self.targets)} targets)"


def bias_key(weight_key: str) -> str:
    """The bias next to a weight (full-diff modules' ``diff_b`` goes there)."""
    return weight_key[: -len("weight")] + "bias"


# --------------------------------------------------------------------------- entry points


def map_state_dict(shapes: Mapping, *, family: str | None = None) -> NameMap:
    """Name map for a state dict: a checkpoint, a host's live model, a diffusion model's own file.

    ``shapes`` maps state-dict keys to tensors, to anything with ``.shape``, or to
    shape tuples; only the shapes of weight keys are read, so meta tensors and lazy
    mappings work. The diffusion model sits under ``model.diffusion_model.`` or
    ``diffusion_model.``, or is the whole dict when nothing sits under a known prefix
    (Flux's own file, a diffusers transformer's); text encoders where
    `loha.keys.text.TEXT_STATE_SOURCES` says. ``Target.key`` is the state-dict key.
    ``family`` skips detection.
    """
    denoiser = _weights(shapes, UNET_STATE_PREFIXES)
    norms = _weights(shapes, UNET_STATE_PREFIXES, dims=1)
    text: dict[str, _Encoder] = {}
    for component, kind, *weight in state_text_weights(shapes):
        encoder = text.setdefault(component, _Encoder(component, kind, TEXT_ATTRIBUTES[component], [], True))
        encoder.weights.append(tuple(weight))
    if not denoiser and not text:
        denoiser, norms = _weights(shapes, ("",)), _weights(shapes, ("",), dims=1)
    return _build([("", denoiser, norms)] if denoiser else [], list(text.values()), family,
                  list(state_text_projections(shapes)))


def map_modules(modules: Mapping, *, family: str | None = None) -> NameMap:
    """Name map for modules keyed by pipeline attribute.

    ``modules`` is like ``{"transformer": …, "text_encoder": …, "text_encoder_2": …}``
    (any subset of `loha.families.PART_COMPONENTS`' attributes; other keys such as
    ``vae`` and None values are ignored, so ``pipe.components`` works). Every Linear and
    Conv weight of the diffusion model is a target; of a CLIP encoder its attention and
    MLP projections, of a T5 its attention and feed-forward projections, of any other
    encoder every Linear. ``Target.key`` is ``f"{attr}.{module_path}.weight"``. CLIP
    encoders may have a ``text_model.`` level (transformers 4, and
    ``CLIPTextModelWithProjection``) or not (``CLIPTextModel`` on transformers 5).
    """
    denoisers, text, projections = [], [], []
    for attr, model in modules.items():
        component = PART_COMPONENTS.get(attr)
        if component is None or model is None:
            continue
        weights = {path: (f"{attr}.{path}.weight", shape) for path, module in model.named_modules()
                   if (shape := _patchable_shape(module)) is not None}
        if component == "unet":
            norms = {path: (f"{attr}.{path}.weight", shape) for path, module in model.named_modules()
                     if (shape := _norm_shape(module)) is not None}
            denoisers.append((attr, weights, norms))
            continue
        encoder = _module_encoder(component, attr, weights)
        text.append(encoder)
        if encoder.kind == "clip" and TEXT_PROJECTION in weights:
            key, shape = weights[TEXT_PROJECTION]
            projections.append((component, key, False, shape))
    return _build(denoisers, text, family, projections)


# --------------------------------------------------------------------------- reading models


def _patchable_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """Weight shape of a Linear/Conv module, None for anything else."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return None
    weight = module.weight
    return tuple(weight.shape) if weight is not None and weight.dim() >= 2 else None


def _norm_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """Weight shape of a GroupNorm/LayerNorm with a learned scale, None for anything else."""
    if not isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return None
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if weight is not None and weight.dim() == 1 else None


def _weights(shapes: Mapping, prefixes: Iterable[str], dims: int = 2) -> dict[str, tuple[str, tuple]]:
    """{module path: (key, shape)} of the weights under one of `prefixes`: 2-D and up, or (`dims`=1)
    the 1-D ones, which in a diffusion model are its norm layers'."""
    found = {}
    for key in shapes:
        path = weight_path(key, prefixes)
        if path is not None:
            shape = shape_of(shapes[key])
            if (len(shape) >= 2) if dims == 2 else len(shape) == dims:
                found[path] = (key, shape)
    return found


@dataclass
class _Encoder:
    """One text encoder's patchable weights: (path, key, rows, shape) each."""

    component: str
    kind: str  # "clip" (HF CLIP paths without text_model.), "t5", or "other"
    attr: str
    weights: list[tuple]
    from_state: bool = False  # keys are a state dict's (ComfyUI's generic names apply)


def _module_encoder(component: str, attr: str, weights: Mapping[str, tuple]) -> _Encoder:
    """The patchable weights of a text-encoder module, by what kind of encoder its paths say it is."""
    clip = {path.removeprefix(TEXT_MODEL_LEVEL): value for path, value in weights.items()
            if TEXT_PATH.fullmatch(path.removeprefix(TEXT_MODEL_LEVEL))}
    if clip:
        return _Encoder(component, "clip", attr, [(p, key, None, shape) for p, (key, shape) in clip.items()])
    t5 = [(p, key, None, shape) for p, (key, shape) in weights.items() if T5_PATH.fullmatch(p)]
    if t5:
        return _Encoder(component, "t5", attr, t5)
    return _Encoder(component, "other", attr, [(p, key, None, shape) for p, (key, shape) in weights.items()])


# --------------------------------------------------------------------------- building the map


def _build(denoisers: list[tuple[str, dict, dict]], text: list[_Encoder], family: str | None,
           projections: list = ()) -> NameMap:
    """Targets and spellings for a model's diffusion-model weights and text-encoder weights.

    ``denoisers`` holds (pipeline attribute or "" for a state dict, {path: (key, shape)} of
    its weights, the same of its norm layers); ``projections`` (component, key, transposed,
    stored shape) of CLIP text projections. Norms and projections become extra targets.
    """
    if family is not None and family not in KNOWN_FAMILIES:
        raise LohaError(f"unknown model family {family!r} (known: {', '.join(KNOWN_FAMILIES)})")
    entries: list[tuple[Target, list[str]]] = []
    extras: list[tuple[Target, list[str]]] = []
    detected = None
    for attr, weights, norms in denoisers:
        found, part_entries, part_extras = _denoiser_entries(attr, weights, norms, family)
        detected = detected or found
        entries += part_entries
        extras += part_extras
    if family is None:
        family = detected or _text_family(text)
    single = family in ("sd1", "sd2") if family in FAMILIES else len(text) == 1
    block = "BASE" if family in FAMILIES else ""
    for encoder in text:
        for path, key, rows, shape in encoder.weights:
            target = Target(encoder.component, path, key, rows, shape, block)
            entries.append((target, _text_names(encoder, path, key, single)))
    clips = {encoder.component: encoder for encoder in text if encoder.kind == "clip"}
    for component, key, transposed, shape in projections:
        encoder = clips.get(component)
        if encoder is not None:
            shape = (shape[1], shape[0]) if transposed else shape
            target = Target(component, TEXT_PROJECTION, key, None, shape, block, transposed=transposed)
            extras.append((target, _text_names(encoder, TEXT_PROJECTION, key, single)))
    return NameMap(family, entries, extras)


def _text_family(text: list[_Encoder]) -> str | None:
    """SD's family from its CLIP encoders alone (no diffusion model given)."""
    if not text or any(encoder.kind != "clip" for encoder in text):
        return None
    return sd_family(None, _text_widths(text))


def _text_widths(text: list[_Encoder]) -> dict[str, int]:
    return {encoder.component: shape[0] for encoder in text if encoder.kind == "clip"
            for path, _, _, shape in encoder.weights if path.endswith("self_attn.q_proj")}


def _denoiser_entries(attr: str, weights: dict, norms: dict, family: str | None):
    """(detected family, entries, extra entries of its norms) of one diffusion model: SD UNet,
    fused layout, or plain paths."""
    paths = list(weights)
    sd_side = next((side for side, starts in _SD_UNET_STARTS.items() if any(p.startswith(starts) for p in paths)), None)
    if sd_side is not None and family not in LAYOUT_FAMILIES:
        detected = family or sd_family(_context_dim(weights), {})
        place_of = unet_places(weights, from_ldm=sd_side == "ldm")
        entries = _sd_unet_entries(attr or "unet", weights, place_of, family or detected)
        return detected, entries, _sd_unet_entries(attr or "unet", norms, place_of, family or detected)
    plain_norms = [(_plain(path, key, shape), _denoiser_names(attr or "transformer", path, path, path))
                   for path, (key, shape) in norms.items()]
    shapes = {path: shape for path, (_, shape) in weights.items()}
    for side in ("checkpoint", "diffusers"):
        layout = layouts.find_layout(paths, side) if family not in LAYOUT_FAMILIES else (
            next(lay for lay in layouts.LAYOUTS if lay.family == family))
        placed = layouts.place(layout, shapes, side) if layout is not None else []
        if placed:
            return layout.family, _layout_entries(attr or "transformer", weights, placed, side), plain_norms
    return family_of_names(paths), [(_plain(path, key, shape), _denoiser_names(attr or "transformer", path, path, path))
                                    for path, (key, shape) in weights.items()], plain_norms


def _plain(path: str, key: str, shape: tuple, rows=None, block: str = "") -> Target:
    return Target("unet", path, key, rows, shape, block)


def _context_dim(weights: Mapping) -> int | None:
    for path, (_, shape) in weights.items():
        if path.endswith("attn2.to_k"):
            return shape[1]
    return None


def _sd_unet_entries(attr: str, weights: dict, place_of, family: str | None) -> list:
    """SD UNet weights under their diffusers and LDM paths (`place_of` translates), with block ids."""
    ldm_first = KOHYA_UNET_LAYOUT.get(family) == "ldm"
    entries = []
    for path, (key, shape) in weights.items():
        place = place_of(path)
        if place is None:  # not a part of SD's UNet structure: its own path names it
            entries.append((_plain(path, key, shape), _denoiser_names(attr, path, path, path)))
            continue
        kohya = place.ldm if ldm_first else place.diffusers
        names = _denoiser_names(attr, kohya, place.diffusers, place.ldm) + _processor_names(attr, place.diffusers)
        entries.append((_plain(place.diffusers, key, shape, block=place.block), names + _alias_names(place.diffusers)))
    return entries


def _alias_names(path: str) -> list[str]:
    """kohya/LyCORIS spellings under another diffusers name of the path's first part
    (SDXL's ``add_embedding`` as ``class_embedding``, which ComfyUI accepts)."""
    first, _, rest = path.partition(".")
    if first not in DIFFUSERS_ALIASES:
        return []
    alias = _under(f"{DIFFUSERS_ALIASES[first]}.{rest}")
    return [UNET_PREFIX + alias, LYCORIS_PREFIX + alias]


def _processor_names(attr: str, path: str) -> list[str]:
    """diffusers' attention-processor LoRA spelling (``attn1.processor.to_q``, ``….processor.to_out``),
    bare and under the attribute, as ComfyUI reads it for SD UNets."""
    if ".to_" not in path:
        return []
    processor = path.replace(".to_", ".processor.to_")
    if processor.endswith(".to_out.0"):
        processor = processor.removesuffix(".0")
    return [processor, f"{attr}.{processor}"]


def _layout_entries(attr: str, weights: dict, placed: list, side: str) -> list:
    """Targets of a model with a fused checkpoint layout (`loha.keys.layouts`), seen from `side`.

    From the checkpoint side each fused weight is a target under its checkpoint names and
    each diffusers weight a row slice of it (or, swapped, two row blocks) under its
    diffusers names; from the diffusers side each diffusers weight is a target and each
    fused weight a target over their rows. A one-part entry that is a plain rename is a
    single target under both names.
    """
    entries, consumed = [], set()
    for fused in placed:
        renamed = len(fused.segments) == 1
        if side == "checkpoint":
            key, shape = weights[fused.checkpoint]
            consumed.add(fused.checkpoint)
            if renamed:
                part = fused.segments[0].part
                entries.append((_plain(part, key, shape), _denoiser_names(attr, fused.checkpoint, part, fused.checkpoint)))
                continue
            entries.append((_plain(fused.checkpoint, key, shape),
                            _denoiser_names(attr, fused.checkpoint, None, fused.checkpoint)))
            for part in dict.fromkeys(segment.part for segment in fused.segments):
                blocks = sorted((s for s in fused.segments if s.part == part), key=lambda s: s.part_rows)
                pieces = [_plain(part, key, (s.stop - s.start, *shape[1:]), rows=(s.start, s.stop)) for s in blocks]
                entries.append((pieces_target("unet", part, pieces), _denoiser_names(attr, part, part, None)))
        else:
            consumed.update(segment.part for segment in fused.segments)
            if renamed:
                part = fused.segments[0].part
                key, shape = weights[part]
                entries.append((_plain(part, key, shape), _denoiser_names(attr, fused.checkpoint, part, fused.checkpoint)))
                continue
            pieces = []
            for segment in fused.segments:
                key, shape = weights[segment.part]
                whole = segment.part_rows == (0, shape[0])
                pieces.append(_plain(segment.part, key, (segment.stop - segment.start, *shape[1:]),
                                     rows=None if whole else segment.part_rows))
            entries.append((pieces_target("unet", fused.checkpoint, pieces),
                            _denoiser_names(attr, fused.checkpoint, None, fused.checkpoint)))
    for path, (key, shape) in weights.items():
        if path not in consumed or side == "diffusers":
            names = _denoiser_names(attr, path, path, path if path not in consumed else None)
            entries.append((_plain(path, key, shape), names))
    return entries


def _under(path: str) -> str:
    return path.replace(".", "_")


def _denoiser_names(attr: str, kohya: str, diffusers: str | None, checkpoint: str | None) -> list[str]:
    """Every spelling of a diffusion-model weight; the first is kohya's (``lora_unet_`` + `kohya`).

    `diffusers` is its diffusers module path, `checkpoint` its path in the checkpoint
    and host layout (LDM for SD, BFL for Flux, MMDiT for SD3), either None where the
    weight has none (a fused weight has no diffusers path, its row slices no
    checkpoint path). `attr` is the pipeline attribute for diffusers-style names.
    """
    paths = list(dict.fromkeys(p for p in (kohya, diffusers, checkpoint) if p))
    names = [UNET_PREFIX + _under(p) for p in paths]
    if diffusers:
        names.append(LYCORIS_PREFIX + _under(diffusers))
        names.append(f"{attr}.{diffusers}")
    names += [prefix + _under(p) for prefix in DENOISER_PREFIXES for p in paths]
    names += [PEFT_PREFIX + p for p in paths]
    if checkpoint:
        names.append(COMFY_DENOISER_PREFIX + checkpoint)
    return names + paths


def _text_names(encoder: _Encoder, path: str, key: str, single: bool) -> list[str]:
    """Every spelling of a text-encoder weight; the first is kohya's. In a state dict, also
    ComfyUI's generic ``text_encoders.`` + key (its own layout: ``clip_l.transformer.…``)."""
    levels = (TEXT_MODEL_LEVEL, "") if encoder.kind == "clip" else ("",)
    prefixes = text_prefixes(encoder.component, single, t5=encoder.kind == "t5")
    names = [prefix + _under(level + path) for prefix in prefixes for level in levels]
    names += [f"{encoder.attr}.{level}{path}" for level in levels]
    if encoder.from_state and not key.startswith(COMFY_TEXT_PREFIX):
        names.append(COMFY_TEXT_PREFIX + key.removesuffix(".weight"))
    return names
