"""Gradio blocks for LoHa files: Merge and Inspect tabs (Train when `loha.app.ui_train` imports).

The same blocks serve the standalone app (`python -m loha ui`, needs the ``ui`` extra)
and the WebUI's "LoHa" tab, so they keep to what gradio 3.41 (WebUI 1.8) and current gradio both have.
Tabs come from a registry: a module in `OPTIONAL_TABS` that imports, with a `TITLE`
and a `tab(folders)` that adds its components, gets a tab of its own. The handlers
are plain functions of strings, testable without a browser.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LohaError
from ..files.safetensors_io import DTYPE_NAMES

log = logging.getLogger("loha")

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
#: Output dtype choices of the Merge tab: keep each tensor's, or one for all.
OUTPUT_DTYPES = ("keep", *DTYPE_NAMES)
#: Tabs other modules provide, shown first when the module imports: module name.
OPTIONAL_TABS = ("loha.app.ui_train",)
#: What the tabs import beyond the core (the `ui` extra).
UI_PACKAGES = ("gradio", "pandas")
#: Library arguments (`LohaError.option`) -> what sets them in the tabs.
OPTION_HINTS = {"overwrite": "tick Overwrite"}


def missing_packages() -> list[str]:
    """The `ui` extra's packages that are not installed.

    A folder of the same name in the working directory (gradio keeps one in the temp
    folder) is found as a namespace package, with no origin: it is no installed package.
    """
    return [name for name in UI_PACKAGES if getattr(importlib.util.find_spec(name), "origin", None) is None]


def error_text(exc: LohaError) -> str:
    """A refused call as the tabs show it: the message, and the control that would accept it."""
    hint = OPTION_HINTS.get(exc.option or "")
    return f"{exc}" + (f" ({hint})" if hint else "")


@dataclass
class Folders:
    """Where the tabs look for files and write merges.

    A folder may hold both kinds (the standalone app's default is "." for both): a
    safetensors file is listed as a checkpoint or as a network by what its header holds.
    `current_checkpoint` (the WebUI's loaded model) is where the Train tab starts.
    """

    checkpoints: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    output: str = "."
    current_checkpoint: Callable[[], str | None] | None = None

    def checkpoint_files(self) -> dict[str, str]:
        return {k: v for k, v in _files(self.checkpoints, CHECKPOINT_EXTENSIONS).items() if _is_checkpoint(v)}

    def network_files(self) -> dict[str, str]:
        return {k: v for k, v in _files(self.networks, (".safetensors",)).items() if not _is_checkpoint(v)}

    def model_sources(self) -> dict[str, str]:
        """Checkpoints and diffusers model folders (with model_index.json) to train on."""
        found = dict(self.checkpoint_files())
        for folder in self.checkpoints:
            if os.path.isdir(folder):
                for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                    if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "model_index.json")):
                        found.setdefault(entry.name + "/", entry.path)
        return found

    def default_model(self) -> str:
        """The host's loaded checkpoint (by its listed name when listed), else "demo"."""
        path = self.current_checkpoint() if self.current_checkpoint else None
        if not path:
            return "demo"
        by_path = {os.path.realpath(v): k for k, v in self.checkpoint_files().items()}
        return by_path.get(os.path.realpath(path), path)


def _files(folders: list[str], extensions: tuple[str, ...]) -> dict[str, str]:
    """Name (path below its folder) -> path, the first folder winning a name."""
    found: dict[str, str] = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, dirs, names in os.walk(folder, followlinks=True):
            dirs.sort()
            for name in sorted(names):
                if name.lower().endswith(extensions):
                    path = os.path.join(root, name)
                    found.setdefault(os.path.relpath(path, folder), path)
    return found


_KINDS: dict[tuple, bool] = {}


def _is_checkpoint(path: str) -> bool:
    """Whether a file holds a model (keys under a checkpoint part's prefix) rather than a
    network; read from the safetensors header once per (path, size, mtime). Pickles count as checkpoints."""
    if not path.lower().endswith(".safetensors"):
        return True
    try:
        stat = os.stat(path)
    except OSError:
        return False
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _KINDS:
        from ..families import CHECKPOINT_PARTS
        from ..files.safetensors_io import Reader

        prefixes = tuple({part.prefix for parts in CHECKPOINT_PARTS.values() for part in parts.values()})
        try:
            reader = Reader(path)
            try:
                _KINDS[key] = any(name.startswith(prefixes) for name in reader.shapes())
            finally:
                reader.close()
        except (LohaError, OSError):
            _KINDS[key] = False
    return _KINDS[key]


def _resolve(value: str, listed: dict[str, str], what: str) -> str:
    value = (value or "").strip()
    path = listed.get(value, value)
    if not value or not os.path.isfile(path):
        raise LohaError(f"{what} {value!r}: no such file" if value else f"choose a {what}")
    return path


# --------------------------------------------------------------------------- handlers


def inspect_file(folders: Folders, network: str, against: str = "") -> tuple[str, dict]:
    """(text report, summary dict) of a network, optionally checked against a checkpoint."""
    from ..files.network import load
    from ..summary import against as check_against
    from ..summary import render, summarize

    try:
        net = load(_resolve(network, folders.network_files(), "network"))
        summary = summarize(net)
        checked = check_against(net, _resolve(against, folders.checkpoint_files(), "checkpoint")) if against else None
        return render(summary, checked), summary
    except LohaError as exc:
        return f"Error: {exc}", {}


def merge_spec_lines(folders: Folders, text: str) -> list[str]:
    """`name[:unet[:te]]` lines with listed names replaced by their paths."""
    from .specs import parse_spec

    listed = folders.network_files()
    specs = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        name, unet, te = parse_spec(line.strip())
        path = _resolve(name, listed, "network")
        specs.append(":".join([path, f"{unet:g}", *([f"{te:g}"] if te is not None else [])]))
    if not specs:
        raise LohaError("list at least one network, one per line: name[:unet[:te]]")
    return specs


def merge_files(folders: Folders, checkpoint: str, networks: str, out_name: str, dtype: str = "keep",
                overwrite: bool = False, on_progress: Callable[[int, int], None] | None = None) -> str:
    """Merge and say what happened, in Markdown (errors included: the UI shows them as they are);
    `on_progress(done_bytes, total_bytes)` follows the merge."""
    from ..merge import merge
    from .specs import uses_from_specs

    try:
        source = _resolve(checkpoint, folders.checkpoint_files(), "checkpoint")
        uses = uses_from_specs(merge_spec_lines(folders, networks))
        name = (out_name or "").strip()
        if not name:
            raise LohaError("give the merged checkpoint a file name")
        out = name if os.path.isabs(name) else os.path.join(folders.output, name)
        out = out if out.endswith(".safetensors") else out + ".safetensors"
        result = merge(source, uses, out, dtype=None if dtype == "keep" else dtype, overwrite=overwrite,
                       on_progress=on_progress)
    except LohaError as exc:
        return f"**Error:** {error_text(exc)}"
    unmatched = sum(len(v) for v in result.unmatched.values())
    lines = [f"Wrote `{result.out}`: {len(result.changed)} tensors changed, "
             f"{result.seconds['total']:.1f} s."]
    if unmatched:
        lines.append(f"{unmatched} network names matched no weight.")
    return "\n\n".join(lines)


def append_line(name: str, text: str) -> str:
    """The networks box after choosing `name` in "Add a network" (strength 1)."""
    if not name:
        return text
    text = (text or "").rstrip()
    return f"{text}\n{name}:1" if text else f"{name}:1"


# --------------------------------------------------------------------------- tabs


def _refresh_button(gr, target, choices):
    button = gr.Button("Refresh", scale=0, min_width=90)
    button.click(fn=lambda: gr.update(choices=sorted(choices())), inputs=[], outputs=[target])
    return button


def merge_tab(gr, folders: Folders) -> None:
    # value=None: nothing chosen until the user chooses (current gradio would preselect the first file)
    with gr.Row():
        checkpoint = gr.Dropdown(sorted(folders.checkpoint_files()), value=None, label="Checkpoint",
                                 allow_custom_value=True, elem_id="loha-merge-checkpoint")
        _refresh_button(gr, checkpoint, folders.checkpoint_files)
    with gr.Row():
        add = gr.Dropdown(sorted(folders.network_files()), value=None, label="Add a network",
                          allow_custom_value=True, elem_id="loha-merge-add")
        _refresh_button(gr, add, folders.network_files)
    networks = gr.Textbox(label="Networks, one per line: name[:unet strength[:text-encoder strength]]", lines=4)
    with gr.Row():
        out_name = gr.Textbox(label="Output file name", value="merged.safetensors")
        dtype = gr.Radio(list(OUTPUT_DTYPES), value="keep", label="Output dtype")
        overwrite = gr.Checkbox(label="Overwrite", value=False)
    run = gr.Button("Merge", variant="primary", elem_id="loha-merge-run")
    status = gr.Markdown(elem_id="loha-merge-status")
    add.change(fn=append_line, inputs=[add, networks], outputs=[networks])

    def on_merge(checkpoint, networks, out_name, dtype, overwrite, progress=gr.Progress()):
        progress(0, desc="merging")
        return merge_files(folders, checkpoint, networks, out_name, dtype, overwrite,
                           on_progress=lambda done, total: progress(done / max(total, 1), desc="merging",
                                                                    unit="bytes"))

    run.click(fn=on_merge, inputs=[checkpoint, networks, out_name, dtype, overwrite], outputs=[status])


def inspect_tab(gr, folders: Folders) -> None:
    with gr.Row():
        network = gr.Dropdown(sorted(folders.network_files()), value=None, label="Network", allow_custom_value=True,
                              elem_id="loha-inspect-network")
        _refresh_button(gr, network, folders.network_files)
        against = gr.Dropdown([""] + sorted(folders.checkpoint_files()), value="", allow_custom_value=True,
                              label="Check names against a checkpoint (optional)")
    run = gr.Button("Inspect", variant="primary")
    report = gr.Code(label="Report", language=None, interactive=False, elem_id="loha-inspect-report")  # monospace
    summary = gr.JSON(label="Summary")
    run.click(fn=lambda n, a: inspect_file(folders, n, a), inputs=[network, against], outputs=[report, summary])


#: The tabs this module always has, in order: (title, builder).
TABS = (("Merge", merge_tab), ("Inspect", inspect_tab))


def tabs() -> list[tuple[str, object]]:
    """Optional tabs whose module imports, then the built-in ones."""
    found = []
    for name in OPTIONAL_TABS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                log.warning("loha: the %s tab is off: %s", name, exc)
            continue
        found.append((module.TITLE, module.tab))
    return found + list(TABS)


def build(folders: Folders):
    """The LoHa blocks: one tab per entry of `tabs()`. A tab may return (fn, outputs) pairs to
    run when a page loads (the Train tab reattaches to a running job)."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False, title="LoHa") as blocks:
        on_load = []
        with gr.Tabs():
            for title, make in tabs():
                with gr.Tab(title):
                    on_load += make(gr, folders) or []
        for fn, outputs in on_load:
            blocks.load(fn=fn, inputs=[], outputs=outputs)
    return blocks
