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
