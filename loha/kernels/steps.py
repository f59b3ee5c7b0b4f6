"""A weight's chain of changes (several networks, DoRA among them), evaluated on row tiles.

The patcher applies the networks on one tensor in order, each step one of

    W ← W + s·ΔW                        plain
    W ← W + s·(DoRA(W + ΔW) − W)        DoRA, DoRA(V) = V·m/‖V‖

with ΔW carrying alpha/rank and s the strength; the norm is over every axis but the
one `dora_scale` lies along (`loha.delta.dora_merge` is the reference). A tile of
rows holds whole rows, so a chain of plain and output-axis DoRA steps is evaluated
tile by tile in one pass over W, the norms taken inside the tile. An input-axis
DoRA needs the norms of whole columns first: `column_scales` makes one pass for it.

`evaluate_rows` turns an fp32 copy of rows of W into the same rows of the changed
weight; the patcher writes them back (`apply_steps_`), the bypass feeds them to a
GEMM, and `dora_scales` gives the per-channel factors a bypass needs when it cannot
read W in its forward. Nothing of size O × K is ever allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import native, tiled, tuning
from .tiled import DENSE, HADAMARD, MATMUL

_F32 = torch.float32
_EPS = torch.finfo(_F32).eps  # added to every norm, as loha.delta.dora_merge does


class Step(NamedTuple):
    """One network's change to a weight viewed as O × K."""

    kind: str  # HADAMARD: (a1, b1, a2, b2); MATMUL: (u, v); DENSE: (delta,)
    tensors: tuple  # fp32, contiguous, on the weight's device
    scale: float  # alpha/rank: ΔW = scale · product
    strength: float
    dora: torch.Tensor | None = None  # fp32 magnitude, flat: (O,) for axis "out", (I,) for "in"
    axis: str | None = None  # "out" or "in"


