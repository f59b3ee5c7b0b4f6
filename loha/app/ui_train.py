"""The Train tab: pick a base model and a folder of images, press Train, watch the loss
and samples, get a LoHa file every tool loads (`loha.app.ui` shows this tab first).

Training runs in a background thread (one run at a time per process); the Train
button's handler is a generator that redraws the progress bar, the loss plot, the
latest samples and the status every half second until the run ends. Stop sets the
run's stop flag: the loop finishes its step and writes what it has. The handlers are
plain functions (`start`, `view`, `stop`), testable without a browser.
"""

from __future__ import annotations

import html
import os
import threading
import time
from dataclasses import dataclass, field

from ..errors import LohaError

TITLE = "Train"
#: Settings the tab shows, with their defaults (the demo model runs out of the box).
DEFAULTS = dict(model="demo", data="", output="my-loha.safetensors", preset="attn-mlp", rank=8, alpha=4.0,
                conv_rank=4, text_encoder=False, tucker=False, resolution=128, batch_size=2, steps=300,
                learning_rate=2e-3, lr_scheduler="constant", save_every=0, sample_every=50, seed=0,
                mixed_precision="no", gradient_checkpointing=False)
SETTINGS = tuple(DEFAULTS)
_REFRESH_S = 0.5
_PLOT_POINTS = 400


@dataclass
class TrainingRun:
    """One training run as the tab follows it."""

    config: object
    thread: threading.Thread | None = None
    stop_flag: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    total: int = 0
    losses: list = field(default_factory=list)
    sample: str | None = None
    saved: list = field(default_factory=list)
    log: list = field(default_factory=list)
    error: str | None = None
    result: object = None
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


_current: TrainingRun | None = None
_lock = threading.Lock()


def _config(folders, values: dict):
    from ..train import SAMPLE_DATA, NetworkSpec, TrainConfig

    model = (values["model"] or "demo").strip()
    if model != "demo":
        model = folders.checkpoint_files().get(model, model)
        if not os.path.exists(model):
            raise LohaError(f"base model {model!r}: no such file or folder (or choose 'demo')")
    name = (values["output"] or "").strip()
    if not name:
        raise LohaError("give the LoHa a file name")
    name = name if name.endswith(".safetensors") else name + ".safetensors"
    output = name if os.path.isabs(name) else os.path.join(folders.output, name)
    spec = NetworkSpec(preset=values["preset"], rank=int(values["rank"]), alpha=float(values["alpha"]),
                       conv_rank=int(values["conv_rank"]), conv_alpha=float(values["conv_rank"]) / 2,
                       use_tucker=bool(values["tucker"]), text_encoder=bool(values["text_encoder"]))
    return TrainConfig(data=(values["data"] or "").strip() or SAMPLE_DATA, output=output, model=model, network=spec,
                       resolution=int(values["resolution"]), batch_size=int(values["batch_size"]),
                       steps=int(values["steps"]), learning_rate=float(values["learning_rate"]),
                       lr_scheduler=values["lr_scheduler"], save_every=int(values["save_every"]),
                       sample_every=int(values["sample_every"]), seed=int(values["seed"]),
                       mixed_precision=values["mixed_precision"],
                       gradient_checkpointing=bool(values["gradient_checkpointing"]))


def start(folders, values: dict) -> TrainingRun:
    """Start a run in the background; refuses while another runs."""
    from ..train import Callbacks, train

    global _current
    with _lock:
        if _current is not None and _current.running:
            raise LohaError("a training run is already going; stop it first")
        job = TrainingRun(_config(folders, {**DEFAULTS, **values}))
        job.total = job.config.steps

        def progress(step, total, loss, lr):
            job.step, job.total = step, total
            job.losses.append(loss)

        callbacks = Callbacks(progress=progress, stop=job.stop_flag,
                              sample=lambda step, images, path: setattr(job, "sample", path),
                              saved=lambda step, path: job.saved.append((step, path)),
                              log=job.log.append)

        def run():
            try:
                job.result = train(job.config, callbacks)
            except LohaError as exc:
                job.error = str(exc)
            except Exception as exc:  # shown in the tab rather than lost in a thread
                job.error = f"{type(exc).__name__}: {exc}"

        job.thread = threading.Thread(target=run, name="loha-train", daemon=True)
        _current = job
        job.thread.start()
        return job


def stop(job: TrainingRun | None = None) -> str:
    job = job or _current
    if job is None or not job.running:
        return "Nothing is training."
    job.stop_flag.set()
    return "Stopping after this step; the LoHa is saved with what it has."


def progress_html(job: TrainingRun) -> str:
    fraction = job.step / job.total if job.total else 0.0
    state = "done" if job.result else ("failed" if job.error else ("stopping" if job.stop_flag.is_set() else "training"))
    return (f'<div class="loha-progress" data-step="{job.step}" data-total="{job.total}" data-state="{state}">'
            f'<progress max="{job.total}" value="{job.step}" style="width:100%"></progress>'
            f"<div>{state}: step {job.step} / {job.total} ({fraction:.0%})"
            f"{f', loss {job.losses[-1]:.4f}' if job.losses else ''}</div></div>")


