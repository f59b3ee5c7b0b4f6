"""Cases for the Triton kernels, run by test_kernels_triton.py: on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1), or compiled on a GPU (LOHA_TEST_DEVICE=cuda).

Run directly with `TRITON_INTERPRET=1 python -m pytest tests/kernels_triton_cases.py`, or
`LOHA_TEST_DEVICE=cuda python -m pytest tests/kernels_triton_cases.py` on a CUDA machine.
Small shapes (the interpreter runs programs one by one in numpy); tile sizes are shrunk
so that odd shapes cross tile edges.
"""

import os

import pytest
import torch

from loha import delta as D

from kernel_cases import DEVICE, DTYPES, assert_rounded_once, gen, loha_case, rand

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
assert INTERPRETED != (DEVICE.type == "cuda"), "run with TRITON_INTERPRET=1 on the CPU, or LOHA_TEST_DEVICE=cuda"

from loha.kernels import triton_hadamard as T  # noqa: E402

SMALL = dict(block_m=16, block_n=32, num_warps=1)


def test_runs_where_meant():
    """Interpreted on CPU tensors, or compiled for the GPU the tensors are on."""
    assert (type(T._hadamard_tile_kernel).__name__ == "InterpretedFunction") == INTERPRETED


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r1,r2", [(1, 1), (3, 5), (16, 16), (33, 8), (64, 64)])
def test_single(dtype, r1, r2):
    w, f = loha_case(33, 77, r1, r2, dtype, seed=r1 + 7 * r2)
    w0 = w.clone()
    T.add_hadamard_(w, *f, 0.7, **SMALL)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_launch(dtype):
    """Layers of several shapes and ranks (several padded-rank groups), row slices, conv, Tucker."""
    g = gen(11)
    fused = rand(48, 40, g=g).to(dtype)
    conv = rand(20, 6, 3, 3, g=g).to(dtype)
    tucker = rand(18, 5, 3, 3, g=g).to(dtype)
    tf = D.hadamard_factors(
        rand(4, 18, g=g), rand(4, 5, g=g), rand(4, 18, g=g), rand(4, 5, g=g),
        rand(4, 4, 3, 3, g=g, scale=0.5), rand(4, 4, 3, 3, g=g, scale=0.5),
    )
    items = []
    for o, k, r1, r2, seed in [(33, 77, 3, 5, 1), (16, 16, 16, 16, 2), (5, 100, 1, 2, 3), (40, 9, 20, 2, 4)]:
        w, f = loha_case(o, k, r1, r2, dtype, seed=seed)
        items.append((w, *f, 0.3 * seed))
    for j in range(3):
        f = [rand(16, 4, g=g), rand(4, 40, g=g), rand(16, 4, g=g), rand(4, 40, g=g)]
        items.append((fused[16 * j : 16 * (j + 1)], *f, 1.0 - j))
    items.append((conv, rand(20, 8, g=g), rand(8, 54, g=g), rand(20, 8, g=g), rand(8, 54, g=g), 0.5))
    items.append((tucker, *tf, 2.0))
    refs = [(it[0].clone(), D.hadamard_delta(*it[1:5]), it[5]) for it in items]
    T.add_hadamard_many_(items, **SMALL)
    for it, (w0, d, s) in zip(items, refs):
        assert_rounded_once(it[0], w0, d, s)


def test_default_tiles_and_fp16_factors():
    w, f = loha_case(70, 130, 8, 8, torch.float16, seed=5, fdtype=torch.float16)
    w0 = w.clone()
    T.add_hadamard_(w, *f, 1.25)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 1.25)


def test_padded_rank():
    assert [T.padded_rank(r) for r in (1, 15, 16, 17, 33, 64)] == [16, 16, 16, 32, 64, 64]


# ---- the bypass kernel (triton_bypass.py) --------------------------------------------------------

from loha.kernels import triton_bypass as TB  # noqa: E402

BYPASS_SMALL = dict(block_t=16, block_o=16, block_k=16, num_warps=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,o,k,r1,r2", [(19, 37, 45, 3, 5), (1, 16, 16, 16, 16), (40, 20, 70, 33, 1)])
def test_bypass_linear_merged(dtype, t, o, k, r1, r2):
    """x·W'ᵀ + b with W' = round(W + s·ΔW) tile by tile: the patched layer's output."""
    g = gen(t + o)
    w, f = loha_case(o, k, r1, r2, dtype, seed=t)
    x, bias = rand(2, t, k, g=g).to(dtype), rand(o, g=g).to(dtype)
    y = TB.linear_merged(x, w, bias, *f, 0.7, **BYPASS_SMALL)
    patched = (w.float() + 0.7 * D.hadamard_delta(*f)).to(dtype)
    want = torch.nn.functional.linear(x.float(), patched.float(), bias.float())
    assert y.shape == (2, t, o) and y.dtype == dtype
    ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(y.float(), want, rtol=ulp, atol=ulp * want.abs().max().item())


@pytest.mark.parametrize("ydtype", DTYPES)
def test_bypass_linear_add(ydtype):
    """y += s·x·ΔWᵀ beside a layer whose weight cannot be read (fp32 math, one rounding)."""
    g = gen(2)
    o, k, t = 29, 50, 23
    _, f = loha_case(o, k, 4, 6, torch.float32, seed=5)
    x = rand(t, k, g=g).to(ydtype)
    y0 = rand(t, o, g=g).to(ydtype)
    y = y0.clone()
    TB.linear_add_(y, x, *f, -0.4, **BYPASS_SMALL)
    want = y0.float() + x.float() @ (-0.4 * D.hadamard_delta(*f)).t()
    ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[ydtype]
    torch.testing.assert_close(y.float(), want, rtol=ulp, atol=ulp * want.abs().max().item())
    with pytest.raises(ValueError):
        TB.linear_add_(y, x[:, :40], *f, 1.0)