def delta_rows(step: Step, r0: int, r1: int, out: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """scale·ΔW[r0:r1] in fp32, written into `out` (r1−r0, K); `spare` is scratch of that size."""
    if step.kind == HADAMARD:
        a1, b1, a2, b2 = step.tensors
        torch.mm(a1[r0:r1], b1, out=out)
        out.mul_(torch.mm(a2[r0:r1], b2, out=spare)).mul_(step.scale)
    elif step.kind == MATMUL:
        u, v = step.tensors
        torch.mm(u[r0:r1], v, out=out).mul_(step.scale)
    else:
        out.copy_(step.tensors[0][r0:r1]).mul_(step.scale)
    return out


def add_plain_rows(w: torch.Tensor, step: Step, r0: int, r1: int, spare: torch.Tensor, spare2: torch.Tensor) -> None:
    """w (fp32 rows r0:r1) += s·ΔW[r0:r1], through the native tile or one addmm where they fit."""
    coef = step.scale * step.strength
    if step.kind == HADAMARD and w.device.type == "cpu" and native.supports(_F32):
        a1, b1, a2, b2 = step.tensors
        native.hadamard_rows(w, a1[r0:r1], b1, a2[r0:r1], b2, coef)
    elif step.kind == MATMUL:
        u, v = step.tensors
        w.addmm_(u[r0:r1], v, alpha=coef)
    else:
        w.add_(delta_rows(step, r0, r1, spare, spare2), alpha=step.strength)


def evaluate_rows(w: torch.Tensor, steps, r0: int, r1: int, scratch: torch.Tensor,
                  in_scales: dict | None = None, record: dict | None = None) -> None:
    """Run the chain on `w`, an fp32 copy of rows r0:r1 of W (n × K), in place.

    `scratch` holds at least 2·n·K fp32 elements. `in_scales[i]` is the (K,) column
    factor of input-axis DoRA step i (from `column_scales`); steps from `in_scales`'s
    keys on may be missing (the chain up to a step). `record[i]`, an (O,) tensor,
    receives the row factors m/‖·‖ of output-axis DoRA step i for these rows.
    """
    n, k = w.shape
    d = scratch[: n * k].view(n, k)
    spare = scratch[n * k : 2 * n * k].view(n, k)
    for i, step in enumerate(steps):
        if step.dora is None:
            add_plain_rows(w, step, r0, r1, d, spare)
            continue
        if step.kind == MATMUL or (step.kind == HADAMARD and w.device.type == "cpu" and native.supports(_F32)):
            merged = d.copy_(w)  # W + ΔW in one pass over the tile
            add_plain_rows(merged, step._replace(strength=1.0), r0, r1, spare, spare)
        else:
            merged = delta_rows(step, r0, r1, d, spare).add_(w)  # W + ΔW
        if step.axis == "out":
            factor = step.dora[r0:r1] / (torch.linalg.vector_norm(merged, dim=1) + _EPS)
            if record is not None and i in record:
                record[i][r0:r1] = factor
            merged.mul_(factor[:, None])
        else:
            merged.mul_(in_scales[i])
        w.add_(merged.sub_(w), alpha=step.strength)


def column_scales(weight: torch.Tensor, steps, in_scales: dict | None = None) -> dict:
    """{i: (K,) factor m/‖·‖ per column} for every input-axis DoRA step i.

    One pass over W per such step, each evaluating the steps before it; W (any float
    dtype, viewed O × K) is only read.
    """
    w = weight.reshape(weight.shape[0], -1)
    k = w.shape[1]
    scales = dict(in_scales or {})
    for i, step in enumerate(steps):
        if step.dora is None or step.axis != "in" or i in scales:
            continue
        sums = torch.zeros(k, dtype=_F32, device=w.device)

        def add_squares(tile, r0, r1, scratch, i=i, step=step, sums=sums):
            evaluate_rows(tile, steps[:i], r0, r1, scratch, scales)
            n = tile.numel()
            merged = delta_rows(step, r0, r1, scratch[:n].view_as(tile), scratch[n : 2 * n].view_as(tile))
            sums.add_(merged.add_(tile).square_().sum(0))

        _read_tiles(w, add_squares)
        inputs = step.dora.numel()
        norms = sums.view(inputs, k // inputs).sum(1).sqrt_() + _EPS
        scales[i] = (step.dora / norms).repeat_interleave(k // inputs)
    return scales


def dora_scales(weight: torch.Tensor, steps) -> list[torch.Tensor | None]:
    """Per step: None (plain), its (O,) row factor ("out") or its (K,) column factor ("in").

    What a bypass needs to apply DoRA as y = c ⊙ (W·x + ΔW·x) without the weight in its
    forward: computed tile by tile from W, which is only read.
    """
    w = weight.reshape(weight.shape[0], -1)
    scales = column_scales(w, steps)
    record = {i: torch.empty(w.shape[0], dtype=_F32, device=w.device)
              for i, s in enumerate(steps) if s.dora is not None and s.axis == "out"}
    if record:
        _read_tiles(w, lambda tile, r0, r1, scratch: evaluate_rows(tile, steps, r0, r1, scratch, scales, record))
    return [record.get(i, scales.get(i)) for i in range(len(steps))]


def apply_steps_(weight: torch.Tensor, steps, source: torch.Tensor | None = None) -> None:
    """weight ← chain(source or weight), evaluated in fp32 tile by tile and rounded once.

    `weight` is contiguous and viewed O × K; `source` (same shape, any float dtype) is
    read instead of `weight` when given, so the result may go to new memory.
    """
    w = weight.view(weight.shape[0], -1)
    src = w if source is None else source.reshape(w.shape)
    steps = tuple(steps)
    in_scales = column_scales(src, steps)

    def evaluate(rows, r0, r1, scratch):
        evaluate_rows(rows, steps, r0, r1, scratch, in_scales)

    job = tiled.Job(w, tiled.ROWS_FN, (evaluate,), 1.0, None if source is None else src)
    if w.device.type == "cpu":
        tiled.run_cpu([job])
    else:
        tiled.run_serial([job], tuning.CUDA_TILE_ELEMS)


def tile_elems(device) -> int:
    return tuning.CPU_TILE_ELEMS if torch.device(device).type == "cpu" else tuning.CUDA_TILE_ELEMS


def _read_tiles(w: torch.Tensor, fn) -> None:
    """fn(tile, r0, r1, scratch) on an fp32 copy of each row tile of `w`, in this thread.

    `scratch` has room for two more tiles (what `evaluate_rows` needs).
    """
    o, k = w.shape
    rows = tiled.rows_per_tile(k, tile_elems(w.device))
    buf = tiled.scratch(3 * min(o, rows) * k, w.device)
    for r0 in range(0, o, rows):
        r1 = min(o, r0 + rows)
        n = (r1 - r0) * k
        fn(buf[2 * n : 3 * n].view(r1 - r0, k).copy_(w[r0:r1]), r0, r1, buf)
