"""Fused application of ΔW into a weight, in place, dispatched by device, dtype and shape.

Entry points (signatures are the contract the patcher and the merge rely on):
- add_hadamard_(weight, a1, b1, a2, b2, scale): weight += scale·(a1@b1)⊙(a2@b2)
- add_hadamard_many_(items):                    the same for a list of `HadamardItem`s
- add_lowrank_(weight, a, b, scale):            weight += scale·(a@b)
- add_dense_(weight, delta, scale):             weight += scale·delta
- apply_steps_(weight, steps, source=None):     several networks, DoRA among them (`steps.py`)
- dora_scales(weight, steps):                   the per-channel DoRA factors a bypass needs
- hadamard_bypass(x, a1, b1, a2, b2, scale):    x @ (scale·ΔW)ᵀ, the cheaper form for x's token count
- the bypass products, y = f(x) + ΔW·x or y = (W+ΔW)·x, for any layer: `bypass.py`

`weight` is a contiguous tensor (fp16/bf16/fp32, CPU or CUDA; may be a row slice of a
bigger tensor) whose first axis is O; it is viewed as O × K. Factors are a* (O, R),
b* (R, K) of any float dtype and device (they are small and are moved). Math is fp32
with one rounding to weight's dtype at the end; no O × K temporary is allocated.

Dispatch (numbers in `tuning.py`, each with how it was measured):
- CUDA, LoHa: the Triton kernel (grouped, many layers per launch) when triton imports;
  the Khatri–Rao `addmm_` for fp32 weights at tiny rank products; else the
  row-tiled torch path.
- CPU: row tiles on single-threaded worker threads (tiled.py). Per tile, the optional
  native accelerator (native.c, built on first use when a C compiler exists: both
  products in registers, one pass over W); without it, pure torch: the two fp32
  products multiplied and added (oneDNN's fused linear·mul when torch has it and
  computes fp32 exactly, else two MKL GEMMs and addcmul_), or, when R1·R2 is small,
  the Khatri–Rao form `W.addmm_(a1•a2, b1∗b2)` from `loha.delta`.
"""

from __future__ import annotations

import torch

from .. import delta as D
from . import bypass, native, tiled, tuning
from .steps import Step, dora_scales
from .steps import apply_steps_ as _apply_steps
from .tiled import DENSE, HADAMARD, HADAMARD_NATIVE, HADAMARD_ONEDNN, MATMUL, HadamardItem, Job

_F32 = torch.float32
_triton_module = None
_triton_failed = False

__all__ = [
    "HadamardItem",
    "add_hadamard_",
    "add_hadamard_many_",
    "add_lowrank_",
    "add_dense_",
    "apply_steps_",
    "dora_scales",
    "hadamard_bypass",
    "Step",
    "step",
    "DENSE",
    "HADAMARD",
    "MATMUL",
]


def _triton():
    """The Triton kernel module, or None where triton does not import (checked once, lazily)."""
    global _triton_module, _triton_failed
    if _triton_module is None and not _triton_failed:
        try:
            from . import triton_hadamard

            _triton_module = triton_hadamard
        except Exception:  # no triton, or a triton that cannot load here
            _triton_failed = True
    return _triton_module


