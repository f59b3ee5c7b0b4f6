"""The Triton kernels' cases (`kernels_triton_cases.py`): on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1) everywhere, and compiled on the GPU where there is one.

The interpreter must be switched on before triton compiles anything, so the cases run in a
child pytest with the variables set; each test fails with the child's output if any case
fails. Skipped only when triton cannot be imported (and the GPU run without CUDA).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).parent


def run_cases(**env_changes) -> None:
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "kernels_triton_cases.py")],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and "skipped" not in out, out[-3000:]


def test_triton_kernel_under_interpreter():
    run_cases(TRITON_INTERPRET="1", LOHA_TEST_DEVICE="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_on_cuda():
    """The same cases compiled for this machine's GPU (`bench/gpu.sh` runs this)."""
    run_cases(TRITON_INTERPRET=None, LOHA_TEST_DEVICE="cuda")


def compile_for_gpu(fn, signature: dict, constants: dict, cc: int):
    """`fn` lowered ahead of time for compute capability `cc` (Triton's own ptxas); skips without it."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        import triton
    except ImportError as e:
        pytest.skip(f"this triton cannot compile ahead of time: {e}")
    from loha.kernels import tuning

    src = ASTSource(
        fn=fn,
        signature={**signature, **{k: "constexpr" for k in constants}},
        constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
    )
    try:
        options = {"num_warps": tuning.TRITON_NUM_WARPS, "enable_fp_fusion": True}
        return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # no NVIDIA backend or ptxas in this install
        if "ptxas" in str(e) or "backend" in str(e).lower():
            pytest.skip(f"no CUDA toolchain in this triton: {e}")
        raise


NEEDS_COMPILER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                    reason="needs the compiler, not the interpreter")


@NEEDS_COMPILER
def test_kernel_compiles_for_gpus():
    """Lower the kernel ahead of time for sm_80/sm_90 (no GPU needed: Triton's own ptxas).

    The interpreter checks the arithmetic; this checks that the GPU build accepts it
    (tf32x3 dots, the bf16 rounding by bits, pointer tables) for each W dtype.
    """
    import triton.language as tl

    from loha.kernels import triton_hadamard as T
    from loha.kernels import tuning

    sig = {"META": "*i64", "STARTS": "*i64", "SCALES": "*fp32", "n_layers": "i32"}
    cases = [(tl.float16, 16, 16, "tf32x3", 90), (tl.bfloat16, 64, 16, "tf32x3", 90), (tl.float32, 32, 32, "ieee", 80)]
    for w_ty, rp1, rp2, prec, cc in cases:
        const = dict(
            W_TY=w_ty, RP1=rp1, RP2=rp2, SEARCH_STEPS=8, PRECISION=prec,
            BLOCK_M=tuning.TRITON_BLOCK_M, BLOCK_N=tuning.TRITON_BLOCK_N,
        )  # fmt: skip
        k = compile_for_gpu(T._hadamard_tile_kernel, sig, const, cc)
        assert k.asm.get("cubin"), (w_ty, cc)


@NEEDS_COMPILER
def test_bypass_kernel_compiles_for_gpus():
    """The fused bypass kernel lowered for sm_80/sm_90: merged in fp16/bf16 (tensor-core dots) and fp32, and added."""
    import triton.language as tl

    from loha.kernels import triton_bypass as TB
    from loha.kernels import tuning

    dtypes = {"*fp16": tl.float16, "*bf16": tl.bfloat16, "*fp32": tl.float32}
    cases = [  # (x/W dtype, y dtype, HAS_W, precision, compute capability)
        ("*fp16", "*fp16", True, "tf32x3", 90), ("*bf16", "*bf16", True, "tf32x3", 90),
        ("*fp32", "*fp32", True, "ieee", 80), ("*fp16", "*fp32", False, "tf32x3", 90),
    ]
    for x_ty, y_ty, has_w, prec, cc in cases:
        sig = {name: "*fp32" for name in ("A1", "B1", "A2", "B2")}
        sig.update(X=x_ty, W=x_ty, BIAS=x_ty, Y=y_ty, scale="fp32", n_tokens="i32", n_out="i32", n_in="i32",
                   r1n="i32", r2n="i32")
        const = dict(
            HAS_W=has_w, HAS_BIAS=has_w, ADD_Y=not has_w, W_TY=dtypes[x_ty], LOWP_DOT=True, RP1=16, RP2=32,
            BLOCK_T=tuning.TRITON_BYPASS_BLOCK_T, BLOCK_O=tuning.TRITON_BYPASS_BLOCK_O,
            BLOCK_K=tuning.TRITON_BYPASS_BLOCK_K, PRECISION=prec,
        )  # fmt: skip
        k = compile_for_gpu(TB._linear_kernel, sig, const, cc)
        assert k.asm.get("cubin"), (x_ty, cc)
