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

Block ids (for per-block strengths) follow the LDM UNet, whatever the layout:

=========================================  ===========================================
weights                                    block
=========================================  ===========================================
text encoders                              ``BASE``
``time_embed`` / ``time_embedding``,       ``BASE`` (they condition every block)
``label_emb`` / ``add_embedding`` (SDXL)
``conv_in`` (``input_blocks.0.0``)         ``IN00``
``input_blocks.N`` (resnets, attentions,   ``IN{N:02d}``
downsamplers)
``middle_block``                           ``MID``
``output_blocks.N`` (resnets, attentions,  ``OUT{N:02d}``
upsamplers)
``conv_out`` (``out.2``)                   the last output block: ``OUT11`` for
                                           SD1.x/SD2.x, ``OUT08`` for SDXL
=========================================  ===========================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import LohaError

__all__ = [
    "Target", "NameMap", "map_state_dict", "map_modules", "detect_family", "unet_key_map", "FAMILIES",
]


# --------------------------------------------------------------------------- tables

#: Model families, told apart by the UNet's cross-attention context width.
FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
#: Without a UNet: the width of a single text encoder (two encoders mean SDXL).
FAMILY_BY_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}
FAMILIES = tuple(FAMILY_BY_CONTEXT_DIM.values())

#: Which UNet path kohya writes per family (the first spelling of a UNet target).
KOHYA_UNET_LAYOUT = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "ldm"}
UNET_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"

#: Text-encoder prefixes per family and component, the one kohya writes first.
#: Like ComfyUI, the first encoder also answers to the other single/first prefix.
TEXT_PREFIXES = {
    "sd1": {"te1": ("lora_te_", "lora_te1_")},
    "sd2": {"te1": ("lora_te_", "lora_te1_")},
    "sdxl": {"te1": ("lora_te1_", "lora_te_"), "te2": ("lora_te2_",)},
}
#: Files write text-encoder paths with and without transformers' ``text_model`` level.
TEXT_MODEL_LEVEL = "text_model."

#: HF CLIP layer modules whose q/k/v thirds OpenCLIP fuses into ``attn.in_proj_*``, in order.
OPENCLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
#: The other HF CLIP layer modules -> OpenCLIP resblock modules (norms included).
OPENCLIP_MODULES = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
#: Patchable text-encoder modules (HF CLIP names, relative to an encoder layer) and
#: where each lives in an OpenCLIP layer: (parameter, index of the q/k/v third of the
#: fused in-projection or None).  Embeddings, norms and ``text_projection`` (stored
#: transposed by OpenCLIP, targeted by no trainer) are not patched.
TEXT_PARTS = {
    **{part: ("attn.in_proj_weight", third) for third, part in enumerate(OPENCLIP_QKV)},
    **{part: (OPENCLIP_MODULES[part] + ".weight", None) for part in ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")},
}
_TEXT_PATH = re.compile(
    r"encoder\.layers\.(\d+)\.(" + "|".join(re.escape(p) for p in TEXT_PARTS) + r")"
)
_OPENCLIP_PARAM = re.compile(r"resblocks\.(\d+)\.(.+)")

#: Where the UNet sits in an LDM state dict: checkpoints, ComfyUI's live model.
UNET_STATE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: Where text encoders sit in an LDM state dict: (prefix, component, layout).
#: "hf" = HF CLIP names (with or without ``text_model.``), "openclip" = resblocks.
#: Checkpoints first, then live models: ComfyUI converts OpenCLIP to HF names on
#: load; the WebUI wraps each encoder in a module whose ``wrapped`` is the original.
TEXT_STATE_SOURCES = (
    ("cond_stage_model.transformer.", "te1", "hf"),  # SD1.x
    ("cond_stage_model.model.transformer.", "te1", "openclip"),  # SD2.x
    ("conditioner.embedders.0.transformer.", "te1", "hf"),  # SDXL CLIP-L
    ("conditioner.embedders.1.model.transformer.", "te2", "openclip"),  # SDXL bigG
    ("clip_l.transformer.", "te1", "hf"),  # ComfyUI (SD1.x, SDXL)
    ("clip_h.transformer.", "te1", "hf"),  # ComfyUI (SD2.x)
    ("clip_g.transformer.", "te2", "hf"),  # ComfyUI (SDXL)
    ("cond_stage_model.wrapped.transformer.", "te1", "hf"),  # WebUI, hijacked SD1.x
    ("cond_stage_model.wrapped.model.transformer.", "te1", "openclip"),  # WebUI SD2.x
    ("conditioner.embedders.0.wrapped.transformer.", "te1", "hf"),  # WebUI SDXL
    ("conditioner.embedders.1.wrapped.model.transformer.", "te2", "openclip"),  # WebUI SDXL
)
#: diffusers pipeline attribute -> component.
MODULE_COMPONENTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}

