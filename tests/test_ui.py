"""The Gradio blocks of `loha.app.ui`: the tab registry, the blocks, and their handlers on real files."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import loha
from loha.app import ui
from loha.models.to_ldm import ldm_state_dict
from tiny_models import make_loha_file, sd1_parts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    (root / "ckpt").mkdir()
    (root / "nets" / "style").mkdir(parents=True)
    parts = sd1_parts()
    state = {k: v.contiguous() for k, v in ldm_state_dict({"unet": parts["unet"].state_dict(), "text_encoder": parts["text_encoder"].state_dict()}, family="sd1").items()}
    save_file(state, root / "ckpt" / "base.safetensors")
    make_loha_file(parts, root / "nets" / "style" / "fox.safetensors", seed=3)
    return ui.Folders(checkpoints=[str(root / "ckpt")], networks=[str(root / "nets")], output=str(root / "out"))


def test_files_are_listed_by_their_path_below_the_folder(folders):
    assert list(folders.checkpoint_files()) == ["base.safetensors"]
    assert list(folders.network_files()) == ["style/fox.safetensors"]


def test_inspect_reports_a_listed_network_and_checks_it_against_a_checkpoint(folders):
    text, summary = ui.inspect_file(folders, "style/fox.safetensors", "base.safetensors")
    assert summary["family"] == "sd1" and summary["module_count"] > 0
    assert "SD 1.x" in text and f"{summary['module_count']} of {summary['module_count']} names match" in text
    text, summary = ui.inspect_file(folders, "nope.safetensors")
    assert text.startswith("Error:") and "nope.safetensors" in text and summary == {}


def test_merge_writes_what_the_library_merge_writes(folders, tmp_path):
    import os

    os.makedirs(folders.output, exist_ok=True)
    message = ui.merge_files(folders, "base.safetensors", "style/fox.safetensors:0.7:0.5\n\n", "merged", "keep")
    assert message.startswith("Wrote") and "tensors changed" in message, message
    merged = load_file(os.path.join(folders.output, "merged.safetensors"))
    expected = load_file(folders.checkpoint_files()["base.safetensors"])
    loha.apply(expected, [(loha.load(folders.network_files()["style/fox.safetensors"]), 0.7, 0.5)])
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    again = ui.merge_files(folders, "base.safetensors", "style/fox.safetensors", "merged", "keep")
    assert again.startswith("**Error:**") and "(tick Overwrite)" in again and "--" not in again  # not unless asked
    assert ui.merge_files(folders, "base.safetensors", "", "x").startswith("**Error:** list at least one")
    assert ui.merge_files(folders, "", "style/fox.safetensors", "x").startswith("**Error:** choose a checkpoint")


def test_choosing_a_network_appends_a_line():
    assert ui.append_line("a.safetensors", "") == "a.safetensors:1"
    assert ui.append_line("b.safetensors", "a.safetensors:1\n") == "a.safetensors:1\nb.safetensors:1"
    assert ui.append_line("", "kept") == "kept"


def test_optional_tabs_come_first_when_their_module_imports(monkeypatch):
    fake = types.ModuleType("fake_train_tab")
    fake.TITLE, fake.tab = "Train", lambda gr, folders: None
    monkeypatch.setitem(sys.modules, "fake_train_tab", fake)
    monkeypatch.setattr(ui, "OPTIONAL_TABS", ("fake_train_tab", "no_such_tab_module"))
    assert [title for title, _ in ui.tabs()] == ["Train", "Merge", "Inspect"]


def test_blocks_build_with_the_installed_gradio(folders, monkeypatch):
    gr = pytest.importorskip("gradio")
    monkeypatch.setattr(ui, "OPTIONAL_TABS", ())
    blocks = ui.build(folders)
    assert isinstance(blocks, gr.Blocks)
    labels = [b.label for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert labels == ["Merge", "Inspect"]
    dropdowns = {b.label: b for b in blocks.blocks.values() if isinstance(b, gr.Dropdown)}
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in dropdowns["Network"].choices]
    assert choices == ["style/fox.safetensors"]


def test_a_same_named_folder_is_no_installed_package(tmp_path, monkeypatch):
    """gradio keeps a `gradio/` folder in the temp folder: run from there, it must not pass for gradio."""
    (tmp_path / "loha_absent_ui_package").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ui, "UI_PACKAGES", ("loha_absent_ui_package", "pytest"))
    assert ui.missing_packages() == ["loha_absent_ui_package"]


def test_checkpoints_and_networks_in_one_folder_are_told_apart(folders):
    both = [folders.checkpoints[0], folders.networks[0]]
    mixed = ui.Folders(checkpoints=both, networks=both, output=folders.output)
    assert list(mixed.checkpoint_files()) == ["base.safetensors"]
    assert list(mixed.network_files()) == ["style/fox.safetensors"]
    assert mixed.default_model() == "demo"
    path = folders.checkpoint_files()["base.safetensors"]
    loaded = ui.Folders(checkpoints=both, current_checkpoint=lambda: path)  # the WebUI's loaded model
    assert loaded.default_model() == "base.safetensors"


def test_merge_reports_progress(folders):
    calls = []
    message = ui.merge_files(folders, "base.safetensors", "style/fox.safetensors", "progress", "keep",
                             on_progress=lambda done, total: calls.append((done, total)))
    assert message.startswith("Wrote") and len(calls) > 10
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_dropdowns_that_need_a_choice_start_empty(folders):
    gr = pytest.importorskip("gradio")
    pytest.importorskip("diffusers")
    blocks = ui.build(folders)
    dropdowns = {b.label: b for b in blocks.blocks.values() if isinstance(b, gr.Dropdown)}
    assert [dropdowns[k].value for k in ("Checkpoint", "Add a network", "Network", "Preset")] == [None] * 4
    reports = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "loha-inspect-report"]
    assert isinstance(reports[0], gr.Code)  # monospace


def test_inspect_shows_steps_trained_and_readable_dates(tmp_path):
    import time

    from loha.summary import render, summarize
    from safetensors.torch import save_file

    started = 1_700_000_000.25
    path = tmp_path / "net.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(4, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 4),
               "lora_unet_x.hada_w2_a": torch.zeros(4, 2), "lora_unet_x.hada_w2_b": torch.zeros(2, 4)},
              path, {"ss_steps": "42", "ss_training_started_at": repr(started),
                     "ss_training_finished_at": repr(started + 3600)})
    summary = summarize(loha.load(str(path)))
    want = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    assert summary["training"]["steps_trained"] == "42" and summary["training"]["started_at"] == want
    assert "steps trained 42" in render(summary) and f"started at {want}" in render(summary)


_GRADIO_341 = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import gradio as gr
from loha.app import ui
folders = ui.Folders(checkpoints=[sys.argv[2]], networks=[sys.argv[3]], output=sys.argv[2])
blocks = ui.build(folders)
dropdowns = {b.label: b for b in blocks.blocks.values() if isinstance(b, gr.Dropdown)}
config = blocks.get_config_file()
loads = [d for d in config["dependencies"] if d.get("trigger") == "load" and len(d["outputs"]) > 10]
print(json.dumps({"version": gr.__version__, "tabs": [b.label for b in blocks.blocks.values() if isinstance(b, gr.Tab)],
                  "empty": [dropdowns[k].value for k in ("Checkpoint", "Add a network", "Network", "Preset")],
                  "model": dropdowns[ui_label].value if (ui_label := next(k for k in dropdowns if k.startswith("Base model"))) else None,
                  "networks": dropdowns["Network"].choices, "gallery": any(isinstance(b, gr.Gallery) for b in blocks.blocks.values()),
                  "code": any(isinstance(b, gr.Code) for b in blocks.blocks.values()), "loads": len(loads)}))
"""


def test_blocks_build_on_the_webui_s_gradio_3_41(folders):
    """The WebUI 1.8 ships gradio 3.41: the same tabs build there (LOHA_WEBUI_PYTHON, its venv)."""
    import json
    import os
    import subprocess

    python = os.environ.get("LOHA_WEBUI_PYTHON")
    if not python:
        pytest.skip("set LOHA_WEBUI_PYTHON to the WebUI's Python (gradio 3.41) to build the tabs there")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([python, "-c", _GRADIO_341, root, folders.checkpoints[0], folders.networks[0]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("3.41") and got["tabs"] == ["Train", "Merge", "Inspect"]
    assert got["empty"] == [None] * 4 and got["model"] == "demo" and got["gallery"] and got["code"]
    assert [c[0] if isinstance(c, list) else c for c in got["networks"]] == ["style/fox.safetensors"]
    assert got["loads"] == 1  # the Train tab's reattach on page load (progress, plot, gallery … and its fields)
