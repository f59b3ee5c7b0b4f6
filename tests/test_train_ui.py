"""The Train tab: its handlers (start, view, stop) on a real run, and the tab in headless
Chromium when node, playwright-core (LOHA_PLAYWRIGHT_DIR: a folder whose node_modules
has it) and chromium (LOHA_CHROMIUM, default /usr/bin/chromium) are available."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("gradio")


def _wait(job, seconds=600):
    deadline = time.time() + seconds
    while job.running and time.time() < deadline:
        time.sleep(0.2)
    assert not job.running


def test_handlers_train_stop_and_show(tmp_path):
    import loha
    from loha.app import ui_train
    from loha.app.ui import Folders

    folders = Folders(output=str(tmp_path))
    job = ui_train.start(folders, {"steps": 100000, "resolution": 64, "rank": 2, "preset": "attn-only",
                                   "sample_every": 2, "output": "stopped"})
    with pytest.raises(loha.LohaError, match="already going"):
        ui_train.start(folders, {})
    while job.step < 3 and job.running:
        time.sleep(0.2)
    assert "Stopping" in ui_train.stop(job)
    _wait(job)
    assert job.error is None and job.result.stopped
    bar, frame, sample, status, path = ui_train.view(job)
    assert f'data-step="{job.step}"' in bar and 'data-state="done"' in bar
    assert list(frame["step"]) == list(range(1, job.step + 1)) and len(frame["loss"]) == job.step
    assert sample and os.path.isfile(sample)
    assert path == str(tmp_path / "stopped.safetensors") and os.path.isfile(path) and "Done" in status
    assert loha.load(path).metadata["ss_steps"] == str(job.step)
    assert ui_train.stop() == "Nothing is training."


@pytest.mark.e2e
def test_tab_in_headless_chromium(tmp_path):
    node, chromium = shutil.which("node"), os.environ.get("LOHA_CHROMIUM", "/usr/bin/chromium")
    modules = os.environ.get("LOHA_PLAYWRIGHT_DIR")
    if not (node and modules and os.path.isdir(os.path.join(modules, "node_modules", "playwright-core"))
            and os.path.isfile(chromium)):
        pytest.skip("set LOHA_PLAYWRIGHT_DIR to a folder with node_modules/playwright-core (and have node "
                    "and chromium) to drive the tab in a browser")
    from loha.app.ui import Folders, build

    app = build(Folders(output=str(tmp_path)))
    app.queue()
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        script = os.path.join(os.path.dirname(__file__), "train_ui_browser.js")
        env = {**os.environ, "NODE_PATH": os.path.join(modules, "node_modules")}
        done = subprocess.run([node, script, url, str(shots), str(tmp_path / "my-loha.safetensors")],
                              capture_output=True, text=True, timeout=1500, env=env)
    finally:
        app.close()
    assert done.returncode == 0, done.stdout + done.stderr
    first, stopped = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert 0 < first["s1"] < first["s2"] and first["fileExists"] and first["plotMarks"] > 0
    assert "Done" in first["status"] and first["sampleSrc"]
    assert 3 <= stopped["stoppedAt"] < 100000 and (tmp_path / "stopped.safetensors").is_file()
    assert sorted(p.name for p in shots.iterdir()) == ["1-training.png", "2-later.png", "3-done.png",
                                                      "4-stopped.png"]
