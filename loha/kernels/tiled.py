"""Pure-torch row-tiled application of ΔW, and the CPU worker threads that run it.

A job is one weight (viewed O × K) and the factors of its ΔW, already fp32 and on
the weight's device. It is cut into row tiles; each tile computes its part of ΔW in
a small fp32 scratch (so it is still in cache), adds it into the rows of W and
rounds once to W's dtype. No O × K temporary is ever made.

On CPU, small GEMMs and element-wise passes barely gain from torch's intra-op
threads, so tiles go to a pool of worker threads that each run single-threaded
ops (torch releases the GIL inside every op): independent tiles, of one layer or of
many, run side by side.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from contextlib import contextmanager
from typing import NamedTuple

import torch

from . import native, tuning

_F32 = torch.float32

# Job kinds.
HADAMARD = "hadamard"  # tensors (a1, b1, a2, b2): two products, multiplied
HADAMARD_ONEDNN = "hadamard-onednn"  # tensors (a1, b1ᵀ, a2, b2ᵀ): oneDNN, product fused (CPU)
HADAMARD_NATIVE = "hadamard-native"  # tensors (a1, b1, a2, b2): the optional C tile (CPU)
MATMUL = "matmul"  # tensors (u, v): u @ v (LoRA, or the Khatri–Rao form of a LoHa)
DENSE = "dense"  # tensors (delta,): delta itself, (O, K)
ROWS_FN = "rows-fn"  # tensors (fn,): fn(rows, r0, r1, scratch) changes fp32 rows r0:r1 in place


class HadamardItem(NamedTuple):
    """One layer of a grouped call: weight = (source or weight) + scale·(a1@b1)⊙(a2@b2)."""

    weight: torch.Tensor  # viewed (O, K); may be a row slice of a bigger tensor
    a1: torch.Tensor  # (O, R1)
    b1: torch.Tensor  # (R1, K)
    a2: torch.Tensor  # (O, R2)
    b2: torch.Tensor  # (R2, K)
    scale: float
    source: torch.Tensor | None = None  # read instead of weight (the result goes to new memory)


class Job(NamedTuple):
    """One weight's work for the row tiles: its kind and the tensors that kind needs."""

    weight: torch.Tensor  # (O, K) view of the weight, contiguous
    kind: str
    tensors: tuple
    scale: float
    source: torch.Tensor | None = None  # (O, K), any float dtype: each tile starts from its rows


class _Scratch(threading.local):
    """One growing fp32 buffer per thread and device."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, n: int, device: torch.device) -> torch.Tensor:
        buf = self.bufs.get(device)
        if buf is None or buf.numel() < n:
            # A normal tensor even when made under inference mode, so later calls
            # outside it may still write into it.
            with torch.inference_mode(False):
                buf = torch.empty(n, dtype=_F32, device=device)
            self.bufs[device] = buf
        return buf


_scratch = _Scratch()


def scratch(n: int, device) -> torch.Tensor:
    """This thread's fp32 scratch on `device`, at least `n` elements (CPU: kept and reused)."""
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=_F32, device=device)
    return _scratch.get(n, torch.device(device))


_linear = None


def onednn_available() -> bool:
    """oneDNN's fused linear (the op torch's CPU compiler emits) computes in true fp32 here."""
    global _linear
    if _linear is None:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            prec = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "ieee")
            if not torch.backends.mkldnn.is_available() or prec not in ("ieee", "none"):
                raise RuntimeError("oneDNN unavailable or not in fp32 mode")
            a, b, c = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5)
            if not torch.allclose(op.binary(a, c, b, None, "mul"), (a @ b.t()) * c, rtol=1e-6, atol=1e-6):
                raise RuntimeError("oneDNN fused linear disagrees with matmul")
            _linear = op
        except Exception:
            _linear = False
    return bool(_linear)