#: Resnet parts: diffusers name -> LDM name (norms carry no patchable weight).
RESNET_PARTS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
#: Resnet norms: no patchable weight, but whole-checkpoint conversion renames them too.
RESNET_NORMS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}
_RESNET_RENAMES = {**RESNET_PARTS, **RESNET_NORMS}
_RESNET_RENAMES_FROM_LDM = {ldm: diffusers for diffusers, ldm in _RESNET_RENAMES.items()}

#: UNet modules outside the level structure: (diffusers path, LDM path, block).
FIXED_UNET_PAIRS = (
    ("conv_in", "input_blocks.0.0", "IN00"),
    ("time_embedding.linear_1", "time_embed.0", "BASE"),
    ("time_embedding.linear_2", "time_embed.2", "BASE"),
    ("add_embedding.linear_1", "label_emb.0.0", "BASE"),
    ("add_embedding.linear_2", "label_emb.0.2", "BASE"),
)
#: The mid block: (diffusers path, LDM path, is a resnet).
MID_UNET_PAIRS = (
    ("mid_block.resnets.0", "middle_block.0", True),
    ("mid_block.attentions.0", "middle_block.1", False),
    ("mid_block.resnets.1", "middle_block.2", True),
)
_DIFFUSERS_LEVEL = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\."
)
_LDM_LEVEL = re.compile(r"(input|output)_blocks\.(\d+)\.(\d+)\.(\w+)")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Target:
    """One patchable weight (or one q/k/v row slice of a fused OpenCLIP weight)."""

    component: str  # "unet", "te1" or "te2"
    path: str  # diffusers path (UNet) or HF CLIP path without "text_model." (encoders)
    key: str  # key of the whole weight tensor in the model's flat namespace
    rows: tuple[int, int] | None  # [start, stop) rows of that tensor, or None for all
    shape: tuple[int, ...]  # the shape ΔW must have (the slice's when rows is set)
    block: str  # block id for per-block strengths (see the module docstring)


class NameMap:
    """Every spelling of every patchable weight of one model, for lookups by file name."""

    def __init__(self, family: str, entries: Iterable[tuple[Target, list[str]]]):
        self.family = family
        self.targets: list[Target] = []
        self._names: dict[Target, list[str]] = {}
        self._by_name: dict[str, Target] = {}
        for target, names in entries:
            self.targets.append(target)
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


# --------------------------------------------------------------------------- entry points


def map_state_dict(shapes: Mapping, *, family: str | None = None) -> NameMap:
    """Name map for an LDM/CompVis state dict (checkpoint or ComfyUI layout).

    ``shapes`` maps state-dict keys to tensors, to anything with ``.shape``, or to
    shape tuples; only the shapes of weight keys are read, so meta tensors and lazy
    mappings work.  ``Target.key`` is the state-dict key.  ``family`` skips detection.
    """
    unet = {}
    for key in shapes:
        ldm_path = _weight_path(key, UNET_STATE_PREFIXES)
        if ldm_path is not None:
            shape = _shape(shapes[key])
            if len(shape) >= 2:
                unet[ldm_path] = (key, shape)
    text = []
    for prefix, component, layout in TEXT_STATE_SOURCES:
        keys = [key for key in shapes if key.startswith(prefix)]
        read = _hf_text_weights if layout == "hf" else _openclip_text_weights
        text += [(component, *weight) for weight in read(prefix, keys, shapes)]
    pairs = _unet_pairs(_layout_from_ldm(unet))
    return _build(unet, pairs, by_ldm=True, text=text, family=family)


