"""`FILE[:UNET[:TE]]`: how users name a network and its strengths on the command line and in the UI."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import LohaError
from ..files.network import load
from ..patch import Use, check_strength


def parse_spec(spec: str) -> tuple[str, float, float | None]:
    """FILE[:UNET[:TE]] -> (file, unet, te); a path that exists as written wins.

    When FILE exists, what follows it must be strengths: ``style.safetensors:abc`` says
    that 'abc' is not a number (rather than that no file has that name), and NaN/Inf
    are refused.
    """
    if os.path.exists(spec):
        return spec, 1.0, None
    parts = spec.split(":")
    for cut in (len(parts) - 2, len(parts) - 1):  # FILE:UNET:TE, then FILE:UNET
        if cut >= 1 and os.path.exists(":".join(parts[:cut])):
            return (":".join(parts[:cut]), *_strengths(spec, parts[cut:]))
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise LohaError(f"network {spec!r}: no file name")
    return (path, *_strengths(spec, [str(n) for n in numbers]))


def _strengths(spec: str, texts: list[str]) -> tuple[float, float | None]:
    values = []
    for what, text in zip(("UNet strength", "text-encoder strength"), texts):
        try:
            number = float(text)
        except ValueError:
            raise LohaError(f"network {spec!r}: {what} {text!r} is not a number") from None
        values.append(check_strength(number, f"network {spec!r}: {what}"))
    return (values[0] if values else 1.0), (values[1] if len(values) > 1 else None)


def uses_from_specs(specs: Iterable[str]) -> list[Use]:
    """`Use`s from FILE[:UNET[:TE]] strings (loads each network lazily)."""
    return [Use(load(path), unet, te) for path, unet, te in map(parse_spec, specs)]
