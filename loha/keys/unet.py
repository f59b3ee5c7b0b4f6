"""The SD UNet under its two names: diffusers module paths and LDM (CompVis) paths.

kohya writes SD1.x/SD2.x UNet modules under diffusers paths and SDXL ones under LDM
paths; checkpoints and ComfyUI hold LDM paths, diffusers pipelines diffusers paths.
The levels, res blocks per level and attention presence are read off the paths
themselves, so any UNet built like SD's (other widths, depths, level counts) maps.

Block ids (for per-block strengths) follow the LDM UNet, whatever the layout, and mean
what the WebUI "LoRA Block Weight" extension means by them (its `ratiodealer` picks a
block by the LDM name; a layer no block name picks keeps the full strength):

=========================================  ===========================================
weights                                    block
=========================================  ===========================================
text encoders                              ``BASE``
``conv_in`` (``input_blocks.0.0``)         ``IN00``
``input_blocks.N`` (resnets, attentions,   ``IN{N:02d}``
downsamplers)
``middle_block``                           ``MID``
``output_blocks.N`` (resnets, attentions,  ``OUT{N:02d}``
upsamplers)
``time_embed`` / ``time_embedding``,       none (`NO_BLOCK`): block weights leave
``label_emb`` / ``add_embedding`` /        them at the network's UNet strength
``class_embedding`` (SDXL), ``conv_out``
and ``conv_norm_out`` (``out.2``/``out.0``)
=========================================  ===========================================

SDXL's ``label_emb`` is ``add_embedding`` in diffusers; ComfyUI also accepts
``class_embedding`` for it (as diffusers names it in class-conditioned UNets), so
files may use either (`DIFFUSERS_ALIASES`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ..errors import LohaError

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

#: The block id of layers no block weight applies to (the embeddings, conv_out).
NO_BLOCK = ""
#: UNet modules outside the level structure: (diffusers path, LDM path, block).
FIXED_UNET_PAIRS = (
    ("conv_in", "input_blocks.0.0", "IN00"),
    ("time_embedding.linear_1", "time_embed.0", NO_BLOCK),
    ("time_embedding.linear_2", "time_embed.2", NO_BLOCK),
    ("add_embedding.linear_1", "label_emb.0.0", NO_BLOCK),
    ("add_embedding.linear_2", "label_emb.0.2", NO_BLOCK),
)
#: Other diffusers spellings of a module path's first part that files use (ComfyUI accepts them).
DIFFUSERS_ALIASES = {"add_embedding": "class_embedding"}
#: The mid block: (diffusers path, LDM path, is a resnet).
MID_UNET_PAIRS = (
    ("mid_block.resnets.0", "middle_block.0", True),
    ("mid_block.attentions.0", "middle_block.1", False),
    ("mid_block.resnets.1", "middle_block.2", True),
)
#: More blocks, levels or layers per level than any UNet has: a path numbering beyond it is refused
#: (the layout is read into lists as long as the largest number, so an absurd one would allocate
#: without bound).
MAX_INDEX = 1000
_DIFFUSERS_LEVEL = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\."
)
_LDM_LEVEL = re.compile(r"(input|output)_blocks\.(\d+)\.(\d+)\.(\w+)")


class UnetPlace(NamedTuple):
    """One UNet module under both names, and its block id."""

    diffusers: str
    ldm: str
    block: str


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


def _index(text: str, path: str) -> int:
    number = int(text)
    if number > MAX_INDEX:
        raise LohaError(f"UNet path '{path[:200]}' numbers a block {number}; no UNet has more than {MAX_INDEX}")
    return number


def _layout_from_diffusers(paths: Iterable[str]) -> _UnetLayout:
    """Levels, res blocks per level and attention presence from diffusers paths."""
    seen: dict[tuple[str, int], dict[str, int]] = {}
    for path in paths:
        match = _DIFFUSERS_LEVEL.match(path)
        if match:
            side, level, kind, index = match.groups()
            kinds = seen.setdefault((side, _index(level, path)), {})
            kinds[kind] = max(kinds.get(kind, 0), _index(index, path) + 1)

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
            children.setdefault((side, _index(block, path)), {}).setdefault(child, set()).add(part)

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
    pairs.append(_Pair("conv_norm_out", "out.0", NO_BLOCK, False))
    pairs.append(_Pair("conv_out", "out.2", NO_BLOCK, False))
    return pairs


def _translate(path: str, index: Mapping[str, _Pair], by_ldm: bool) -> UnetPlace | None:
    """Both names and the block of a UNet module path in either layout."""
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
    return UnetPlace(other, path, pair.block) if by_ldm else UnetPlace(path, other, pair.block)



def unet_places(paths: Iterable[str], *, from_ldm: bool) -> Callable[[str], UnetPlace | None]:
    """Translator for the module paths of one UNet (all LDM or all diffusers paths).

    The levels are read off `paths`; the result maps any of its module paths to its
    `UnetPlace`, or None for a path with no counterpart.
    """
    paths = list(paths)
    layout = _layout_from_ldm(paths) if from_ldm else _layout_from_diffusers(paths)
    index = {pair.ldm if from_ldm else pair.diffusers: pair for pair in _unet_pairs(layout)}
    return lambda path: _translate(path, index, from_ldm)


def unet_key_map(keys: Iterable[str], *, from_ldm: bool) -> dict[str, str]:
    """Every UNet state-dict key (norms and biases too) -> its key in the other layout.

    ``keys`` are the UNet's keys without a checkpoint prefix, all in the diffusers
    layout or all in the LDM layout (``from_ldm``); the levels are read off them.
    A key with no counterpart raises, naming it.
    """
    keys = list(keys)
    modules = [key.rpartition(".")[0] for key in keys]
    place_of = unet_places(modules, from_ldm=from_ldm)
    mapping = {}
    for key, module in zip(keys, modules):
        place = place_of(module)
        if place is None:
            side = "LDM" if from_ldm else "diffusers"
            raise LohaError(f"UNet key '{key}' ({side} layout) has no counterpart in the other layout")
        mapping[key] = f"{place.diffusers if from_ldm else place.ldm}.{key.rpartition('.')[2]}"
    return mapping
