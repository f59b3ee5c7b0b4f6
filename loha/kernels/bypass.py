"""Bypass products: a layer's output with networks applied, its weight never written.

Two forms, chosen per layer and per call by `plan_forward` from the costs in `tuning.py`:

- merged, y = (W + ΔW)·x + b, where the layer's weight can be read as a float tensor:
  row tiles of W' = chain(W) (`steps.evaluate_rows`: the same fp32 math and the same
  rounding to W's dtype as a patched weight) are built in cache and consumed by the
  layer's own GEMM or convolution, one output-channel block at a time. The extra cost
  per call is building W' (what patching costs), not a second GEMM.
- added, y = f(x) + Σ s·(…)·ΔW·x, where only the layer's own forward f can run (fp8 or
  quantized weights that dequantize inside it). ΔW·x is either two thin products
  through the exact rank-R1·R2 Khatri–Rao form, x·(b1∗b2)ᵀ·(a1•a2)ᵀ (for convolutions a
  k×k convolution to R1·R2 channels, then a 1×1 one, with the layer's stride, padding,
  dilation and groups), or, where that is dearer, ΔW rebuilt in row tiles. DoRA
  enters through per-channel factors computed once from W (`steps.dora_scales`).

Products are computed in fp32 and rounded once to the output's dtype. On CUDA, a linear
layer with one plain LoHa goes to the fused Triton kernel (`triton_bypass.py`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import delta as D
from . import tiled, tuning
from .steps import Step, evaluate_rows, tile_elems
from .tiled import DENSE, HADAMARD, MATMUL

_F32 = torch.float32
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_triton_module = None
_triton_failed = False

MERGED = "merged"
KHATRI_RAO = "khatri-rao"  # two thin products (LoRA's own pair for MATMUL steps)
TILES = "tiles"  # ΔW rebuilt in row tiles and multiplied
DENSE_FORM = "dense"  # a DENSE step's ΔW itself


class Conv(NamedTuple):
    """What a convolution does to its input, for products that must do the same."""

    dims: int
    stride: tuple
    padding: tuple | str
    dilation: tuple
    groups: int
    padding_mode: str = "zeros"
    explicit_padding: tuple = ()  # F.pad amounts when padding_mode is not "zeros"


def conv_input(x: torch.Tensor, conv: Conv) -> tuple[torch.Tensor, tuple | str]:
    """The input as the layer's convolution sees it, and the padding left to apply."""
    if conv.padding_mode == "zeros":
        return x, conv.padding
    return F.pad(x, conv.explicit_padding, mode=conv.padding_mode), 0


def run_conv(x: torch.Tensor, weight: torch.Tensor, bias, conv: Conv, groups: int | None = None,
             padded: bool = False) -> torch.Tensor:
    """The layer's convolution of `x` (already padded when `padded`) with another weight."""
    padding = 0 if padded else conv.padding
    if not padded and conv.padding_mode != "zeros":
        x, padding = conv_input(x, conv)
    return _CONV[conv.dims](x, weight, bias, conv.stride, padding, conv.dilation,
                            conv.groups if groups is None else groups)


# ---- choosing the form ---------------------------------------------------------------


def tokens(x: torch.Tensor, conv: Conv | None) -> int:
    """About how many outputs positions the layer computes (batch × sequence or pixels)."""
    if conv is None:
        return x.numel() // max(1, x.shape[-1])
    return x.numel() // max(1, x.shape[1]) // max(1, math.prod(conv.stride))


def low_rank(step: Step) -> int:
    """The inner size of the step's thin pair: R1·R2 for a LoHa, R for a LoRA."""
    if step.kind == HADAMARD:
        return step.tensors[0].shape[1] * step.tensors[2].shape[1]
    if step.kind == MATMUL:
        return step.tensors[0].shape[1]
    return 0


def pair_macs(t: int, o: int, k: int, r: int, groups: int = 1) -> int:
    """Multiply-adds of ΔW·x through a thin pair of inner size r, for t positions."""
    return t * r * (groups * k + o)


def choose_added(step: Step, t: int, o: int, k: int, groups: int, device) -> str:
    """The cheaper way to compute ΔW·x for one step, beside the layer's own forward."""
    if step.kind == DENSE:
        return DENSE_FORM
    r = low_rank(step)
    if step.kind == MATMUL:
        return KHATRI_RAO
    # Rebuilding costs building ΔW plus a full product; the pair costs its two thin ones.
    ratio = tuning.BYPASS_BUILD_MACS_PER_ELEMENT.get(torch.device(device).type, 1.0)
    rebuild = o * k * ratio + t * o * k
    return KHATRI_RAO if pair_macs(t, o, k, r, groups) <= rebuild else TILES