def map_modules(modules: Mapping, *, family: str | None = None) -> NameMap:
    """Name map for diffusers/transformers modules keyed by pipeline attribute.

    ``modules`` is like ``{"unet": …, "text_encoder": …, "text_encoder_2": …}`` (any
    subset; other keys such as ``vae`` and None values are ignored, so
    ``pipe.components`` works).  ``Target.key`` is ``f"{attr}.{module_path}.weight"``.
    Text encoders may have a ``text_model.`` level (transformers 4, and
    ``CLIPTextModelWithProjection``) or not (``CLIPTextModel`` on transformers 5).
    """
    unet = {}
    text = []
    for attr, model in modules.items():
        component = MODULE_COMPONENTS.get(attr)
        if component is None or model is None:
            continue
        for path, module in model.named_modules():
            shape = _patchable_shape(module)
            if shape is None:
                continue
            key = f"{attr}.{path}.weight"
            if component == "unet":
                unet[path] = (key, shape)
            elif match := _TEXT_PATH.fullmatch(path.removeprefix(TEXT_MODEL_LEVEL)):
                text.append((component, match.group(0), key, None, shape))
    pairs = _unet_pairs(_layout_from_diffusers(unet))
    return _build(unet, pairs, by_ldm=False, text=text, family=family)


def detect_family(context_dim: int | None, text_widths: Mapping[str, int]) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the shapes that tell them apart.

    ``context_dim`` is the UNet's cross-attention context width (``attn2.to_k`` input
    features), None without a UNet; ``text_widths`` maps present text-encoder
    components (``"te1"``, ``"te2"``) to their hidden widths.
    """
    if context_dim is not None:
        if context_dim in FAMILY_BY_CONTEXT_DIM:
            return FAMILY_BY_CONTEXT_DIM[context_dim]
        raise LohaError(
            f"unknown model family: UNet cross-attention context width {context_dim} "
            f"(known: {FAMILY_BY_CONTEXT_DIM})"
        )
    if "te2" in text_widths:
        return "sdxl"
    if text_widths.get("te1") in FAMILY_BY_TEXT_WIDTH:
        return FAMILY_BY_TEXT_WIDTH[text_widths["te1"]]
    raise LohaError(
        f"unknown model family: no UNet cross-attention and text encoder widths {dict(text_widths)}"
    )


def unet_key_map(keys: Iterable[str], *, from_ldm: bool) -> dict[str, str]:
    """Every UNet state-dict key (norms and biases too) -> its key in the other layout.

    ``keys`` are the UNet's keys without a checkpoint prefix, all in the diffusers
    layout or all in the LDM layout (``from_ldm``); the levels are read off them.
    A key with no counterpart raises, naming it.
    """
    keys = list(keys)
    modules = [key.rpartition(".")[0] for key in keys]
    layout = _layout_from_ldm(modules) if from_ldm else _layout_from_diffusers(modules)
    index = {pair.ldm if from_ldm else pair.diffusers: pair for pair in _unet_pairs(layout)}
    mapping = {}
    for key, module in zip(keys, modules):
        translated = _translate(module, index, from_ldm)
        if translated is None:
            side = "LDM" if from_ldm else "diffusers"
            raise LohaError(f"UNet key '{key}' ({side} layout) has no counterpart in the other layout")
        diffusers_path, ldm_path, _ = translated
        mapping[key] = f"{diffusers_path if from_ldm else ldm_path}.{key.rpartition('.')[2]}"
    return mapping


# --------------------------------------------------------------------------- reading models


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _weight_path(key: str, prefixes: Iterable[str]) -> str | None:
    """Module path of a ``….weight`` key under one of ``prefixes``, else None."""
    if not key.endswith(".weight"):
        return None
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) : -len(".weight")]
    return None


def _patchable_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """Weight shape of a Linear/Conv module, None for anything else."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return None
    weight = module.weight
    return tuple(weight.shape) if weight is not None and weight.dim() >= 2 else None


def _hf_text_weights(prefix: str, keys: list[str], shapes: Mapping):
    """(path, key, rows, shape) of the patchable weights of an HF-layout encoder."""
    for key in keys:
        path = _weight_path(key, (prefix + TEXT_MODEL_LEVEL, prefix))
        if path is not None and _TEXT_PATH.fullmatch(path):
            yield path, key, None, _shape(shapes[key])


