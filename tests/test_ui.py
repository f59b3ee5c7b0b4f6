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