def prefer_merged(steps, t: int, o: int, k: int, groups: int, device) -> bool:
    """Whether building W' (then the layer's one product) beats the layer plus thin pairs."""
    if any(s.kind == DENSE for s in steps) or any(s.dora is not None and s.axis == "in" for s in steps):
        return True  # dense ΔW costs a full product anyway; input-axis DoRA a second forward
    ratio = tuning.BYPASS_BUILD_MACS_PER_ELEMENT.get(torch.device(device).type, 1.0)
    pairs = sum(pair_macs(t, o, k, low_rank(s), groups) for s in steps)
    return pairs > o * k * ratio


# ---- merged: y = (W + ΔW)·x + b ---------------------------------------------------------


def forward_merged(x: torch.Tensor, weight: torch.Tensor, bias, steps, conv: Conv | None = None,
                   in_scales: dict | None = None) -> torch.Tensor:
    """The layer's output with its weight replaced by chain(weight), built in row tiles.

    `weight` (O, …) is only read; each tile of W' is rounded to its dtype, as a patched
    weight would be, and multiplied in the layer's dtype. `in_scales` are the column
    factors of input-axis DoRA steps (`steps.column_scales`). Gradients reach x (the
    tiles are constants), never the weight or the factors.
    """
    steps = tuple(steps)
    if conv is None and x.device.type == "cuda" and not in_scales and _fused_linear(steps, weight):
        return _triton().linear_merged(x, weight, bias, *steps[0].tensors, steps[0].scale * steps[0].strength)
    w = weight.reshape(weight.shape[0], -1)
    o, k = w.shape
    rows = _tile_rows(o, k, weight.device, 1 if conv is None else o // conv.groups)
    if conv is not None and conv.padding_mode != "zeros":
        x, _ = conv_input(x, conv)
    buf = tiled.scratch(3 * min(o, rows) * k, w.device)
    keep = torch.is_grad_enabled() and x.requires_grad  # backward reads the tiles: no reuse
    parts = []
    for r0 in range(0, o, rows):
        r1 = min(o, r0 + rows)
        n = (r1 - r0) * k
        with torch.no_grad():
            tile = buf[2 * n : 3 * n].view(r1 - r0, k).copy_(w[r0:r1])
            evaluate_rows(tile, steps, r0, r1, buf, in_scales)
            tile = tile.to(weight.dtype, copy=keep).view(r1 - r0, *weight.shape[1:])
        b = None if bias is None else bias[r0:r1]
        if conv is None:
            parts.append(F.linear(x, tile, b))
        else:
            groups = conv.groups * (r1 - r0) // o
            sub = x if groups == conv.groups else _input_groups(x, conv.groups, r0 * conv.groups // o, groups)
            parts.append(run_conv(sub, tile, b, conv, groups, padded=conv.padding_mode != "zeros"))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=-1 if conv is None else 1)


def _input_groups(x: torch.Tensor, groups: int, first: int, count: int) -> torch.Tensor:
    per = x.shape[1] // groups
    return x[:, first * per : (first + count) * per]


def _tile_rows(o: int, k: int, device, multiple: int) -> int:
    """Rows per W' tile: a whole number of the layer's groups' output channels."""
    rows = tiled.rows_per_tile(k, tuning.BYPASS_TILE_ELEMS if torch.device(device).type == "cpu" else tile_elems(device))
    return min(o, max(multiple, rows // multiple * multiple))


# ---- added: y = f(x) + … ---------------------------------------------------------------------


class Pair(NamedTuple):
    """A step's ΔW as u (O, r) @ v (r, K), fp32: Khatri–Rao for a LoHa, the factors of a LoRA."""

    u: torch.Tensor
    v: torch.Tensor


def pair_of(step: Step) -> Pair:
    if step.kind == HADAMARD:
        a1, b1, a2, b2 = step.tensors
        return Pair(D.khatri_rao(a1, a2), D.face_split(b1, b2))
    if step.kind == MATMUL:
        return Pair(*step.tensors)
    raise ValueError(f"a {step.kind} step has no thin pair")


def chain_added(x: torch.Tensor, y: torch.Tensor, steps, scales, pairs, conv: Conv | None = None,
                weight_shape: tuple | None = None, w0x=None) -> torch.Tensor:
    """W_n·x from y = W_0·x (fp32, no bias, changed in place): the chain `steps.py` defines.

    Each plain step adds s·ΔW·x; an output-axis DoRA step turns y into
    y + s·(c ⊙ (y + ΔW·x) − y) with c = `scales[i]` (from `steps.dora_scales`); an
    input-axis one needs the chain before it at c⊙x, so it calls `w0x(inputs)` (W_0·inputs,
    fp32, no bias: the layer's own forward) once more. `pairs[i]` is the step's `Pair`, or
    None to rebuild its ΔW in tiles. `weight_shape` is the layer's (for convolutions).
    """
    for i, step in enumerate(steps):
        s = step.strength
        if step.dora is None:
            y = y.add_(delta_x(x, step, pairs[i], conv, weight_shape), alpha=s)
        elif step.axis == "out":
            merged = delta_x(x, step, pairs[i], conv, weight_shape).add_(y)
            y = y.add_(_channels(merged, scales[i], conv).sub_(y), alpha=s)
        else:
            xc = _scale_inputs(x, scales[i], conv)
            earlier = chain_added(xc, w0x(xc), steps[:i], scales[:i], pairs[:i], conv, weight_shape, w0x)
            merged = earlier.add_(delta_x(xc, step, pairs[i], conv, weight_shape))
            y = y.add_(merged.sub_(y), alpha=s)
    return y


def _channels(y: torch.Tensor, c: torch.Tensor, conv: Conv | None) -> torch.Tensor:
    c = c.to(y.device)
    return y.mul_(c if conv is None else c.view(-1, *([1] * conv.dims)))


def _scale_inputs(x: torch.Tensor, c: torch.Tensor, conv: Conv | None) -> torch.Tensor:
    """x with each input channel scaled as W·diag(c) scales its columns.

    c is per column of the O × K view; a convolution's columns are its group's input
    channels times its kernel positions, the same factor for every group.
    """
    c = c.to(device=x.device, dtype=_F32)
    if conv is None:
        return (x.float() * c).to(x.dtype)
    local = x.shape[1] // conv.groups
    c_in = c.view(local, -1)[:, 0].repeat(conv.groups)
    return (x.float() * c_in.view(-1, *([1] * conv.dims))).to(x.dtype)


def delta_x(x: torch.Tensor, step: Step, pair: Pair | None, conv: Conv | None = None,
            weight_shape: tuple | None = None) -> torch.Tensor:
    """scale·ΔW·x in fp32: through `pair` when given, else ΔW itself (rebuilt in row tiles)."""
    if conv is None and pair is None and x.device.type == "cuda" and _fused_linear([step], x):
        y = torch.zeros(*x.shape[:-1], step.tensors[0].shape[0], dtype=_F32, device=x.device)
        return _triton().linear_add_(y, x, *step.tensors, step.scale)
    xf = x.float()
    if conv is None:
        if pair is not None:
            return (xf @ pair.v.t()) @ pair.u.t() * step.scale
        return _linear_tiles(xf, step)
    shape = weight_shape
    o, g = shape[0], conv.groups
    if pair is not None:
        r = pair.u.shape[1]
        v = pair.v.view(r, *shape[1:])
        if g > 1:
            v = v.repeat(g, *([1] * (v.dim() - 1)))
        h = run_conv(xf, v, None, conv)
        u = pair.u.view(o, r, *([1] * conv.dims))
        return _CONV[conv.dims](h, u, None, 1, 0, 1, g).mul_(step.scale)
    return _conv_tiles(xf, step, conv, shape)


def _delta_tile(step: Step, r0: int, r1: int, k: int, device) -> torch.Tensor:
    from .steps import delta_rows

    n = (r1 - r0) * k
    buf = tiled.scratch(2 * n, device)
    return delta_rows(step, r0, r1, buf[:n].view(r1 - r0, k), buf[n : 2 * n].view(r1 - r0, k))


def _linear_tiles(xf: torch.Tensor, step: Step) -> torch.Tensor:
    o, k = step.tensors[0].shape[0], step.tensors[-1].shape[-1]
    rows = _tile_rows(o, k, xf.device, 1)
    parts = [xf @ _delta_tile(step, r0, min(o, r0 + rows), k, xf.device).t() for r0 in range(0, o, rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _conv_tiles(xf: torch.Tensor, step: Step, conv: Conv, shape: tuple) -> torch.Tensor:
    o = shape[0]
    k = math.prod(shape[1:])
    rows = _tile_rows(o, k, xf.device, o // conv.groups)
    padded, _ = conv_input(xf, conv)
    parts = []
    for r0 in range(0, o, rows):
        r1 = min(o, r0 + rows)
        groups = conv.groups * (r1 - r0) // o
        sub = padded if groups == conv.groups else _input_groups(padded, conv.groups, r0 * conv.groups // o, groups)
        tile = _delta_tile(step, r0, r1, k, xf.device).view(r1 - r0, *shape[1:])
        parts.append(run_conv(sub, tile, None, conv, groups, padded=conv.padding_mode != "zeros"))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ---- CUDA ---------------------------------------------------------------------------------


def _triton():
    """The Triton bypass module, or None where triton does not import (checked once)."""
    global _triton_module, _triton_failed
    if _triton_module is None and not _triton_failed:
        try:
            from . import triton_bypass

            _triton_module = triton_bypass
        except Exception:
            _triton_failed = True
    return _triton_module


def _fused_linear(steps, weight: torch.Tensor) -> bool:
    return (len(steps) == 1 and steps[0].kind == HADAMARD and steps[0].dora is None
            and weight.dtype in (torch.float16, torch.bfloat16, _F32) and _triton() is not None)
