"""Triton kernel: a linear layer's output with a LoHa applied, W' never stored.

Each program computes a BLOCK_T × BLOCK_O tile of y = x·W'ᵀ (+ b). Along K it builds
the matching BLOCK_O × BLOCK_K tile of ΔW from the four factors in registers (both
products with fp32 accumulation, multiplied), and either adds it to the same tile of W
rounded once to W's dtype (merged: exactly the patched weight, so the GEMM runs in the
layer's dtype on tensor cores), or multiplies it alone and adds the result to an
existing output (added: y += s·x·ΔWᵀ, where W cannot be read). ΔW is rebuilt once per
BLOCK_T rows of x: cheap next to the GEMM for the token counts of a diffusion step.

Imports triton at the top: the dispatcher imports it lazily, for CUDA tensors; the
tests run it on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import tuning
from .triton_hadamard import padded_rank, round_to

_F32 = torch.float32
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _linear_kernel(
    X, W, BIAS, Y, A1, B1, A2, B2,
    scale, n_tokens, n_out, n_in, r1n, r2n,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_Y: tl.constexpr, W_TY: tl.constexpr, LOWP_DOT: tl.constexpr,
    RP1: tl.constexpr, RP2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rmask = rows < n_tokens
    omask = outs < n_out
    k1 = tl.arange(0, RP1)
    k2 = tl.arange(0, RP2)
    a1 = tl.load(A1 + outs[:, None] * r1n + k1[None, :], mask=omask[:, None] & (k1[None, :] < r1n), other=0.0)
    a2 = tl.load(A2 + outs[:, None] * r2n + k2[None, :], mask=omask[:, None] & (k2[None, :] < r2n), other=0.0)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < n_in
        b1 = tl.load(B1 + k1[:, None] * n_in + ks[None, :], mask=(k1[:, None] < r1n) & kmask[None, :], other=0.0)
        b2 = tl.load(B2 + k2[:, None] * n_in + ks[None, :], mask=(k2[:, None] < r2n) & kmask[None, :], other=0.0)
        d = tl.dot(a1, b1, input_precision=PRECISION) * tl.dot(a2, b2, input_precision=PRECISION)
        x = tl.load(X + rows[:, None].to(tl.int64) * n_in + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if HAS_W:
            wmask = omask[:, None] & kmask[None, :]
            w = tl.load(W + outs[:, None].to(tl.int64) * n_in + ks[None, :], mask=wmask, other=0.0)
            merged = round_to(w.to(tl.float32) + scale * d, W_TY)  # the patched weight's tile
            if W_TY == tl.float32 or not LOWP_DOT:  # fp16/bf16 values are exact in fp32
                acc += tl.dot(x.to(W_TY).to(tl.float32), tl.trans(merged.to(tl.float32)), input_precision=PRECISION)
            else:  # tensor cores in the layer's dtype, as the patched layer's GEMM
                acc += tl.dot(x.to(W_TY), tl.trans(merged))
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(d), input_precision=PRECISION)
    if not HAS_W:
        acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(BIAS + outs, mask=omask, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None].to(tl.int64) * n_out + outs[None, :]
    mask = rmask[:, None] & omask[None, :]
    if ADD_Y:
        acc += tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, round_to(acc, Y.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(x, weight, bias, y, a1, b1, a2, b2, scale, add_y: bool, block_t=None, block_o=None, block_k=None,
            num_warps=None, precision=None):
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in).contiguous()
    dev = x.device
    f = [t.to(dev, _F32).contiguous() for t in (a1, b1, a2, b2)]
    o, r1, r2 = f[0].shape[0], f[0].shape[1], f[2].shape[1]
    if f[2].shape[0] != o or f[1].shape != (r1, n_in) or f[3].shape != (r2, n_in):
        raise ValueError(f"LoHa factors {[tuple(t.shape) for t in f]} do not fit a linear layer of {n_in} inputs")
    if weight is not None and (weight.shape[0] != o or weight[0].numel() != n_in):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit factors for ({o}, {n_in})")
    w_ty = _TL_DTYPE[weight.dtype] if weight is not None else tl.float32
    block_t = block_t or tuning.TRITON_BYPASS_BLOCK_T
    block_o = block_o or tuning.TRITON_BYPASS_BLOCK_O
    block_k = block_k or tuning.TRITON_BYPASS_BLOCK_K
    if precision is None:
        precision = "ieee" if _interpreting() else tuning.TRITON_PRECISION
    t = x2.shape[0]
    grid = (triton.cdiv(t, block_t), triton.cdiv(o, block_o))
    _linear_kernel[grid](
        x2, x2 if weight is None else weight.contiguous(), x2 if bias is None else bias.contiguous(), y, *f,
        float(scale), t, o, n_in, r1, r2,
        HAS_W=weight is not None, HAS_BIAS=bias is not None, ADD_Y=add_y, W_TY=w_ty,
        LOWP_DOT=not _interpreting(),  # the interpreter's bf16 dot is wrong; fp32 gives the same values
        RP1=padded_rank(r1), RP2=padded_rank(r2),
        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_K=block_k, PRECISION=precision,
        num_warps=num_warps or tuning.TRITON_NUM_WARPS,
        enable_fp_fusion=True,  # explicit: Triton 3.9 warns when unset
    )  # fmt: skip
    return y


@torch.no_grad()
def linear_merged(x, weight, bias, a1, b1, a2, b2, scale: float, **launch) -> torch.Tensor:
    """x·(W + scale·(a1@b1)⊙(a2@b2))ᵀ + b, W' rounded to W's dtype tile by tile; y in x's dtype."""
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    return _launch(x, weight, bias, y, a1, b1, a2, b2, scale, False, **launch)


@torch.no_grad()
def linear_add_(y, x, a1, b1, a2, b2, scale: float, **launch) -> torch.Tensor:
    """y += scale·x·((a1@b1)⊙(a2@b2))ᵀ in place (y contiguous, (…, O)); fp32 math, one rounding."""
    if not y.is_contiguous():
        raise ValueError("the output must be contiguous")
    return _launch(x, None, None, y, a1, b1, a2, b2, scale, True, **launch)
