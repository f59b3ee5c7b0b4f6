"""The fused ΔW entry points against the fp32 references in loha.delta.

Every result must equal round(W.float() + s·ΔW) to W's dtype, as `kernel_cases`
defines it. With LOHA_TEST_DEVICE=cuda the same cases go through the CUDA dispatch (the
Triton kernel, cuBLAS); the tests of the CPU dispatch itself are skipped there.
"""

import platform

import pytest
import torch

from loha import delta as D
from loha import kernels
from loha.kernels import native, tiled, tuning
from kernel_cases import DTYPES, assert_rounded_once, cpu_only, gen, loha_case, rand

# ---- add_hadamard_ --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r1,r2", [(1, 1), (3, 3), (8, 8), (16, 16), (33, 33), (64, 64), (3, 16), (64, 8)])
def test_linear_ranks(dtype, r1, r2):
    w, f = loha_case(33, 77, r1, r2, dtype, seed=r1 * 100 + r2)
    w0 = w.clone()
    kernels.add_hadamard_(w, *f, 0.7)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3", "tucker"])
def test_conv_layers(dtype, kind):
    g = gen(1)
    o, i, r = 40, 24, 6
    if kind == "conv1x1":
        w = rand(o, i, 1, 1, g=g).to(dtype)
        stored = [rand(o, r, g=g), rand(r, i, g=g), rand(o, r, g=g), rand(r, i, g=g)]
        f = D.hadamard_factors(*stored)
    elif kind == "conv3x3":
        w = rand(o, i, 3, 3, g=g).to(dtype)
        stored = [rand(o, r, g=g), rand(r, i * 9, g=g), rand(o, r, g=g), rand(r, i * 9, g=g)]
        f = D.hadamard_factors(*stored)
    else:  # Tucker: w*_a is (R, O), w*_b (R, I), t* (R, R, 3, 3)
        w = rand(o, i, 3, 3, g=g).to(dtype)
        w1a, w1b, w2a, w2b = rand(r, o, g=g), rand(r, i, g=g), rand(r, o, g=g), rand(r, i, g=g)
        t1, t2 = rand(r, r, 3, 3, g=g, scale=0.5), rand(r, r, 3, 3, g=g, scale=0.5)
        f = D.hadamard_factors(w1a, w1b, w2a, w2b, t1, t2)
        # the canonical form is LyCORIS's Tucker rebuild
        rebuild = lambda t, wb, wa: torch.einsum("i j ..., j r, i p -> p r ...", t, wb, wa)  # noqa: E731
        want = rebuild(t1, w1b, w1a) * rebuild(t2, w2b, w2a)
        torch.testing.assert_close(D.hadamard_delta(*f).reshape(want.shape), want, rtol=1e-4, atol=1e-4)
    w0 = w.clone()
    kernels.add_hadamard_(w, *f, 0.25)
    assert w.shape == w0.shape
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_slice_view(dtype):
    g = gen(2)
    big = rand(100, 50, g=g).to(dtype)
    before = big.clone()
    f = [rand(30, 4, g=g), rand(4, 50, g=g), rand(30, 5, g=g), rand(5, 50, g=g)]
    kernels.add_hadamard_(big[40:70], *f, 1.5)
    assert torch.equal(big[:40], before[:40]) and torch.equal(big[70:], before[70:])
    assert_rounded_once(big[40:70], before[40:70], D.hadamard_delta(*f), 1.5)


def test_factor_dtypes_and_scale_zero():
    w, f = loha_case(20, 30, 4, 4, torch.float32, fdtype=torch.float16)
    w0 = w.clone()
    kernels.add_hadamard_(w, *f, 0.0)
    assert torch.equal(w, w0)
    kernels.add_hadamard_(w, *f, -2.0)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), -2.0)


def test_non_contiguous_weight():
    g = gen(3)
    base = rand(30, 20, g=g)
    w = base.t()  # (20, 30), not contiguous
    w0 = w.clone()
    f = [rand(20, 3, g=g), rand(3, 30, g=g), rand(20, 3, g=g), rand(3, 30, g=g)]
    kernels.add_hadamard_(w, *f, 0.5)
    assert_rounded_once(w.contiguous(), w0, D.hadamard_delta(*f), 0.5)


