"""`FILE[:UNET[:TE]]`: how users name a network and its strengths on the command line and in the UI."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import LohaError
from ..files.network import load
from ..patch import Use


def parse_spec(spec: str) -> tuple[str, float, float | None]:
    """FILE[:UNET[:TE]] -> (file, unet, te); a path that exists as written wins."""
    if os.path.exists(spec):
        return spec, 1.0, None
    parts = spec.split(":")
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
    return path, (numbers[0] if numbers else 1.0), (numbers[1] if len(numbers) > 1 else None)


def uses_from_specs(specs: Iterable[str]) -> list[Use]:
    """`Use`s from FILE[:UNET[:TE]] strings (loads each network lazily)."""
    return [Use(load(path), unet, te) for path, unet, te in map(parse_spec, specs)]