def _flat(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 0:
        raise ValueError("weight must have at least one axis")
    return weight.view(weight.shape[0], -1)


def _f32(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=_F32).contiguous()


def _raise_misfit(o: int, k: int, shapes: list, what: str) -> None:
    """Always raises: factors that do not fit the weight."""
    raise ValueError(f"{what} factors {shapes} do not fit a weight viewed as ({o}, {k})")


def _hadamard_job(weight: torch.Tensor, a1, b1, a2, b2, scale: float, source=None) -> Job:
    w = _flat(weight)
    src = None if source is None else source.reshape(w.shape)
    o, k = w.shape
    dev = w.device
    a1, b1, a2, b2 = (_f32(x, dev) for x in (a1, b1, a2, b2))
    r1, r2 = a1.shape[-1], a2.shape[-1]
    if a1.shape != (o, r1) or a2.shape != (o, r2) or b1.shape != (r1, k) or b2.shape != (r2, k):
        _raise_misfit(o, k, [tuple(x.shape) for x in (a1, b1, a2, b2)], "LoHa")
    cpu = dev.type == "cpu"
    use_native = cpu and tuning.CPU_NATIVE and native.supports(w.dtype)
    if use_native:
        limits = tuning.CPU_NATIVE_KR_MAX_RANK_PRODUCT
    else:
        limits = tuning.CPU_KR_MAX_RANK_PRODUCT if cpu else tuning.CUDA_KR_MAX_RANK_PRODUCT
    if r1 * r2 <= limits.get(w.dtype, 0):
        return Job(w, MATMUL, (D.khatri_rao(a1, a2), D.face_split(b1, b2)), float(scale), src)
    if use_native:
        return Job(w, HADAMARD_NATIVE, (a1, b1, a2, b2), float(scale), src)
    if cpu and _onednn_wins(max(r1, r2), k) and tiled.onednn_available():
        return Job(w, HADAMARD_ONEDNN, (a1, b1.t().contiguous(), a2, b2.t().contiguous()), float(scale), src)
    return Job(w, HADAMARD, (a1, b1, a2, b2), float(scale), src)


def _onednn_wins(r: int, k: int) -> bool:
    if r < tuning.CPU_ONEDNN_MIN_RANK:
        return False
    return not (r <= tuning.CPU_ONEDNN_MKL_MAX_RANK and k >= tuning.CPU_ONEDNN_MKL_MIN_K)


def _overlap_waves(weights: list[torch.Tensor]) -> list[list[int]]:
    """Indices in waves whose weights share no memory (in-place adds must not race).

    The patcher never passes overlapping weights; if a caller does, every item runs
    on its own, in the given order.
    """
    spans = sorted((w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()) for w in weights)
    if any(spans[j][0] < spans[j - 1][1] for j in range(1, len(spans))):
        return [[i] for i in range(len(weights))]
    return [list(range(len(weights)))]


def _run_jobs(jobs: list[Job]) -> None:
    if not jobs:
        return
    by_dev: dict = {}
    for j in jobs:
        by_dev.setdefault(j.weight.device, []).append(j)
    for dev, group in by_dev.items():
        for wave in _overlap_waves([j.weight for j in group]):
            part = [group[i] for i in wave]
            if dev.type == "cpu":
                tiled.run_cpu(part)
            else:
                tiled.run_serial(part, tuning.CUDA_TILE_ELEMS)


def _contiguous_target(weight: torch.Tensor):
    """(tensor to write, write-back) — a non-contiguous weight gets a working copy."""
    if weight.is_contiguous():
        return weight, None
    return weight.contiguous(), weight


@torch.no_grad()
def add_hadamard_many_(items) -> None:
    """weight += scale·(a1@b1)⊙(a2@b2) for every `HadamardItem` (or such a tuple) in items.

    An item with a `source` gets source + scale·ΔW instead (one read of the source, one
    write of the weight: patching into new memory). On CUDA the layers go to the Triton
    kernel in as few launches as possible; on CPU their row tiles are spread over the
    worker threads. Items whose weights overlap in memory are applied in order.
    """
    items = [HadamardItem(*it) for it in items]
    for it in items:
        if it.source is not None and (it.scale == 0 or it.weight.device.type != "cpu"):
            it.weight.copy_(it.source)  # nothing to add, or the GPU kernels work in place
    items = [it if it.weight.device.type == "cpu" else it._replace(source=None) for it in items]
    items = [it for it in items if it.scale != 0 and it.weight.numel() != 0]
    if not items:
        return
    writebacks = []
    prepared = []
    for item in items:
        target, back = _contiguous_target(item.weight)
        if back is not None:
            writebacks.append((back, target))
        prepared.append(item._replace(weight=target))
    tri = []
    jobs = []
    for it in prepared:
        w = it.weight
        if w.device.type == "cuda" and w.dtype in (torch.float16, torch.bfloat16, _F32) and _use_triton(it):
            tri.append(it)
        else:
            jobs.append(_hadamard_job(*it))
    if tri:
        mod = _triton()
        for wave in _overlap_waves([it.weight for it in tri]):
            mod.add_hadamard_many_([tri[i] for i in wave])
    _run_jobs(jobs)
    for back, target in writebacks:
        back.copy_(target)


def _use_triton(item: HadamardItem) -> bool:
    if _triton() is None:
        return False
    r1, r2 = item.a1.shape[-1], item.a2.shape[-1]
    return r1 * r2 > tuning.CUDA_KR_MAX_RANK_PRODUCT.get(item.weight.dtype, 0)


def add_hadamard_(weight, a1, b1, a2, b2, scale: float) -> None:
    """weight += scale·(a1@b1)⊙(a2@b2), in place, fp32 math, one rounding."""
    add_hadamard_many_([(weight, a1, b1, a2, b2, scale)])


def step(kind: str, tensors, scale: float, strength: float, shape: tuple, device,
         dora_scale: torch.Tensor | None = None) -> Step:
    """A `Step` for a weight of `shape` on `device`: fp32 factors there, the DoRA axis from the shapes.

    kind: HADAMARD (a1, b1, a2, b2 canonical), MATMUL (a, b) or DENSE (ΔW of O·K elements).
    """
    o = shape[0]
    tensors = tuple(_f32(t, device) for t in tensors)
    if kind == DENSE:
        tensors = (tensors[0].reshape(o, -1),)
    if dora_scale is None:
        return Step(kind, tensors, float(scale), float(strength))
    axis = D.dora_axis(tuple(dora_scale.shape), tuple(shape))
    return Step(kind, tensors, float(scale), float(strength), _f32(dora_scale, device).reshape(-1), axis)


@torch.no_grad()
def apply_steps_(weight: torch.Tensor, steps, source: torch.Tensor | None = None) -> None:
    """weight ← the chain of `steps` applied to (source or weight), fp32, rounded once.

    For a tensor changed by several networks, or by DoRA: tile by tile, the norms of
    W0+ΔW inside each tile (one pass; an input-axis DoRA adds one read pass), no O × K
    temporary. `source`, when given, is read instead of `weight` (patching into new memory).
    """
    if weight.numel() == 0:
        return
    target, back = _contiguous_target(weight)
    _apply_steps(target, list(steps), source)
    if back is not None:
        back.copy_(target)


@torch.no_grad()
def add_lowrank_(weight, a, b, scale: float) -> None:
    """weight += scale·(a@b) (LoRA), in place, fp32 math, one rounding."""
    if scale == 0 or weight.numel() == 0:
        return
    target, back = _contiguous_target(weight)
    w = _flat(target)
    o, k = w.shape
    a, b = _f32(a, w.device), _f32(b, w.device)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != o or b.shape != (a.shape[1], k):
        _raise_misfit(o, k, [tuple(a.shape), tuple(b.shape)], "LoRA")
    _run_jobs([Job(w, MATMUL, (a, b), float(scale))])
    if back is not None:
        back.copy_(target)


@torch.no_grad()
def add_dense_(weight, delta, scale: float) -> None:
    """weight += scale·delta, in place, fp32 math, one rounding."""
    if scale == 0 or weight.numel() == 0:
        return
    target, back = _contiguous_target(weight)
    w = _flat(target)
    if delta.numel() != w.numel():
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(weight.shape)}")
    d = delta.to(w.device).reshape(w.shape)
    _run_jobs([Job(w, DENSE, (d,), float(scale))])
    if back is not None:
        back.copy_(target)


@torch.no_grad()
def hadamard_bypass(x: torch.Tensor, a1, b1, a2, b2, scale: float) -> torch.Tensor:
    """x @ (scale·(a1@b1)⊙(a2@b2))ᵀ for a Linear layer's input x (..., K) -> (..., O), in x's dtype.

    Never an O × K buffer: through the exact rank-R1·R2 Khatri–Rao pair, x·(b1∗b2)ᵀ·(a1•a2)ᵀ,
    or through ΔW rebuilt in row tiles, whichever `bypass.choose_added` finds cheaper for
    x's token count. fp32 math, one rounding.
    """
    o, k = a1.shape[0], b1.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"input of shape {tuple(x.shape)} does not fit LoHa factors with K={k}")
    st = step(HADAMARD, (a1, b1, a2, b2), scale, 1.0, (o, k), x.device)
    form = bypass.choose_added(st, bypass.tokens(x, None), o, k, 1, x.device)
    return bypass.delta_x(x, st, bypass.pair_of(st) if form == bypass.KHATRI_RAO else None).to(x.dtype)
