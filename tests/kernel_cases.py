"""Shared inputs and the once-rounded check for the kernel tests (CPU and Triton).

Every result must equal round(W.float() + s·ΔW) to W's dtype: within ~1e-5 (relative to
ΔW) for fp32 weights, and at most one ulp away for fp16/bf16 weights (the products are
summed in another order than the reference's, so a value right on a rounding boundary
may land on the other side).

The cases run on the CPU unless LOHA_TEST_DEVICE names another device (`bench/gpu.sh` runs
them with LOHA_TEST_DEVICE=cuda): the inputs are drawn on the CPU from the same seeds and
moved there, so both devices check the same numbers against the same bounds.
"""

import os

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: Where the kernel tests put their tensors.
DEVICE = torch.device(os.environ.get("LOHA_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("LOHA_TEST_DEVICE=cuda, but this torch sees no CUDA device")
    # The references are plain fp32 products: no TF32 inside torch's own matmuls and convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

#: For tests of the CPU dispatch itself (tile forms, worker threads, the native tile).
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="tests the CPU dispatch")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def ordered(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 bit patterns as integers that count ulps across zero."""
    b = x.view(torch.int16).to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def assert_rounded_once(out: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor, scale: float):
    """out == round(w0.float() + scale·delta) to out's dtype (see the module docstring).

    Near a cancellation (W ≈ -s·ΔW) an fp16/bf16 ulp is smaller than fp32's own error in
    the sum, so there the check is the fp32 bound (1e-5 of max |s·ΔW|) instead of 1 ulp.
    """
    exact = w0.float().reshape(w0.shape[0], -1) + scale * delta.float().reshape(w0.shape[0], -1)
    out = out.reshape(exact.shape)
    fp32_err = 1e-5 * (scale * delta).abs().max().item() + 1e-7
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=fp32_err)
    else:
        want = exact.to(out.dtype)
        ulps = (ordered(out) - ordered(want)).abs()
        ok = (ulps <= 1) | ((out.float() - exact).abs() <= fp32_err)
        assert ok.all(), f"{ulps[~ok].max().item()} ulps from the once-rounded fp32 result"
        assert (out == want).float().mean() > 0.95  # and almost every element is that exactly


def loha_case(o, k, r1, r2, dtype, seed=0, fdtype=torch.float32):
    g = gen(seed)
    w = rand(o, k, g=g).to(dtype)
    f = [rand(o, r1, g=g, scale=0.3), rand(r1, k, g=g, scale=0.3), rand(o, r2, g=g, scale=0.3), rand(r2, k, g=g, scale=0.3)]
    return w, [x.to(fdtype) for x in f]