def _openclip_text_weights(prefix: str, keys: list[str], shapes: Mapping):
    """(path, key, rows, shape) of the patchable weights of an OpenCLIP encoder.

    q/k/v are the three row blocks of the fused ``attn.in_proj_weight``.
    """
    for key in keys:
        match = _OPENCLIP_PARAM.fullmatch(key[len(prefix) :])
        if match is None:
            continue
        layer, param = match.groups()
        parts = [(part, third) for part, (p, third) in TEXT_PARTS.items() if p == param]
        if not parts:
            continue
        shape = _shape(shapes[key])
        for part, third in parts:
            path = f"encoder.layers.{layer}.{part}"
            if third is None:
                yield path, key, None, shape
            else:
                width = shape[0] // 3
                rows = (third * width, (third + 1) * width)
                yield path, key, rows, (width, *shape[1:])


# --------------------------------------------------------------------------- UNet structure


@dataclass(frozen=True)
class _Level:
    """One resolution level of the UNet, as far as naming needs it."""

    resnets: int
    attention: bool  # an up level's upsampler sits at LDM child .2 after one, else .1
    resample: bool  # the level ends with a down/upsampler


@dataclass(frozen=True)
class _UnetLayout:
    down: tuple[_Level, ...]
    up: tuple[_Level, ...]


@dataclass(frozen=True)
class _Pair:
    """A UNet block under its two names; ``resnet`` renames the parts inside it."""

    diffusers: str
    ldm: str
    block: str
    resnet: bool


def _layout_from_diffusers(paths: Iterable[str]) -> _UnetLayout:
    """Levels, res blocks per level and attention presence from diffusers paths."""
    seen: dict[tuple[str, int], dict[str, int]] = {}
    for path in paths:
        match = _DIFFUSERS_LEVEL.match(path)
        if match:
            side, level, kind, index = match.groups()
            kinds = seen.setdefault((side, int(level)), {})
            kinds[kind] = max(kinds.get(kind, 0), int(index) + 1)

    def levels(side: str) -> tuple[_Level, ...]:
        count = 1 + max((level for s, level in seen if s == side), default=-1)
        found = [seen.get((side, level), {}) for level in range(count)]
        return tuple(
            _Level(
                resnets=kinds.get("resnets", 0),
                attention="attentions" in kinds,
                resample="downsamplers" in kinds or "upsamplers" in kinds,
            )
            for kinds in found
        )

    return _UnetLayout(down=levels("down"), up=levels("up"))


def _layout_from_ldm(paths: Iterable[str]) -> _UnetLayout:
    """The same, read from LDM paths.

    Input blocks hold a resnet (+ attention) or a downsampler (``.0.op``); output
    blocks hold a resnet (+ attention) (+ an upsampler ``.1.conv``/``.2.conv`` that
    ends the level).  Levels are cut at the samplers.
    """
    children: dict[tuple[str, int], dict[str, set[str]]] = {}
    for path in paths:
        match = _LDM_LEVEL.match(path)
        if match:
            side, block, child, part = match.groups()
            children.setdefault((side, int(block)), {}).setdefault(child, set()).add(part)

    def blocks(side: str, first: int) -> list[dict[str, set[str]]]:
        count = 1 + max((block for s, block in children if s == side), default=first - 1)
        return [children.get((side, block), {}) for block in range(first, count)]

    down, resnets, attention = [], 0, False
    for block in blocks("input", first=1):
        if "op" in block.get("0", ()):
            down.append(_Level(resnets, attention, resample=True))
            resnets, attention = 0, False
        else:
            resnets += 1
            attention |= "1" in block
    down.append(_Level(resnets, attention, resample=False))

    up, resnets, attention = [], 0, False
    for block in blocks("output", first=0):
        resnets += 1
        attention |= "1" in block and "conv" not in block["1"]
        if any("conv" in block.get(child, ()) for child in ("1", "2")):
            up.append(_Level(resnets, attention, resample=True))
            resnets, attention = 0, False
    if resnets:
        up.append(_Level(resnets, attention, resample=False))
    return _UnetLayout(down=tuple(down), up=tuple(up))


