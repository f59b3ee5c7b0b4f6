"""The math of one module's ΔW: reference forms, canonical factors, scale and DoRA.

Every LoHa module, Tucker or not, linear or conv, reduces to one canonical form

    ΔW (O × K) = (a1 @ b1) ⊙ (a2 @ b2),   a* (O, R), b* (R, K),  K = I·k·k

which is what the kernels consume. Tucker cores are folded into the `b` factors
first: branch[p, r…] = Σ_i w_a[i, p] · (Σ_j t[i, j, …] w_b[j, r]) = (w_aᵀ @ b')[p, r…].
Plain LoRA reduces to ΔW = a @ b the same way (its `lora_mid` core folded into b).
Everything here computes in fp32: the caller rounds once, to the weight's dtype.
"""

from __future__ import annotations

import math

import torch

_F32 = torch.float32


def module_scale(alpha: float | None, rank: int) -> float:
    """alpha/rank; a file without alpha means scale 1.

    alpha == 0 gives scale 0, as ComfyUI and the WebUI do (LyCORIS treats 0 as
    "alpha = rank" when it builds a module, but never writes 0 to a file).
    """
    if alpha is None:
        return 1.0
    return float(alpha) / rank


def fold_tucker(t: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker core (R, R, k…) into its b factor (R, I): b' (R, I·k…)."""
    folded = torch.einsum("ij...,jr->ir...", t.to(_F32), w_b.to(_F32))
    return folded.reshape(folded.shape[0], -1)


def hadamard_factors(w1a, w1b, w2a, w2b, t1=None, t2=None):
    """LoHa tensors as stored -> canonical (a1, b1, a2, b2) with a* (O, R), b* (R, K).

    Non-Tucker factors keep their stored dtype (the kernels widen tile by tile);
    Tucker factors come out fp32 since folding the core is already a computation.
    """
    if t1 is not None:
        return w1a.to(_F32).t(), fold_tucker(t1, w1b), w2a.to(_F32).t(), fold_tucker(t2, w2b)
    return (
        w1a.reshape(w1a.shape[0], -1),
        w1b.reshape(w1b.shape[0], -1),
        w2a.reshape(w2a.shape[0], -1),
        w2b.reshape(w2b.shape[0], -1),
    )


def lora_factors(up, down, mid=None):
    """LoRA tensors as stored -> canonical (a, b) with ΔW = a @ b.

    With a `lora_mid` core (LoCon Tucker), ΔW = einsum(mid, down, up), so the core
    folds into `down` the same way a LoHa core folds into `w_b`.
    """
    a = up.reshape(up.shape[0], -1)
    if mid is None:
        return a, down.reshape(down.shape[0], -1)
    return a.to(_F32), fold_tucker(mid, down.reshape(down.shape[0], -1))


def hadamard_delta(a1, b1, a2, b2) -> torch.Tensor:
    """Reference ΔW of canonical LoHa factors, fp32, (O, K)."""
    return (a1.to(_F32) @ b1.to(_F32)) * (a2.to(_F32) @ b2.to(_F32))


def lokr_delta(w1, w2) -> torch.Tensor:
    """LoKr ΔW = w1 ⊗ w2 (Kronecker), fp32; callers rebuild w1/w2 from their factors."""
    return torch.kron(w1.to(_F32), w2.to(_F32))


def khatri_rao(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker of two (O, R) factors: (O, R1·R2).

    With ``face_split`` this turns a rank-R LoHa into an exact rank-R² LoRA:
    (a1 @ b1) ⊙ (a2 @ b2) = khatri_rao(a1, a2) @ face_split(b1, b2).
    """
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def face_split(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker of two (R, K) factors: (R1·R2, K)."""
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])


def dora_axis(dora_scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str:
    """Which axis a `dora_scale` normalises: "out" for (O, 1, …), "in" for (1, I, …).

    LyCORIS writes the output axis by default; older files and the WebUI use the input axis.
    """
    ds = tuple(dora_scale_shape)
    size = math.prod(ds)
    if ds and ds[0] == weight_shape[0] and size == weight_shape[0]:
        return "out"
    if len(ds) >= 2 and ds[0] == 1 and ds[1] == weight_shape[1] and size == weight_shape[1]:
        return "in"
    raise ValueError(f"dora_scale shape {ds} fits neither axis of a weight {tuple(weight_shape)}")


def dora_merge(w0: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """W0 + s·(DoRA(W0 + ΔW) − W0), fp32, W0's shape.

    DoRA(W) = W · m / ‖W‖ with the norm taken over every axis but the one `dora_scale`
    lies along. ΔW carries alpha/rank but not the strength: the strength interpolates
    between the base and the fully decomposed weight, as the WebUI and ComfyUI define it.
    The norm is of W0 + ΔW (ComfyUI's output-axis path wrongly uses W0).
    """
    w0 = w0.to(_F32)
    merged = w0 + delta.to(_F32).reshape(w0.shape)
    axis = 0 if dora_axis(dora_scale.shape, w0.shape) == "out" else 1
    dims = [d for d in range(merged.dim()) if d != axis]
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(_F32).eps
    decomposed = merged * (dora_scale.to(_F32).reshape(norm.shape) / norm)
    return w0 + strength * (decomposed - w0)