def test_bad_shapes():
    w, f = loha_case(10, 12, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.add_hadamard_(w, f[0], f[1][:, :11], f[2], f[3], 1.0)


# ---- both CPU tile forms, and the worker threads ------------------------------------------------


FORMS = {
    "khatri-rao": tiled.MATMUL,
    "mkl": tiled.HADAMARD,
    "onednn": tiled.HADAMARD_ONEDNN,
    "native": tiled.HADAMARD_NATIVE,
}


def force_form(monkeypatch, form, dtype):
    """Make the CPU dispatch pick one tile form for every LoHa (pure torch unless "native")."""
    if form == "native":
        if not native.supports(dtype):
            pytest.skip(f"no native accelerator here ({native.why_not() or dtype})")
        monkeypatch.setitem(tuning.CPU_NATIVE_KR_MAX_RANK_PRODUCT, dtype, 0)
        return
    monkeypatch.setattr(tuning, "CPU_NATIVE", False)
    monkeypatch.setitem(tuning.CPU_KR_MAX_RANK_PRODUCT, dtype, 10_000 if form == "khatri-rao" else 0)
    if form == "mkl":
        monkeypatch.setattr(tiled, "onednn_available", lambda: False)
    if form == "onednn":
        if not tiled.onednn_available():
            pytest.skip("this torch has no fp32 oneDNN linear")
        monkeypatch.setattr(tuning, "CPU_ONEDNN_MKL_MAX_RANK", 0)
        monkeypatch.setattr(tuning, "CPU_ONEDNN_MIN_RANK", 0)


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("o,k,r1,r2", [(45, 61, 3, 5), (70, 33, 16, 16), (9, 200, 64, 1)])
def test_each_cpu_tile_form(monkeypatch, dtype, form, o, k, r1, r2):
    force_form(monkeypatch, form, dtype)
    w, f = loha_case(o, k, r1, r2, dtype, seed=o + k)
    assert kernels._hadamard_job(w, *f, 1.0).kind == FORMS[form]
    w0 = w.clone()
    kernels.add_hadamard_(w, *f, 0.9)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.9)


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["mkl", "onednn", "native"])
def test_many_on_worker_threads(monkeypatch, dtype, form):
    """Many layers, small tiles, forced onto the worker threads; row slices of one tensor too."""
    force_form(monkeypatch, form, dtype)
    monkeypatch.setattr(tuning, "CPU_PARALLEL_MIN_ELEMS", 0)
    monkeypatch.setattr(tuning, "CPU_TILE_ELEMS", 500)
    if torch.get_num_threads() < 2:  # a 1-core runner still exercises the pool
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = gen(4)
    fused = rand(96, 40, g=g).to(dtype)  # q/k/v-like rows of one tensor
    items, refs = [], []
    for o, k, r1, r2 in [(33, 77, 3, 5), (64, 64, 16, 16), (7, 300, 1, 1), (50, 9, 33, 8)]:
        w, f = loha_case(o, k, r1, r2, dtype, seed=o)
        items.append((w, *f, 0.3))
    for j in range(3):
        f = [rand(32, 4, g=g), rand(4, 40, g=g), rand(32, 4, g=g), rand(4, 40, g=g)]
        items.append((fused[32 * j : 32 * (j + 1)], *f, 1.0 + j))
    refs = [(it[0].clone(), D.hadamard_delta(*it[1:5]), it[5]) for it in items]
    threads_before = torch.get_num_threads()
    kernels.add_hadamard_many_(items)
    assert torch.get_num_threads() == threads_before
    for it, (w0, d, s) in zip(items, refs):
        assert_rounded_once(it[0], w0, d, s)


@cpu_only
def test_run_cpu_threads_directly():
    g = gen(5)
    w = rand(200, 130, g=g)
    w0 = w.clone()
    f = (rand(200, 16, g=g), rand(16, 130, g=g), rand(200, 16, g=g), rand(16, 130, g=g))
    tiled.run_cpu([tiled.Job(w, tiled.HADAMARD, f, 0.5)], tile_elems=1000, threads=2)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.5)


def test_overlapping_items_apply_in_order():
    w, f = loha_case(20, 30, 4, 4, torch.float32)
    w0 = w.clone()
    kernels.add_hadamard_many_([(w, *f, 1.0), (w[5:15], *[x[5:15] if x.shape[0] == 20 else x for x in f], 2.0)])
    d = D.hadamard_delta(*f)
    want = w0 + d
    want[5:15] += 2.0 * d[5:15]
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-4)


