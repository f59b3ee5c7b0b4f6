"""The Triton LoHa kernel, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1).

The interpreter must be switched on before triton compiles anything, so the cases live in
`kernels_triton_cases.py` and run in a child pytest with the variable set; this test fails
with the child's output if any case fails. Skipped only when triton cannot be imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent


def test_triton_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="needs the compiler, not the interpreter")
def test_kernel_compiles_for_gpus():
    """Lower the kernel ahead of time for sm_80/sm_90 (no GPU needed: Triton's own ptxas).

    The interpreter checks the arithmetic; this checks that the GPU build accepts it
    (tf32x3 dots, the bf16 rounding by bits, pointer tables) for each W dtype.
    """
    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        import triton
    except ImportError as e:
        pytest.skip(f"this triton cannot compile ahead of time: {e}")
    from loha.kernels import triton_hadamard as T
    from loha.kernels import tuning

    fn = T._hadamard_tile_kernel
    sig = {"META": "*i64", "STARTS": "*i64", "SCALES": "*fp32", "n_layers": "i32"}
    cases = [(tl.float16, 16, 16, "tf32x3", 90), (tl.bfloat16, 64, 16, "tf32x3", 90), (tl.float32, 32, 32, "ieee", 80)]
    for w_ty, rp1, rp2, prec, cc in cases:
        const = dict(
            W_TY=w_ty, RP1=rp1, RP2=rp2, SEARCH_STEPS=8, PRECISION=prec,
            BLOCK_M=tuning.TRITON_BLOCK_M, BLOCK_N=tuning.TRITON_BLOCK_N,
        )  # fmt: skip
        src = ASTSource(
            fn=fn,
            signature={**sig, **{k: "constexpr" for k in const}},
            constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
        )
        try:
            options = {"num_warps": tuning.TRITON_NUM_WARPS, "enable_fp_fusion": True}
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        except Exception as e:  # no NVIDIA backend or ptxas in this install
            if "ptxas" in str(e) or "backend" in str(e).lower():
                pytest.skip(f"no CUDA toolchain in this triton: {e}")
            raise
        assert k.asm.get("cubin"), (w_ty, cc)
