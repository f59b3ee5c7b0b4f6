"""Optional native CPU accelerator for the LoHa tile (native.c), built on first use.

Never required: when there is no C compiler, the build fails, the self-test disagrees
with torch, or LOHA_NATIVE=0 is set, `lib()` returns None and the pure-torch tiles
run instead. The library is plain C loaded with ctypes (no Python or torch headers,
so it builds in about a second), compiled with -march=native and cached per source,
compiler and CPU under $LOHA_CACHE_DIR or ~/.cache/loha. ctypes drops the GIL during
each call, so the worker threads in tiled.py run tiles side by side.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("native.c")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lock = threading.Lock()
_lib = None  # None: not tried yet; False: unavailable
_reason = ""
_supported: set = set()  # dtypes the loaded build passed its self-test for


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("LOHA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loha")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def build(cc: str, march: str = "native", out_dir: Path | None = None) -> Path:
    """Compile native.c (cached by source, compiler, CPU and flags); returns the library path."""
    src = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    ident = src + version.encode() + _cpu_id().encode() + sys.platform.encode() + march.encode()
    out = (out_dir or _cache_dir()) / f"loha_native_{hashlib.sha256(ident).hexdigest()[:16]}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / out.name
        arch = f"-mcpu={march}" if platform.machine() in ("arm64", "aarch64") else f"-march={march}"
        flags = [arch, "-O3", "-shared", "-fPIC", "-Wno-psabi", "-fno-math-errno"]
        proc = subprocess.run(
            [cc, *flags, "-o", str(tmp_out), str(_SOURCE)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr[-2000:]}")
        staged = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(tmp_out, staged)
        os.replace(staged, out)  # atomic: processes building at once all end with one good file
    return out


def load(path: Path):
    """The kernel function of a built library, with its C signature."""
    fn = ctypes.CDLL(str(path)).loha_hadamard_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
    ]  # fmt: skip
    return fn


def self_test(fn) -> set:
    """The dtypes `fn` gets right (odd shapes against the fp32 torch result rounded once)."""
    g = torch.Generator().manual_seed(0)
    good = set()
    for dtype in _DTYPES:
        for o, k, r1, r2 in ((7, 77, 3, 5), (9, 64, 16, 1)):
            w = torch.randn(o, k, generator=g).to(dtype)
            f = [torch.randn(*s, generator=g) for s in ((o, r1), (r1, k), (o, r2), (r2, k))]
            want = (w.float() + 0.5 * ((f[0] @ f[1]) * (f[2] @ f[3]))).to(dtype)
            if _call(fn, w, *f, 0.5) != 0:  # e.g. fp16 where the build has no conversions
                break
            delta = 0.5 * ((f[0] @ f[1]) * (f[2] @ f[3]))
            rel = {torch.float32: 2**-20, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
            allowed = (want.float().abs() * rel).clamp_min(1e-5 * delta.abs().max().item())
            if ((w.float() - want.float()).abs() > allowed).any():
                break
        else:
            good.add(dtype)
    return good


def _call(fn, w, a1, b1, a2, b2, scale: float) -> int:
    o, k = w.shape[0], w.numel() // max(1, w.shape[0])
    return fn(
        w.data_ptr(), _DTYPES[w.dtype], o, k,
        a1.data_ptr(), b1.data_ptr(), a1.shape[1],
        a2.data_ptr(), b2.data_ptr(), a2.shape[1], float(scale),
    )  # fmt: skip


def lib():
    """The loaded accelerator function, or None (see the module docstring)."""
    global _lib, _reason
    if _lib is None:
        with _lock:
            if _lib is None:
                if os.environ.get("LOHA_NATIVE", "1") == "0":
                    _lib, _reason = False, "disabled by LOHA_NATIVE=0"
                elif compiler() is None:
                    _lib, _reason = False, "no C compiler"
                elif not _SOURCE.exists():
                    _lib, _reason = False, "native.c is not installed"
                else:
                    try:
                        fn = load(build(compiler()))
                        _supported.update(self_test(fn))
                        _lib, _reason = (fn, "") if torch.float32 in _supported else (False, "self-test failed")
                    except Exception as e:  # any failure leaves the torch path
                        _lib, _reason = False, f"{type(e).__name__}: {e}"
    return _lib or None


def why_not() -> str:
    """Why the accelerator is not in use ('' when it is)."""
    lib()
    return _reason


def supports(dtype: torch.dtype) -> bool:
    return lib() is not None and dtype in _supported


def hadamard_rows(w: torch.Tensor, a1, b1, a2, b2, scale: float, fn=None) -> None:
    """W (rows × K, contiguous) += scale·(a1@b1)⊙(a2@b2); factors fp32 contiguous, CPU."""
    if _call(fn or lib(), w, a1, b1, a2, b2, scale) != 0:
        raise RuntimeError(f"native LoHa kernel cannot handle {w.dtype}")
