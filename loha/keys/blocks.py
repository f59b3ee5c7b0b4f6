"""Per-block strengths in the notation of the WebUI "LoRA Block Weight" extension.

Users know block weights as a preset name (``OUTALL``) or a comma list of numbers
(``lbw=1,0,0,0,0,1,1,1,…``) whose length tells which blocks it lists:

=======  ============  ====================================================
family   values        blocks, in order
=======  ============  ====================================================
SD1/SD2  17            BASE, the input/output blocks that hold attention, MID
SD1/SD2  26            BASE, IN00–IN11, MID, OUT00–OUT11
SDXL     12            BASE, the input/output blocks that hold attention, MID
SDXL     20            BASE, IN00–IN08, MID, OUT00–OUT08
=======  ============  ====================================================

The ids are those `loha.keys.unet` gives every weight (``Target.block``): ``BASE`` is the
text encoders (and the time/label embeddings), ``IN04`` is ``input_blocks.4`` and so
on; the extension's ``M00`` is our ``MID``. As in the extension, a block a short list
does not name gets 0 (so 17 values switch off conv-only blocks such as ``IN00`` and
the downsamplers of a LoHa that trained them); use the long list to set them.
Random values (``R``, ``U``) and inherited ones (``X``) are not supported: a block
weight must give the same image twice.
"""

from __future__ import annotations

from ..errors import LohaError

__all__ = ["BLOCK_LISTS", "PRESETS", "block_ids", "parse", "preset_names"]

#: Family -> the block layout its UNet has.
LAYOUT_OF_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}


def _ids(side: str, count: int) -> tuple[str, ...]:
    return tuple(f"{side}{i:02d}" for i in range(count))


#: (layout, number of values) -> the block ids the values stand for, in order.
BLOCK_LISTS: dict[tuple[str, int], tuple[str, ...]] = {
    ("sd", 17): ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                 "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    ("sd", 26): ("BASE", *_ids("IN", 12), "MID", *_ids("OUT", 12)),
    ("sdxl", 12): ("BASE", "IN04", "IN05", "IN07", "IN08", "MID",
                   "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    ("sdxl", 20): ("BASE", *_ids("IN", 9), "MID", *_ids("OUT", 9)),
}
#: Named presets per layout: the extension's defaults for SD (17 values) and the same
#: ideas for SDXL (12 values: BASE, IN04 IN05 IN07 IN08, MID, OUT00–OUT05). ALL, NONE
#: and ALL0.5 are long lists, so they mean every block, conv-only ones included.
PRESETS: dict[str, dict[str, str]] = {
    "ALL": {"sd": ",".join(["1"] * 26), "sdxl": ",".join(["1"] * 20)},
    "NONE": {"sd": ",".join(["0"] * 26), "sdxl": ",".join(["0"] * 20)},
    "ALL0.5": {"sd": ",".join(["0.5"] * 26), "sdxl": ",".join(["0.5"] * 20)},
    "INS": {"sd": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"},
    "IND": {"sd": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0", "sdxl": "1,0,0,1,1,0,0,0,0,0,0,0"},
    "INALL": {"sd": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "sdxl": "1,1,1,1,1,0,0,0,0,0,0,0"},
    "MIDD": {"sd": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0", "sdxl": "1,0,0,1,1,1,1,1,1,0,0,0"},
    "OUTD": {"sd": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "sdxl": "1,0,0,0,0,0,1,1,1,0,0,0"},
    "OUTS": {"sd": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1", "sdxl": "1,0,0,0,0,0,0,0,0,1,1,1"},
    "OUTALL": {"sd": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "sdxl": "1,0,0,0,0,0,1,1,1,1,1,1"},
}


def _layout(family: str) -> str:
    try:
        return LAYOUT_OF_FAMILY[family]
    except KeyError:
        raise LohaError(f"block weights: unknown model family {family!r} "
                        f"(known: {', '.join(LAYOUT_OF_FAMILY)})") from None


def block_ids(family: str) -> tuple[str, ...]:
    """Every block id a `family` model has, in the order of the long list."""
    layout = _layout(family)
    return max((ids for (lay, _), ids in BLOCK_LISTS.items() if lay == layout), key=len)


def preset_names(family: str | None = None) -> list[str]:
    """Preset names, all of them or those defined for `family`."""
    if family is None:
        return list(PRESETS)
    layout = _layout(family)
    return [name for name, values in PRESETS.items() if layout in values]


def parse(spec: str, family: str) -> dict[str, float]:
    """Block id -> multiplier for a preset name or comma list on a `family` model.

    Every block of the family is in the result (blocks a short list skips map to 0).
    An empty spec means no block weights: an empty dict, every block at 1.
    """
    text = spec.strip()
    if not text:
        return {}
    layout = _layout(family)
    preset = PRESETS.get(text.upper())
    if preset is not None:
        if layout not in preset:
            raise LohaError(f"block weights: preset {text!r} has no {family} version "
                            f"(presets for {family}: {', '.join(preset_names(family))})")
        text = preset[layout]
    values = [_multiplier(part, spec) for part in text.split(",")]
    ids = BLOCK_LISTS.get((layout, len(values)))
    if ids is None:
        counts = sorted(n for lay, n in BLOCK_LISTS if lay == layout)
        raise LohaError(f"block weights {spec!r}: {len(values)} values, but a {family} list has "
                        f"{' or '.join(map(str, counts))}; or a preset: {', '.join(preset_names(family))}")
    weights = dict.fromkeys(block_ids(family), 0.0)
    weights.update(zip(ids, values))
    return weights


def _multiplier(part: str, spec: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise LohaError(f"block weights {spec!r}: {part.strip()!r} is not a number "
                        "(random R/U and inherited X values are not supported)") from None

