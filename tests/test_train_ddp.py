"""Data parallelism: 2 CPU processes on gloo (under `accelerate launch`) train the same
network as 1 process with the same global batch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

# 128 px: the demo UNet's mid block then attends over 2×2 latents. At 64 px it sees one
# token, where attention's q/k gradients are zero and the factors only move by float noise.
ARGS = ["--model", "demo", "--resolution", "128", "--steps", "3", "--batch-size", "4", "--preset", "attn-only",
        "--rank", "2", "--lr", "5e-3", "--seed", "2", "--log-every", "1", "--device", "cpu"]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", done.stdout)], done.stdout


def test_two_gloo_processes_equal_one(tmp_path):
    from safetensors.torch import load_file

    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not on PATH")
    one, _ = _run([sys.executable, "-m", "loha", "train", *ARGS, "--out", str(tmp_path / "one.safetensors")], tmp_path)
    # --multi_gpu selects torch.distributed.run as the launcher; with --device cpu the
    # trainer joins the group over gloo.
    two, out = _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loha", "train", *ARGS,
                     "--out", str(tmp_path / "two.safetensors")], tmp_path)
    assert "on 2 process(es)" in out
    assert len(one) == len(two) == 3 and two == pytest.approx(one, abs=2e-4)
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        # Equal up to float summation order (a sum of two half-batch means vs one mean).
        # Adam's normalisation lifts that on the few entries whose gradients nearly cancel
        # across steps, so each tensor is compared as a whole (relative Frobenius norm).
        scale = a[key].norm().item()
        assert (b[key] - a[key]).norm().item() <= 1e-3 * scale + 1e-7, key
        moved += key.endswith("hada_w2_a") and scale > 0
    assert moved  # training moved the zero-initialised factors