# ---- LoRA and dense ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 7, 64])
def test_lowrank(dtype, r):
    g = gen(6)
    w = rand(33, 4, 3, 3, g=g).to(dtype)
    a, b = rand(33, r, g=g), rand(r, 36, g=g).half()
    w0 = w.clone()
    kernels.add_lowrank_(w, a, b, 0.6)
    assert_rounded_once(w, w0, a.float() @ b.float(), 0.6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ddtype", [torch.float32, torch.float16])
def test_dense(dtype, ddtype):
    g = gen(8)
    w = rand(21, 5, 3, 3, g=g).to(dtype)
    delta = rand(21, 5, 3, 3, g=g).to(ddtype)
    w0 = w.clone()
    kernels.add_dense_(w, delta, -0.4)
    assert_rounded_once(w, w0, delta.float(), -0.4)
    with pytest.raises(ValueError):
        kernels.add_dense_(w, delta[:20], 1.0)


# ---- bypass ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 4000])  # few rows: Khatri–Rao GEMMs; many: ΔW once
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_hadamard_bypass(n, xdtype):
    g = gen(9)
    o, k, r1, r2 = 48, 40, 3, 4
    f = [rand(o, r1, g=g), rand(r1, k, g=g), rand(o, r2, g=g), rand(r2, k, g=g)]
    x = rand(2, n, k, g=g).to(xdtype)
    y = kernels.hadamard_bypass(x, *f, 0.3)
    want = x.float() @ (0.3 * D.hadamard_delta(*f)).t()
    assert y.shape == (2, n, o) and y.dtype == xdtype
    tol = 1e-5 if xdtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), want.to(xdtype).float(), rtol=tol, atol=tol * want.abs().max().item())


@cpu_only
def test_triton_never_chosen_on_cpu(monkeypatch):
    """CPU tensors never reach the Triton module (it would need CUDA or the interpreter)."""
    monkeypatch.setattr(kernels, "_triton", lambda: pytest.fail("Triton used for a CPU tensor"))
    w, f = loha_case(10, 10, 2, 2, torch.float16)
    kernels.add_hadamard_many_([(w, *f, 1.0)])


@cpu_only
@pytest.mark.parametrize("mode", ["parameter", "inference"])
def test_worker_threads_follow_the_callers_autograd_mode(monkeypatch, mode):
    """Grad and inference modes are per thread: the workers must not trip over either."""
    monkeypatch.setattr(tuning, "CPU_PARALLEL_MIN_ELEMS", 0)
    monkeypatch.setattr(tuning, "CPU_TILE_ELEMS", 300)
    if torch.get_num_threads() < 2:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = gen(12)
    f = [rand(40, 3, g=g), rand(3, 30, g=g), rand(40, 3, g=g), rand(3, 30, g=g)]
    if mode == "parameter":
        w = torch.nn.Parameter(rand(40, 30, g=g))
        w0 = w.detach().clone()
        kernels.add_hadamard_many_([(w, *f, 0.5)])  # the patcher holds no_grad; the workers must too
    else:
        with torch.inference_mode():
            w = rand(40, 30, g=g)
            w0 = w.clone()
            kernels.add_hadamard_many_([(w, *f, 0.5)])
    assert_rounded_once(w.detach(), w0, D.hadamard_delta(*f), 0.5)


# ---- the optional native accelerator ------------------------------------------------------


@cpu_only
def test_native_is_optional(monkeypatch):
    """Without the accelerator (no compiler, LOHA_NATIVE=0, failed build) the torch tiles run."""
    monkeypatch.setattr(native, "_lib", False)
    w, f = loha_case(30, 50, 16, 16, torch.float16)
    assert kernels._hadamard_job(w, *f, 1.0).kind in (tiled.HADAMARD, tiled.HADAMARD_ONEDNN)
    w0 = w.clone()
    kernels.add_hadamard_(w, *f, 0.5)
    assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.5)


@cpu_only
@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set variants")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2+F16C blocks; plain SSE2 without fp16
def test_native_other_instruction_sets(monkeypatch, tmp_path, march):
    """The accelerator's non-AVX-512 code (what other CPUs build), run here."""
    fn = native.load(native.build(native.compiler(), march=march, out_dir=tmp_path))
    good = native.self_test(fn)
    assert good >= {torch.float32, torch.bfloat16}
    assert (torch.float16 in good) == (march == "x86-64-v3")
    monkeypatch.setattr(native, "_lib", fn)
    monkeypatch.setattr(native, "_supported", good)
    for dtype in sorted(good, key=str):
        for o, k, r1, r2 in [(33, 77, 3, 5), (11, 64, 16, 16), (6, 300, 64, 1)]:
            w, f = loha_case(o, k, r1, r2, dtype, seed=o)
            assert kernels._hadamard_job(w, *f, 1.0).kind == tiled.HADAMARD_NATIVE
            w0 = w.clone()
            kernels.add_hadamard_(w, *f, 0.8)
            assert_rounded_once(w, w0, D.hadamard_delta(*f), 0.8)