def rows_per_tile(k: int, tile_elems: int) -> int:
    return max(1, tile_elems // max(1, k))


def run_rows(job: Job, r0: int, r1: int, scratch: torch.Tensor | None = None) -> None:
    """W[r0:r1] += scale · ΔW[r0:r1], computed in fp32 and rounded once."""
    w = job.weight[r0:r1]
    n, k = w.shape
    m = n * k
    if m == 0:
        return
    if job.source is not None:  # out of place: the tile starts from the source's rows (in cache)
        w.copy_(job.source[r0:r1])
    if job.kind == HADAMARD_NATIVE:  # one pass over W, no scratch
        a1, b1, a2, b2 = job.tensors
        native.hadamard_rows(w, a1[r0:r1], b1, a2[r0:r1], b2, job.scale)
        return
    exact = w.dtype == _F32
    if scratch is None:
        scratch = _scratch.get(3 * m, w.device)
    if exact:
        acc = w
    else:
        acc = scratch[2 * m : 3 * m].view(n, k)
        acc.copy_(w)
    s = job.scale
    if job.kind == HADAMARD:
        a1, b1, a2, b2 = job.tensors
        p1 = torch.mm(a1[r0:r1], b1, out=scratch[:m].view(n, k))
        p2 = torch.mm(a2[r0:r1], b2, out=scratch[m : 2 * m].view(n, k))
        acc.addcmul_(p1, p2, value=s)
    elif job.kind == HADAMARD_ONEDNN:
        a1, b1t, a2, b2t = job.tensors
        p2 = _linear(a2[r0:r1], b2t, None, "none", [], "")
        p = _linear.binary(a1[r0:r1], p2, b1t, None, "mul")  # (a1@b1)⊙p2 in one oneDNN call
        acc.add_(p, alpha=s)
    elif job.kind == MATMUL:
        u, v = job.tensors
        acc.addmm_(u[r0:r1], v, alpha=s)
    elif job.kind == ROWS_FN:
        job.tensors[0](acc, r0, r1, scratch)
    else:
        d = job.tensors[0][r0:r1]
        if d.dtype != _F32:
            d = scratch[:m].view(n, k).copy_(d)
        acc.add_(d, alpha=s)
    if not exact:
        w.copy_(acc)


def tiles(jobs: list[Job], tile_elems: int) -> list[tuple[Job, int, int]]:
    out = []
    for job in jobs:
        o, k = job.weight.shape
        step = rows_per_tile(k, tile_elems)
        out.extend((job, r0, min(o, r0 + step)) for r0 in range(0, o, step))
    return out


def run_serial(jobs: list[Job], tile_elems: int) -> None:
    """All tiles in the calling thread (CPU: torch's intra-op threads; CUDA: one stream)."""
    work = tiles(jobs, tile_elems)
    if not work:
        return
    scratch = None
    dev = work[0][0].weight.device
    if dev.type != "cpu":  # one scratch per call, back to the caching allocator after
        need = max(3 * (r1 - r0) * job.weight.shape[1] for job, r0, r1 in work)
        scratch = torch.empty(need, dtype=_F32, device=dev)
    for job, r0, r1 in work:
        run_rows(job, r0, r1, scratch)


# ---- CPU worker threads ----------------------------------------------------------------


class _Batch:
    def __init__(self, work: list, n_workers: int):
        self.work = work
        self.next = itertools.count()
        self.done = threading.Semaphore(0)
        self.errors: list[BaseException] = []
        self.n_workers = n_workers
        # Autograd modes are per thread. Tensors made under inference mode (ComfyUI runs
        # nodes so) may only be updated in place under it, so the workers take the
        # caller's; and they never record autograd (weights may be parameters that
        # require grad, viewed under the caller's no_grad).
        self.inference = torch.is_inference_mode_enabled()


class _Pool:
    """Persistent single-threaded workers.

    With the OpenMP backend, the thread count that ATen and MKL use is a per-thread
    setting that a new thread copies from torch's global value the first time it
    runs an op. The workers start while that value is 1 and keep it; the caller's
    own setting is restored right after, so nothing outside this pool changes.
    """

    def __init__(self, n: int):
        self.n = n
        self.pid = os.getpid()
        self.queues: list[queue.SimpleQueue] = []
        started = threading.Barrier(n + 1)
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(n):
                q: queue.SimpleQueue = queue.SimpleQueue()
                t = threading.Thread(target=self._loop, args=(q, started), name=f"loha-kernels-{i}", daemon=True)
                t.start()
                self.queues.append(q)
            started.wait()
        finally:
            torch.set_num_threads(prev)

    @staticmethod
    def _loop(q: queue.SimpleQueue, started: threading.Barrier) -> None:
        torch.get_num_threads()  # fixes this thread's intra-op count at 1 (see above)
        started.wait()
        while True:
            batch = q.get()
            if batch is None:
                return
            try:
                with torch.inference_mode(batch.inference), torch.no_grad():
                    while not batch.errors:
                        i = next(batch.next)
                        if i >= len(batch.work):
                            break
                        job, r0, r1 = batch.work[i]
                        run_rows(job, r0, r1)
            except BaseException as e:  # reported to the caller
                batch.errors.append(e)
            finally:
                batch.done.release()

    def run(self, work: list) -> None:
        batch = _Batch(work, self.n)
        for q in self.queues:
            q.put(batch)
        for _ in range(self.n):
            batch.done.acquire()
        if batch.errors:
            raise batch.errors[0]

    def close(self) -> None:
        for q in self.queues:
            q.put(None)


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool(n: int) -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.n != n or _pool.pid != os.getpid():
            if _pool is not None and _pool.pid == os.getpid():
                _pool.close()
            _pool = _Pool(n)
        return _pool


@contextmanager
def one_thread():
    """This thread's torch ops single-threaded inside the block.

    For many small tensors (checking a network's factors, say): with several OpenMP
    threads each tiny op pays a barrier, and on a busy machine that costs more than the
    math (planning an SD1.5 LoHa: 0.07 s on one thread, 0.4 s on two). The caller's own
    setting is put back after, as `_Pool` does.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_cpu(jobs: list[Job], tile_elems: int | None = None, threads: int | None = None) -> None:
    """Run CPU jobs: tiny ones in the caller, the rest tile by tile on the worker threads.

    Jobs must not overlap in memory (the caller splits overlapping ones into waves).
    """
    tile_elems = tile_elems or tuning.CPU_TILE_ELEMS
    n = threads if threads is not None else torch.get_num_threads()
    total = sum(j.weight.numel() for j in jobs)
    if n <= 1 or total < tuning.CPU_PARALLEL_MIN_ELEMS:
        run_serial(jobs, tile_elems)
        return
    # Tiles no bigger than an even share, so that one layer alone still uses every worker.
    work = tiles(jobs, max(1, min(tile_elems, -(-total // n))))
    # Largest tiles first, so the last ones to finish are small.
    work.sort(key=lambda t: -(t[2] - t[1]) * t[0].weight.shape[1])
    _get_pool(n).run(work)
