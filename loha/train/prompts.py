"""Sample prompts in sd-scripts' prompt-file syntax, and the step label on sample images.

One prompt a line; options follow it as `` --n NEGATIVE --w WIDTH --h HEIGHT --s STEPS
--l GUIDANCE --d SEED`` (sd-scripts' `train_util.line_to_prompt_dict`); lines starting with
``#`` and empty lines are skipped. A value the line does not give comes from the run
(resolution, --sample-steps, the run's seed; guidance 1 = none).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import LohaError

_OPTION = re.compile(r"\s+--(n|w|h|s|l|d)\s+")
_CONVERT = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("scale", float),
            "d": ("seed", int), "n": ("negative", str)}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    scale: float | None = None
    seed: int | None = None


def parse_line(line: str) -> SamplePrompt:
    parts = _OPTION.split(" " + line.strip())
    values = {"prompt": parts[0].strip()}
    for flag, value in zip(parts[1::2], parts[2::2]):
        name, convert = _CONVERT[flag]
        try:
            values[name] = convert(value.strip())
        except ValueError:
            raise LohaError(f"sample prompt {line!r}: --{flag} {value.strip()!r} is not a {convert.__name__}",
                            option="sample_prompts") from None
    for side in ("width", "height"):
        if values.get(side, 8) % 8:
            raise LohaError(f"sample prompt {line!r}: {side} {values[side]} is not a multiple of 8",
                            option="sample_prompts")
    return SamplePrompt(**values)


def parse_prompts(source: str) -> list[SamplePrompt]:
    """A prompt file's path, or its text."""
    text = source or ""
    if text.strip() and "\n" not in text and os.path.isfile(text.strip()):
        with open(text.strip(), encoding="utf-8") as f:
            text = f.read()
    return [parse_line(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def label_image(image, text: str):
    """The image with `text` in a dark band along its bottom edge (PIL's built-in font)."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), text)
    band = bottom - top + 4
    draw.rectangle((0, out.height - band, min(out.width, right - left + 6), out.height), fill=(0, 0, 0))
    draw.text((3, out.height - band + 2 - top), text, fill=(255, 255, 255))
    return out
