"""Shared bench helpers: seeded random models (no downloads), timing, machine floors."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from loha.models.configs import PUBLISHED  # the bench scripts put the repository on sys.path

#: The published UNets' diffusers configs, as loha.models.configs holds them.
SD15 = PUBLISHED["sd1"]["unet"]
SDXL = PUBLISHED["sdxl"]["unet"]


def random_unet(config: dict, dtype=torch.float32, seed: int = 0):
    """A diffusers UNet2DConditionModel of the given size with seeded random weights.

    Built on the meta device and materialised once, so no time goes to the default
    initialisers; values are N(0, 0.02), which is all a patching benchmark needs.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype=dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return unet.eval().requires_grad_(False)


def release_freed_memory() -> None:
    """Hand memory freed by the last method back to the OS (glibc; a no-op elsewhere).

    The anchors allocate and free weight-sized temporaries per layer, and glibc keeps
    much of that in its heaps; on a shared machine the run can then be killed for
    memory. Called between timed runs, never inside one (the allocator's behaviour in
    the timed code is left as it is in the hosts).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def median(xs):
    return statistics.median(xs)


def timed(fn) -> float:
    gc.collect()
    release_freed_memory()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stream_bandwidth(nbytes: int = 1 << 29, reps: int = 5) -> dict:
    """Bytes read + written per second: a copy between two buffers, and an in-place pass."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    copy = min(timed(lambda: y.copy_(x)) for _ in range(reps))
    inplace = min(timed(lambda: x.mul_(1.0)) for _ in range(reps))
    return {"copy": 2 * nbytes / copy, "inplace": 2 * nbytes / inplace}


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """fp32 FLOP/s of a square matmul with torch's own threads (the BLAS peak here)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    t = min(timed(lambda: torch.mm(a, b, out=c)) for _ in range(reps))
    return 2 * n**3 / t