def loss_frame(job: TrainingRun):
    """Steps and losses for the plot (thinned to a few hundred points)."""
    import pandas as pd

    every = max(1, len(job.losses) // _PLOT_POINTS)
    steps = list(range(1, len(job.losses) + 1))[::every]
    return pd.DataFrame({"step": steps, "loss": job.losses[::every]})


def status_markdown(job: TrainingRun) -> str:
    lines = [html.escape(line) for line in job.log[-4:]]
    if job.error:
        lines.append(f"**Error:** {html.escape(job.error)}")
    for step, path in job.saved[-3:]:
        lines.append(f"saved `{path}` (step {step})")
    if job.result is not None:
        r = job.result
        n = max(1, len(r.losses) // 10)
        if r.losses:
            lines.append(f"**Done** in {r.seconds:.0f} s: mean loss first 10% {sum(r.losses[:n]) / n:.4f}, "
                         f"last 10% {sum(r.losses[-n:]) / n:.4f} → `{r.path}`")
    return "\n\n".join(lines)


def view(job: TrainingRun) -> tuple:
    """(progress HTML, loss frame, sample image path, status Markdown, file path)."""
    path = job.result.path if job.result is not None else None
    return progress_html(job), loss_frame(job), job.sample, status_markdown(job), path


def _labels():
    from ..train.modules import PRESET_HELP

    return {
        "model": "Base model: 'demo', a checkpoint name or path, or a diffusers folder",
        "data": "Image folder (.txt captions beside images, N_name/ = N repeats); empty = bundled samples",
        "output": "LoHa file name", "preset": "Layers (" + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + ")",
        "rank": "Rank", "alpha": "Alpha", "conv_rank": "Conv rank (full preset)", "text_encoder": "Train text encoder",
        "tucker": "Tucker conv cores", "resolution": "Resolution", "batch_size": "Batch size", "steps": "Steps",
        "learning_rate": "Learning rate", "lr_scheduler": "LR schedule", "save_every": "Save every N steps (0 = end only)",
        "sample_every": "Samples every N steps (0 = none)", "seed": "Seed", "mixed_precision": "Mixed precision",
        "gradient_checkpointing": "Gradient checkpointing",
    }


def tab(gr, folders) -> None:
    from ..train.loop import MIXED_PRECISION, SCHEDULES
    from ..train.modules import PRESETS

    label = _labels()
    widgets = {}
    with gr.Row():
        widgets["model"] = gr.Dropdown(["demo", *sorted(folders.checkpoint_files())], value=DEFAULTS["model"],
                                       label=label["model"], allow_custom_value=True,
                                       elem_id="loha-train-model")
        widgets["data"] = gr.Textbox(value=DEFAULTS["data"], label=label["data"], elem_id="loha-train-data")
        widgets["output"] = gr.Textbox(value=DEFAULTS["output"], label=label["output"], elem_id="loha-train-output")
    with gr.Row():
        widgets["preset"] = gr.Dropdown(list(PRESETS), value=DEFAULTS["preset"], label=label["preset"],
                                        elem_id="loha-train-preset")
        for key in ("rank", "alpha", "conv_rank"):
            widgets[key] = gr.Number(value=DEFAULTS[key], label=label[key], elem_id=f"loha-train-{key}")
        for key in ("text_encoder", "tucker"):
            widgets[key] = gr.Checkbox(value=DEFAULTS[key], label=label[key], elem_id=f"loha-train-{key}")
    with gr.Row():
        for key in ("resolution", "batch_size", "steps", "learning_rate", "save_every", "sample_every", "seed"):
            widgets[key] = gr.Number(value=DEFAULTS[key], label=label[key], elem_id=f"loha-train-{key}")
    with gr.Row():
        widgets["lr_scheduler"] = gr.Dropdown(list(SCHEDULES), value=DEFAULTS["lr_scheduler"], label=label["lr_scheduler"])
        widgets["mixed_precision"] = gr.Dropdown(list(MIXED_PRECISION), value=DEFAULTS["mixed_precision"],
                                                 label=label["mixed_precision"])
        widgets["gradient_checkpointing"] = gr.Checkbox(value=False, label=label["gradient_checkpointing"])
    with gr.Row():
        train_button = gr.Button("Train", variant="primary", elem_id="loha-train-start")
        stop_button = gr.Button("Stop (saves what it has)", variant="stop", elem_id="loha-train-stop")
    bar = gr.HTML(elem_id="loha-train-progress")
    with gr.Row():
        plot = gr.LinePlot(x="step", y="loss", title="Training loss", label="Loss", elem_id="loha-train-loss")
        sample = gr.Image(label="Samples (latest)", type="filepath", interactive=False, elem_id="loha-train-sample")
    status = gr.Markdown(elem_id="loha-train-status")
    file = gr.File(label="LoHa file", interactive=False, elem_id="loha-train-file")

    def on_train(*values):
        try:
            job = start(folders, dict(zip(SETTINGS, values)))
        except LohaError as exc:
            yield (gr.update(), gr.update(), gr.update(), f"**Error:** {exc}", gr.update())
            return
        while job.running:
            yield view(job)
            time.sleep(_REFRESH_S)
        yield view(job)

    train_button.click(fn=on_train, inputs=[widgets[k] for k in SETTINGS], outputs=[bar, plot, sample, status, file])
    stop_button.click(fn=lambda: stop(), inputs=[], outputs=[status], queue=False)
