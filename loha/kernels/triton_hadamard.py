"""Triton kernel: W += s·(a1@b1)⊙(a2@b2), one tile of W per program, many layers per launch.

Each program finds its layer in a table (binary search over the layers' first tile
numbers), loads the BLOCK_M rows of a1/a2 and the BLOCK_N columns of b1/b2 (ranks
padded to a power of two ≥ 16 with masked loads, so tl.dot accepts them), forms both
products with fp32 accumulation, multiplies them, adds the tile of W in fp32 and
stores it rounded once (round-to-nearest-even) to W's dtype. W is read once and
written once; ΔW never exists in memory.

The table holds raw addresses, so one launch covers any number of layers of one W
dtype and one pair of padded ranks. This module imports triton at the top: import
it only when Triton is wanted (the dispatcher does so lazily, for CUDA tensors, and
the tests under TRITON_INTERPRET=1 on CPU tensors).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import torch
import triton
import triton.language as tl

from . import tuning

_F32 = torch.float32
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _hadamard_tile_kernel(
    META,  # int64 (n, 9): w, a1, b1, a2, b2 addresses, O, K, R1, R2
    STARTS,  # int64 (n + 1): first tile number of each layer, then the total
    SCALES,  # fp32 (n,)
    n_layers,
    W_TY: tl.constexpr,
    RP1: tl.constexpr,
    RP2: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Binary search: the layer l with STARTS[l] <= pid < STARTS[l + 1].
    lo = pid * 0
    hi = lo + n_layers
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = tl.load(STARTS + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = META + lo * 9
    w_ptr = tl.load(row + 0).to(tl.pointer_type(W_TY))
    a1_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    b1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    a2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    b2_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    n_rows = tl.load(row + 5).to(tl.int32)
    n_cols = tl.load(row + 6).to(tl.int32)
    r1n = tl.load(row + 7).to(tl.int32)
    r2n = tl.load(row + 8).to(tl.int32)
    scale = tl.load(SCALES + lo)

    # Tile coordinates; 64-bit only for the tile's base addresses, 32-bit offsets inside
    # it (fewer registers; BLOCK_M·K < 2^31 always holds for a weight).
    t = (pid - tl.load(STARTS + lo)).to(tl.int32)
    col_tiles = tl.cdiv(n_cols, BLOCK_N)
    row0 = (t // col_tiles) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    cols = (t % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows - row0
    cmask = cols < n_cols
    w_ptr += row0.to(tl.int64) * n_cols
    a1_ptr += row0.to(tl.int64) * r1n
    a2_ptr += row0.to(tl.int64) * r2n

    k1 = tl.arange(0, RP1)
    a1 = tl.load(a1_ptr + rows[:, None] * r1n + k1[None, :], mask=rmask[:, None] & (k1[None, :] < r1n), other=0.0)
    b1 = tl.load(b1_ptr + k1[:, None] * n_cols + cols[None, :], mask=(k1[:, None] < r1n) & cmask[None, :], other=0.0)
    p = tl.dot(a1, b1, input_precision=PRECISION)
    k2 = tl.arange(0, RP2)
    a2 = tl.load(a2_ptr + rows[:, None] * r2n + k2[None, :], mask=rmask[:, None] & (k2[None, :] < r2n), other=0.0)
    b2 = tl.load(b2_ptr + k2[:, None] * n_cols + cols[None, :], mask=(k2[:, None] < r2n) & cmask[None, :], other=0.0)
    p = p * tl.dot(a2, b2, input_precision=PRECISION)

    offs = rows[:, None] * n_cols + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    # W is loaded after the products: loaded first it would stay live across both dots
    # (about 50% more registers at 64×64, half the resident blocks per SM).
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) + scale * p
    tl.store(w_ptr + offs, round_to(out, W_TY), mask=mask)


@triton.jit
def round_to(x, TY: tl.constexpr):
    """fp32 `x` rounded to nearest even in TY, the same bits on the GPU and in the interpreter."""
    if TY == tl.bfloat16:
        # By hand: the interpreter's fp32->bf16 cast truncates.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # keep NaN a NaN
    else:
        return x.to(TY)


def padded_rank(r: int) -> int:
    """Next power of two, at least 16 (tl.dot's smallest inner size)."""
    return max(16, 1 << (max(1, r) - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def add_hadamard_many_(
    items,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    precision: str | None = None,
) -> None:
    """W += s·(a1@b1)⊙(a2@b2) for each (W, a1, b1, a2, b2, s), grouped into few launches.

    W: contiguous, fp16/bf16/fp32, on the device the kernel runs on (CUDA; or CPU
    under TRITON_INTERPRET=1). Factors of any float dtype/device; a* (O, R), b* (R, K).
    Items must not overlap in memory (the dispatcher splits overlapping ones).
    """
    block_m = block_m or tuning.TRITON_BLOCK_M
    block_n = block_n or tuning.TRITON_BLOCK_N
    num_warps = num_warps or tuning.TRITON_NUM_WARPS
    if precision is None:
        precision = "ieee" if _interpreting() else tuning.TRITON_PRECISION
    groups: dict = defaultdict(list)
    keep = []  # factor copies must outlive the launch
    for w, a1, b1, a2, b2, s, *_ in items:
        if s == 0 or w.numel() == 0:
            continue
        if w.dtype not in _TL_DTYPE:
            raise TypeError(f"Triton LoHa kernel: weight dtype {w.dtype} is not fp16/bf16/fp32")
        if not w.is_contiguous():
            raise ValueError("Triton LoHa kernel: weight must be contiguous")
        dev = w.device
        o = w.shape[0]
        k = w.numel() // o
        f = [x.to(dev, _F32).contiguous() for x in (a1, b1, a2, b2)]
        r1, r2 = f[0].shape[1], f[2].shape[1]
        if f[0].shape[0] != o or f[2].shape[0] != o or f[1].shape != (r1, k) or f[3].shape != (r2, k):
            raise ValueError(
                f"LoHa factors {[tuple(x.shape) for x in f]} do not fit a weight of shape {tuple(w.shape)} (O={o}, K={k})"
            )
        keep.append(f)
        key = (dev, w.dtype, padded_rank(r1), padded_rank(r2))
        groups[key].append((w, f, o, k, r1, r2, float(s)))
    for (dev, dtype, rp1, rp2), group in groups.items():
        meta, starts, scales = [], [0], []
        for w, f, o, k, r1, r2, s in group:
            meta.append([w.data_ptr(), *(x.data_ptr() for x in f), o, k, r1, r2])
            starts.append(starts[-1] + triton.cdiv(o, block_m) * triton.cdiv(k, block_n))
            scales.append(s)
        n = len(group)
        meta_t = torch.tensor(meta, dtype=torch.int64).to(dev)
        starts_t = torch.tensor(starts, dtype=torch.int64).to(dev)
        scales_t = torch.tensor(scales, dtype=_F32).to(dev)
        steps = max(1, math.ceil(math.log2(n))) if n > 1 else 0
        steps = 1 << (steps - 1).bit_length() if steps else 0  # few distinct compiles
        _hadamard_tile_kernel[(starts[-1],)](
            meta_t,
            starts_t,
            scales_t,
            n,
            W_TY=_TL_DTYPE[dtype],
            RP1=rp1,
            RP2=rp2,
            SEARCH_STEPS=steps,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            PRECISION=precision,
            num_warps=num_warps,
            enable_fp_fusion=True,  # w + s·p as one fma (explicit: Triton 3.9 warns when unset)
        )
    del keep


def add_hadamard_(weight, a1, b1, a2, b2, scale: float, **launch) -> None:
    add_hadamard_many_([(weight, a1, b1, a2, b2, scale)], **launch)