def _unet_pairs(layout: _UnetLayout) -> list[_Pair]:
    """Every UNet block under both names, numbering LDM blocks as LDM builds them."""
    pairs = [_Pair(d, ldm, block, resnet=False) for d, ldm, block in FIXED_UNET_PAIRS]
    pairs += [_Pair(d, ldm, "MID", resnet) for d, ldm, resnet in MID_UNET_PAIRS]

    index = 1  # input_blocks.0 is conv_in
    for level, spec in enumerate(layout.down):
        for i in range(spec.resnets):
            block, ldm = f"IN{index:02d}", f"input_blocks.{index}"
            pairs.append(_Pair(f"down_blocks.{level}.resnets.{i}", f"{ldm}.0", block, True))
            pairs.append(_Pair(f"down_blocks.{level}.attentions.{i}", f"{ldm}.1", block, False))
            index += 1
        if spec.resample:
            down = f"down_blocks.{level}.downsamplers.0.conv"
            pairs.append(_Pair(down, f"input_blocks.{index}.0.op", f"IN{index:02d}", False))
            index += 1

    index = 0
    for level, spec in enumerate(layout.up):
        for i in range(spec.resnets):
            block, ldm = f"OUT{index:02d}", f"output_blocks.{index}"
            pairs.append(_Pair(f"up_blocks.{level}.resnets.{i}", f"{ldm}.0", block, True))
            pairs.append(_Pair(f"up_blocks.{level}.attentions.{i}", f"{ldm}.1", block, False))
            if spec.resample and i == spec.resnets - 1:
                up = f"{ldm}.{2 if spec.attention else 1}.conv"
                pairs.append(_Pair(f"up_blocks.{level}.upsamplers.0.conv", up, block, False))
            index += 1
    last = f"OUT{max(index - 1, 0):02d}"
    pairs.append(_Pair("conv_norm_out", "out.0", last, False))  # a norm: checkpoints only
    pairs.append(_Pair("conv_out", "out.2", last, False))
    return pairs


def _translate(path: str, index: Mapping[str, _Pair], by_ldm: bool) -> tuple[str, str, str] | None:
    """(diffusers path, LDM path, block) of a UNet module path in either layout."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        pair = index.get(".".join(parts[:cut]))
        if pair is not None:
            break
    else:
        return None
    inner = ".".join(parts[cut:])
    if pair.resnet:
        renames = _RESNET_RENAMES_FROM_LDM if by_ldm else _RESNET_RENAMES
        if inner not in renames:
            return None
        other_inner = renames[inner]
    else:
        other_inner = inner
    other = ".".join(p for p in ((pair.diffusers if by_ldm else pair.ldm), other_inner) if p)
    return (other, path, pair.block) if by_ldm else (path, other, pair.block)


# --------------------------------------------------------------------------- building the map


def _build(
    unet: Mapping, pairs: list[_Pair], by_ldm: bool, text: list, family: str | None
) -> NameMap:
    """Targets and spellings for a model's UNet weights and text-encoder weights.

    ``unet`` maps module paths (in the model's own layout) to (key, shape); ``text``
    holds (component, HF path, key, rows, shape) tuples.
    """
    if family is None:
        family = detect_family(_context_dim(unet), _text_widths(text))
    elif family not in FAMILIES:
        raise LohaError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")

    index = {pair.ldm if by_ldm else pair.diffusers: pair for pair in pairs}
    entries = []
    for path, (key, shape) in unet.items():
        translated = _translate(path, index, by_ldm)
        if translated is not None:
            diffusers_path, ldm_path, block = translated
            target = Target("unet", diffusers_path, key, None, shape, block)
            entries.append((target, _unet_names(family, diffusers_path, ldm_path)))
    for component, path, key, rows, shape in text:
        target = Target(component, path, key, rows, shape, "BASE")
        entries.append((target, _text_names(family, component, path)))
    return NameMap(family, entries)


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
    return [*kohya, LYCORIS_PREFIX + diffusers_name]


def _text_names(family: str, component: str, path: str) -> list[str]:
    prefixes = TEXT_PREFIXES[family].get(component)
    if prefixes is None:
        raise LohaError(f"a {family} model has no text encoder {component!r}")
    name = path.replace(".", "_")
    level = TEXT_MODEL_LEVEL.replace(".", "_")
    return [prefix + middle + name for prefix in prefixes for middle in (level, "")]
