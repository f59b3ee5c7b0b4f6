"""The Train tab: its handlers (start, view, stop, follow, settings) on real runs, and the tab in
headless Chromium when node, playwright-core (LOHA_PLAYWRIGHT_DIR: a folder whose node_modules
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
    # a stopped run says so (not "done"), with the step it stopped at
    assert f'data-step="{job.step}"' in bar and 'data-state="stopped"' in bar and f"stopped at step {job.step}" in bar
    assert list(frame["step"]) == list(range(1, job.step + 1)) and len(frame["loss"]) == job.step
    assert sample and os.path.isfile(sample)
    assert path == str(tmp_path / "stopped.safetensors") and os.path.isfile(path)
    assert f"Stopped at step {job.step}** of 100000" in status and "Done" not in status
    assert loha.load(path).metadata["ss_steps"] == str(job.step)
    assert " s/step · elapsed " in bar and job.info.step == job.step and job.info.seconds_per_step > 0
    steps = [int(caption.split()[1]) for _, caption in ui_train.gallery(job)]
    assert steps == sorted(steps, reverse=True) and steps[-1] == 2 and all(s % 2 == 0 for s in steps)
    assert ui_train.stop() == "Nothing is training."


def test_tab_saves_and_loads_the_command_line_s_config_files(tmp_path):
    """The tab saves the same kohya-style config files `loha train --config` reads, and loads them
    (and the presets) back into its fields."""
    from loha.app import ui_train
    from loha.app.ui import Folders
    from loha.train.settings import read_config

    folders = Folders(output=str(tmp_path))
    values = {**ui_train.DEFAULTS, "rank": 4, "alpha": 2.0, "optimizer": "Lion", "gradient_accumulation_steps": 2,
              "shuffle_caption": True, "keep_tokens": 1, "dora_wd": True, "title": "Shapes", "steps": 7,
              "sample_prompts": "a red circle --w 64 --h 64 --s 4"}
    path = ui_train.save_settings(folders, values, "mine")
    assert path == str(tmp_path / "mine.toml")
    text = open(path, encoding="utf-8").read()
    assert 'optimizer_type = "Lion"' in text and "network_dim = 4" in text and "dora_wd=True" in text
    loaded = ui_train.load_settings(folders, "mine.toml")
    assert {k: loaded[k] for k in values} == {**values, "output": "my-loha.safetensors"}
    assert read_config(path)["network"]["dora_wd"] is True
    sdxl = ui_train.load_settings(folders, "sdxl-loha")
    assert (sdxl["resolution"], sdxl["gradient_checkpointing"], sdxl["epochs"]) == (1024, True, 10)
    with pytest.raises(loha_error()):
        ui_train.load_settings(folders, "no-such.toml")


def loha_error():
    import loha

    return loha.LohaError


def test_a_reloaded_page_attaches_to_the_running_job(tmp_path):
    """`follow` (what a page load runs) streams the job that is running, whoever started it."""
    from loha.app import ui_train
    from loha.app.ui import Folders

    job = ui_train.start(Folders(output=str(tmp_path)), {"steps": 100000, "resolution": 64, "rank": 2,
                                                         "preset": "attn-only", "sample_every": 0,
                                                         "output": "followed"})
    try:
        frames = ui_train.follow()  # no job given: the current one
        seen = []
        for frame in frames:
            bar = frame[0]
            seen.append(int(bar.split('data-step="')[1].split('"')[0]))
            if seen[-1] >= 3:
                break
        assert seen[-1] >= 3 and 'data-state="training"' in bar and "ETA" in bar
        assert ui_train.current() is job
    finally:
        ui_train.stop(job)
        _wait(job)
    assert job.result.stopped


@pytest.mark.e2e
def test_tab_in_headless_chromium(tmp_path):
    """Train from a checkpoint in the base-model field, see the ETA and the gallery move, reload the
    page mid-run and see it attach again, Stop. Screenshots go to LOHA_SCREENSHOTS (default: the
    test's temporary folder)."""
    node, chromium = shutil.which("node"), os.environ.get("LOHA_CHROMIUM", "/usr/bin/chromium")
    modules = os.environ.get("LOHA_PLAYWRIGHT_DIR")
    if not (node and modules and os.path.isdir(os.path.join(modules, "node_modules", "playwright-core"))
            and os.path.isfile(chromium)):
        pytest.skip("set LOHA_PLAYWRIGHT_DIR to a folder with node_modules/playwright-core (and have node "
                    "and chromium) to drive the tab in a browser")
    import loha
    from loha.app.demo import _Demo
    from loha.app.ui import Folders, build

    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out"
    _Demo(str(checkpoints), seed=0, strength=(1.0, 1.0), echo=lambda line: None).checkpoint()
    app = build(Folders(checkpoints=[str(checkpoints)], networks=[str(out)], output=str(out)))
    app.queue()
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True)
    shots = os.environ.get("LOHA_SCREENSHOTS") or str(tmp_path / "screenshots")
    os.makedirs(shots, exist_ok=True)
    try:
        script = os.path.join(os.path.dirname(__file__), "train_ui_browser.js")
        env = {**os.environ, "NODE_PATH": os.path.join(modules, "node_modules"), "LOHA_CHROMIUM": chromium}
        done = subprocess.run([node, script, url, shots, "demo-sd1.safetensors"],
                              capture_output=True, text=True, timeout=1500, env=env)
    finally:
        app.close()
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(done.stdout.strip().splitlines()[-1])
    first, later, reattached, stopped = run["first"], run["later"], run["reattached"], run["stopped"]
    assert "s/step" in first["text"] and "ETA" in first["text"] and first["eta"] != later["eta"]
    assert int(later["step"]) > int(first["step"]) and float(first["eta"]) > 0 and float(later["eta"]) > 0
    assert later["gallery"] > first["gallery"] >= 1
    assert int(reattached["step"]) > int(later["step"]) and reattached["total"] == "400"
    assert reattached["model"] == "demo-sd1.safetensors" and reattached["steps"] == "400"  # its fields too
    steps = int(stopped["step"])
    assert int(reattached["step"]) <= steps < 400 and f"stopped at step {steps}" in stopped["text"]
    assert f"Stopped at step {steps}" in stopped["status"]
    meta = loha.load(str(out / "from-checkpoint.safetensors")).metadata
    assert meta["ss_steps"] == str(steps) and meta["ss_sd_model_name"] == "demo-sd1"
    assert sorted(os.listdir(shots)) == ["1-training-from-checkpoint.png", "2-eta-and-gallery-moved.png",
                                         "3-reloaded-and-reattached.png", "4-stopped.png"]
