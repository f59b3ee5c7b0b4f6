"""What `pip install` gives a user: the wheel's contents, and the front ends without extras.

The wheel is built from this checkout and installed into a fresh folder, and the
checks run in a child Python whose `loha` is the installed copy, not the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from loha.kernels import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """Built from a copy without build outputs, so no stale file of an earlier build gets in."""
    source, out = tmp_path_factory.mktemp("source") / "loha", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, cwd=out)
    (name,) = [n for n in os.listdir(out) if n.endswith(".whl")]
    return str(out / name)


def _installed_python(wheel: str, target, code: str, **env) -> subprocess.CompletedProcess:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                   check=True)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=target,
                          env={**os.environ, "PYTHONPATH": str(target), **env})


def test_wheel_holds_the_package_data_and_no_fixtures(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "loha/kernels/native.c" in names
    assert any(n.startswith("loha/train/sample_data/") and n.endswith(".png") for n in names)
    assert not [n for n in names if n.startswith("tests/") or "random_checkpoint" in n]


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_installed_wheel_loads_the_native_kernel(wheel, tmp_path):
    done = _installed_python(wheel, tmp_path / "site", (
        "import loha; from loha.kernels import native; print(loha.__file__); print(repr(native.why_not()))"),
        LOHA_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    where, reason = done.stdout.splitlines()
    assert where.startswith(str(tmp_path / "site")), where
    assert reason == "''", reason


def test_ui_without_its_extra_says_what_to_install_in_one_line():
    hide_gradio = "import sys; sys.modules['gradio'] = None; from loha.app.cli import main; sys.exit(main(['ui']))"
    done = subprocess.run([sys.executable, "-c", hide_gradio], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0
    assert done.stderr.strip() == "loha: the UI needs gradio: pip install 'loha[ui]'", done.stderr
