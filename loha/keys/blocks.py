"""Per-block strengths in the notation of the WebUI "LoRA Block Weight" extension.

The extension (github hako-mikan/sd-webui-lora-block-weight) owns this notation; every
rule here is its rule, so ``<loha:x:1:lbw=…>`` gives what ``<lora:x:1:lbw=…>`` gives
with the extension installed. Users write a preset name (``OUTALL``) or a comma list of
numbers (``lbw=1,0,0,0,0,1,1,1,…``) whose length says which blocks it lists, the same
ids for every model family (the extension's BLOCKID lists):

=======  ====================================================================
values   blocks, in order
=======  ====================================================================
17       BASE, IN01 IN02 IN04 IN05 IN07 IN08, MID, OUT03–OUT11 (SD1/SD2 attention)
26       BASE, IN00–IN11, MID, OUT00–OUT11
12       BASE, IN04 IN05 IN07 IN08, MID, OUT00–OUT05 (SDXL attention)
20       BASE, IN00–IN08, MID, OUT00–OUT08
=======  ====================================================================

The ids are those `loha.keys.unet` gives every weight (``Target.block``): ``BASE`` is the
text encoders only, ``IN04`` is ``input_blocks.4`` and so on; the extension's ``M00`` is
our ``MID``. Layers in no block (the time/label embeddings and ``conv_out``) keep the
network's strength whatever the list says, as the extension leaves them. A block of the
model that the list does not name gets 0 (so 17 values, ``ALL`` included, switch off
conv-only blocks such as ``IN00`` and the downsamplers; use 26 values to set them);
ids the model lacks (``OUT09`` on SDXL) are ignored. The presets are the extension's
defaults, 17 values each. Random values (``R``, ``U``) and inherited ones (``X``) are
not supported: a block weight must give the same image twice.
"""

from __future__ import annotations

import math

from ..errors import LohaError
from .unet import NO_BLOCK

__all__ = ["BLOCK_LISTS", "NO_BLOCK", "PRESETS", "block_ids", "parse", "preset_names"]

#: Family -> the block layout its UNet has.
LAYOUT_OF_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}


def _ids(side: str, count: int) -> tuple[str, ...]:
    return tuple(f"{side}{i:02d}" for i in range(count))


#: Number of values -> the block ids they stand for, in order (the extension's BLOCKID lists).
LISTS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_ids("OUT", 6)),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *_ids("IN", 9), "MID", *_ids("OUT", 9)),
    26: ("BASE", *_ids("IN", 12), "MID", *_ids("OUT", 12)),
}
#: Layout -> every block its UNet has, in list order.
LAYOUT_BLOCKS = {"sd": LISTS[26], "sdxl": LISTS[20]}
#: (layout, number of values) -> the block ids the values stand for; the lists that name
#: exactly a layout's attention blocks (short) or all its blocks (long) are
#: (layout, 17)/(layout, 26) for SD and (layout, 12)/(layout, 20) for SDXL.
BLOCK_LISTS: dict[tuple[str, int], tuple[str, ...]] = {
    (layout, n): ids for layout in LAYOUT_BLOCKS for n, ids in LISTS.items()
}
#: The extension's default presets (its DEF_WEIGHT_PRESET), 17 values each, for every family.
PRESETS: dict[str, str] = {
    "NONE": ",".join(["0"] * 17),
    "ALL": ",".join(["1"] * 17),
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}


def _layout(family: str) -> str:
    try:
        return LAYOUT_OF_FAMILY[family]
    except KeyError:
        raise LohaError(f"block weights: unknown model family {family!r} "
                        f"(known: {', '.join(LAYOUT_OF_FAMILY)})") from None


def block_ids(family: str) -> tuple[str, ...]:
    """Every block id a `family` model has, in the order of the long list."""
    return LAYOUT_BLOCKS[_layout(family)]


def preset_names(family: str | None = None) -> list[str]:
    """Preset names (the same for every family, as in the extension)."""
    if family is not None:
        _layout(family)
    return list(PRESETS)


def parse(spec: str, family: str) -> dict[str, float]:
    """Block id -> multiplier for a preset name or comma list on a `family` model.

    Every block of the family is in the result (blocks the list does not name map to 0).
    An empty spec means no block weights: an empty dict, every block at 1.
    """
    text = spec.strip()
    if not text:
        return {}
    ids_of_model = block_ids(family)
    text = PRESETS.get(text.upper(), text)
    values = [_multiplier(part, spec) for part in text.split(",")]
    ids = LISTS.get(len(values))
    if ids is None:
        raise LohaError(f"block weights {spec!r}: {len(values)} values, but a list has "
                        f"{', '.join(map(str, sorted(LISTS)))} values (SD1/SD2: 17 or 26, SDXL: 12 or 20); "
                        f"or a preset: {', '.join(PRESETS)}")
    weights = dict.fromkeys(ids_of_model, 0.0)
    weights.update((block, value) for block, value in zip(ids, values) if block in weights)
    return weights


def _multiplier(part: str, spec: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise LohaError(f"block weights {spec!r}: {part.strip()!r} is not a number "
                        "(random R/U and inherited X values are not supported)") from None
    if not math.isfinite(value):
        raise LohaError(f"block weights {spec!r}: {part.strip()!r} is not a finite number")
    return value

