"""The Train tab: pick a base model (a checkpoint, a diffusers folder or the demo) and a
folder of images, press Train, watch the loss, the time and the samples, get a LoHa file
every tool loads (`loha.app.ui` shows this tab first).

Training runs in a background thread (one run at a time per process); the Train
button's handler is a generator that redraws the progress (step, s/step, elapsed, ETA),
the loss plot, the gallery of samples over time and the status every half second until
the run ends. A page reload attaches to the running job again (`follow`, run on page
load). Stop sets the run's stop flag: the loop finishes its step and writes what it has.
Settings are saved to and loaded from the same kohya-style config files as
``loha train --config`` (`loha.train.settings`), and the presets ship with the package.
The handlers are plain functions (`start`, `view`, `stop`, `follow`, `save_settings`,
`load_settings`), testable without a browser.
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
DEFAULTS = dict(model="demo", data="", output="my-loha.safetensors", resume="", preset="attn-mlp", rank=8,
                alpha=4.0, conv_rank=4, conv_alpha=2.0, text_encoder=False, tucker=False, dora_wd=False,
                train_norm=False, rank_dropout=0.0, module_dropout=0.0, resolution=128, batch_size=2,
                gradient_accumulation_steps=1, steps=300, epochs=0, learning_rate=2e-3, optimizer="AdamW",
                lr_scheduler="constant", warmup_steps=0, noise_offset=0.0, min_snr_gamma=0.0, shuffle_caption=False,
                keep_tokens=0, caption_dropout_rate=0.0, flip_aug=False, mixed_precision="no",
                gradient_checkpointing=False, seed=0, save_every=0, sample_every=50, sample_prompts="", title="",
                author="", trigger_words="", description="", license="")
SETTINGS = tuple(DEFAULTS)
#: Tab settings that are NetworkSpec fields (tab name -> field); the rest are TrainConfig fields.
NETWORK_FIELDS = {"preset": "preset", "rank": "rank", "alpha": "alpha", "conv_rank": "conv_rank",
                  "conv_alpha": "conv_alpha", "text_encoder": "text_encoder", "tucker": "use_tucker",
                  "dora_wd": "dora_wd", "train_norm": "train_norm", "rank_dropout": "rank_dropout",
                  "module_dropout": "module_dropout"}
_INTEGERS = ("rank", "conv_rank", "resolution", "batch_size", "gradient_accumulation_steps", "steps", "epochs",
             "warmup_steps", "keep_tokens", "seed", "save_every", "sample_every")
_FLOATS = ("alpha", "conv_alpha", "rank_dropout", "module_dropout", "learning_rate", "noise_offset", "min_snr_gamma",
           "caption_dropout_rate")
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
    info: object = None  # the latest loha.train.StepInfo (times)
    sample: str | None = None
    samples: list = field(default_factory=list)  # (path, "step N") over time
    saved: list = field(default_factory=list)
    log: list = field(default_factory=list)
    error: str | None = None
    result: object = None
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def state(self) -> str:
        if self.error:
            return "failed"
        if self.result is not None:
            return "stopped" if self.result.stopped else "done"
        if self.stop_flag.is_set():
            return "stopping"
        return "training" if self.step else "preparing"


_current: TrainingRun | None = None
_lock = threading.Lock()


def current() -> TrainingRun | None:
    return _current


# --------------------------------------------------------------------------- settings <-> configs


def _typed(values: dict) -> dict:
    out = dict(values)
    for key in _INTEGERS:
        if key in out:
            out[key] = int(out[key] or 0)
    for key in _FLOATS:
        if key in out:
            out[key] = float(out[key] or 0)
    return out


def _config(folders, values: dict):
    """The TrainConfig of the tab's settings."""
    from ..train import SAMPLE_DATA
    from ..train.settings import build_config

    values = _typed({**DEFAULTS, **values})
    model = (values["model"] or "demo").strip()
    if model != "demo":
        model = folders.model_sources().get(model, model)
        if not os.path.exists(model):
            raise LohaError(f"base model {model!r}: no such file or folder (or choose 'demo')")
    name = (values["output"] or "").strip()
    if not name:
        raise LohaError("give the LoHa a file name")
    name = name if name.endswith(".safetensors") else name + ".safetensors"
    output = name if os.path.isabs(name) else os.path.join(folders.output, name)
    resume = (values["resume"] or "").strip()
    if resume and not os.path.isabs(resume):
        resume = os.path.join(folders.output, resume)
    network = {field: values[key] for key, field in NETWORK_FIELDS.items()}
    config = {key: values[key] for key in SETTINGS if key not in NETWORK_FIELDS}
    config.update(model=model, data=(values["data"] or "").strip() or SAMPLE_DATA, output=output,
                  resume=resume or None, network=network)
    return build_config(config)


def settings_of(config) -> dict:
    """The tab's settings of a TrainConfig (or of TrainConfig keyword arguments)."""
    import dataclasses

    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    network = values.pop("network", {}) or {}
    if dataclasses.is_dataclass(network):
        network = dataclasses.asdict(network)
    out = {key: values[key] for key in SETTINGS if key in values and key not in NETWORK_FIELDS}
    out.update({key: network[f] for key, f in NETWORK_FIELDS.items() if f in network})
    from ..train import SAMPLE_DATA

    if "output" in out:
        out["output"] = os.path.basename(out["output"])
    out["resume"] = out.get("resume") or ""  # a loaded config starts a new run unless it names a state
    if out.get("data") == SAMPLE_DATA:
        out["data"] = ""  # the field's way of saying "the bundled samples"
    return out


def save_settings(folders, values: dict, name: str) -> str:
    """Write the tab's settings as a config file (TOML, or JSON by extension) next to the outputs."""
    from ..train.settings import CONFIG_EXTENSIONS, write_config

    name = (name or "").strip()
    if not name:
        raise LohaError("give the config a file name (.toml or .json)")
    if not name.lower().endswith(CONFIG_EXTENSIONS):
        name += ".toml"
    path = name if os.path.isabs(name) else os.path.join(folders.output, name)
    return write_config(_config(folders, values), path)


def load_settings(folders, name: str) -> dict:
    """The tab's settings from a config file (a path, a name in the output folder) or a preset."""
    from ..train.settings import CONFIG_PRESETS, read_config

    name = (name or "").strip()
    if not name:
        raise LohaError("choose a preset or give a config file")
    local = os.path.join(folders.output, name)
    values = read_config(name if name in CONFIG_PRESETS or os.path.isabs(name) or not os.path.isfile(local)
                         else local)
    return settings_of(values)


# --------------------------------------------------------------------------- runs


def start(folders, values: dict) -> TrainingRun:
    """Start a run in the background; refuses while another runs."""
    from ..train import Callbacks, train

    global _current
    with _lock:
        if _current is not None and _current.running:
            raise LohaError("a training run is already going; stop it first")
        job = TrainingRun(_config(folders, values))
        job.total = job.config.steps

        def progress(step, total, loss, lr):
            job.step, job.total = step, total
            job.losses.append(loss)

        def sample(step, images, path):
            job.sample = path
            job.samples.append((path, f"step {step}"))

        callbacks = Callbacks(progress=progress, timing=lambda info: setattr(job, "info", info),
                              stop=job.stop_flag, sample=sample,
                              saved=lambda step, path: job.saved.append((step, path)), log=job.log.append)

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


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_html(job: TrainingRun) -> str:
    fraction = job.step / job.total if job.total else 0.0
    info = job.info
    times = ""
    if info is not None:
        times = (f" · {info.seconds_per_step:.2f} s/step · elapsed {_clock(info.elapsed)}"
                 + (f" · ETA {_clock(info.eta)}" if job.running and not job.stop_flag.is_set() else ""))
    eta = f"{info.eta:.1f}" if info is not None else ""
    state = job.state
    head = {"stopped": f"stopped at step {job.step} of {job.total}",
            "preparing": "preparing (loading the model, encoding images)"}.get(
        state, f"{state}: step {job.step} / {job.total} ({fraction:.0%})")
    return (f'<div class="loha-progress" data-step="{job.step}" data-total="{job.total}" data-state="{state}" '
            f'data-eta="{eta}">'
            f'<progress max="{job.total}" value="{job.step}" style="width:100%"></progress>'
            f"<div>{head}{f', loss {job.losses[-1]:.4f}' if job.losses else ''}{times}</div></div>")


def loss_frame(job: TrainingRun):
    """Steps and losses for the plot (thinned to a few hundred points)."""
    import pandas as pd

    every = max(1, len(job.losses) // _PLOT_POINTS)
    steps = list(range(1, len(job.losses) + 1))[::every]
    return pd.DataFrame({"step": steps, "loss": job.losses[::every]})


def status_markdown(job: TrainingRun) -> str:
    """The run's last log lines and files (a monospace block), then how it ended."""
    lines = list(job.log[-4:]) + [f"saved {path} (step {step})" for step, path in job.saved[-3:]]
    out = []
    if lines:
        out.append("```\n" + "\n".join(line.replace("```", "'''") for line in lines) + "\n```")
    if job.error:
        out.append(f"**Error:** {html.escape(job.error)}")
    if job.result is not None:
        r = job.result
        n = max(1, len(r.losses) // 10)
        ended = f"**Stopped at step {r.steps}** of {r.total}" if r.stopped else f"**Done**: {r.steps} steps"
        if r.losses:
            out.append(f"{ended} in {_clock(r.seconds)}: mean loss first 10% {sum(r.losses[:n]) / n:.4f}, "
                       f"last 10% {sum(r.losses[-n:]) / n:.4f} → `{r.path}`")
    return "\n\n".join(out)


def view(job: TrainingRun) -> tuple:
    """(progress HTML, loss frame, latest sample path, status Markdown, file path)."""
    path = job.result.path if job.result is not None else None
    return progress_html(job), loss_frame(job), job.sample, status_markdown(job), path


def gallery(job: TrainingRun) -> list:
    """Samples over time, newest first, each captioned with its step."""
    return list(reversed(job.samples))


def follow(job: TrainingRun | None = None):
    """Frames (view + gallery) of a job until it ends: the Train button's stream, and a
    reloaded page's (which attaches to the job that is running)."""
    job = job or _current
    if job is None:
        return
    while job.running:
        yield (*view(job), gallery(job))
        time.sleep(_REFRESH_S)
    yield (*view(job), gallery(job))


# --------------------------------------------------------------------------- the tab


def _labels():
    from ..train.modules import PRESET_HELP

    return {
        "model": "Base model: a checkpoint (any SD1/SD2/SDXL file), a diffusers folder, or 'demo'",
        "data": "Image folder (.txt captions beside images, N_name/ = N repeats); empty = bundled samples",
        "output": "LoHa file name", "resume": "Resume from (a NAME-state folder of an earlier run; empty = new run)",
        "preset": "Layers (" + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + ")",
        "rank": "Rank (network_dim)", "alpha": "Alpha", "conv_rank": "Conv rank (full preset)",
        "conv_alpha": "Conv alpha", "text_encoder": "Train text encoder", "tucker": "Tucker conv cores",
        "dora_wd": "DoRA (dora_wd)", "train_norm": "Train norm layers (train_norm)", "rank_dropout": "Rank dropout",
        "module_dropout": "Module dropout",
        "resolution": "Resolution", "batch_size": "Batch size", "gradient_accumulation_steps": "Gradient accumulation",
        "steps": "Steps", "epochs": "Epochs (0 = use steps)", "learning_rate": "Learning rate",
        "optimizer": "Optimizer", "lr_scheduler": "LR schedule", "warmup_steps": "Warm-up steps",
        "noise_offset": "Noise offset", "min_snr_gamma": "Min-SNR γ (0 = off)", "shuffle_caption": "Shuffle caption",
        "keep_tokens": "Keep tokens", "caption_dropout_rate": "Caption dropout", "flip_aug": "Flip augmentation",
        "mixed_precision": "Mixed precision", "gradient_checkpointing": "Gradient checkpointing", "seed": "Seed",
        "save_every": "Save every N steps (0 = end only)", "sample_every": "Samples every N steps (0 = none)",
        "sample_prompts": "Sample prompts, one a line (kohya: prompt --n negative --w 512 --h 512 --s 20 --l 7 "
                          "--d 1); empty = the first caption",
        "title": "Title", "author": "Author", "trigger_words": "Trigger words", "description": "Description",
        "license": "Licence",
    }


def _widget(gr, key: str, label: str, choices=None):
    value = DEFAULTS[key]
    elem = f"loha-train-{key}"
    if choices is not None:
        return gr.Dropdown(list(choices), value=value, label=label, elem_id=elem)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=label, elem_id=elem)
    if isinstance(value, (int, float)):
        return gr.Number(value=value, label=label, elem_id=elem)
    return gr.Textbox(value=value, label=label, elem_id=elem)


def tab(gr, folders) -> list:
    """The Train tab's components; returns what to run on page load (reattaching to a running job)."""
    from ..train.loop import MIXED_PRECISION, SCHEDULES
    from ..train.modules import PRESETS
    from ..train.optim import OPTIMIZERS
    from ..train.settings import CONFIG_PRESETS

    label = _labels()
    widgets = {}
    choices = {"preset": PRESETS, "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULES,
               "mixed_precision": MIXED_PRECISION}
    with gr.Row():
        widgets["model"] = gr.Dropdown(["demo", *sorted(folders.model_sources())], value=folders.default_model,
                                       label=label["model"], allow_custom_value=True, elem_id="loha-train-model")
        refresh = gr.Button("Refresh", scale=0, min_width=90)
        widgets["data"] = _widget(gr, "data", label["data"])
    with gr.Row():
        widgets["output"] = _widget(gr, "output", label["output"])
        widgets["resume"] = _widget(gr, "resume", label["resume"])
    with gr.Row():
        preset = gr.Dropdown(list(CONFIG_PRESETS), value=None, label="Preset", elem_id="loha-train-preset-config")
        config_name = gr.Textbox(value="my-loha.toml", label="Config file (kohya sd-scripts keys; .toml or .json)",
                                 elem_id="loha-train-config")
        load_button = gr.Button("Load", elem_id="loha-train-load")
        save_button = gr.Button("Save", elem_id="loha-train-save")
    rows = (("preset", "rank", "alpha", "conv_rank", "conv_alpha", "text_encoder", "tucker", "dora_wd"),
            ("resolution", "batch_size", "gradient_accumulation_steps", "steps", "epochs", "learning_rate",
             "optimizer", "lr_scheduler"),
            ("seed", "save_every", "sample_every", "mixed_precision", "gradient_checkpointing"))
    for row in rows:
        with gr.Row():
            for key in row:
                widgets[key] = _widget(gr, key, label[key], choices.get(key))
    widgets["sample_prompts"] = gr.Textbox(value="", label=label["sample_prompts"], lines=2,
                                           elem_id="loha-train-sample_prompts")
    with gr.Accordion("More: noise, captions, dropout, norm layers, metadata", open=False):
        for row in (("warmup_steps", "noise_offset", "min_snr_gamma", "rank_dropout", "module_dropout",
                     "train_norm"), ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "flip_aug"),
                    ("title", "author", "trigger_words", "license"), ("description",)):
            with gr.Row():
                for key in row:
                    widgets[key] = _widget(gr, key, label[key], choices.get(key))
    with gr.Row():
        train_button = gr.Button("Train", variant="primary", elem_id="loha-train-start")
        stop_button = gr.Button("Stop (saves what it has)", variant="stop", elem_id="loha-train-stop")
    bar = gr.HTML(elem_id="loha-train-progress")
    with gr.Row():
        plot = gr.LinePlot(x="step", y="loss", title="Training loss", label="Loss", elem_id="loha-train-loss")
        sample = gr.Image(label="Samples (latest)", type="filepath", interactive=False, elem_id="loha-train-sample")
    samples = gr.Gallery(label="Samples over time (newest first)", columns=6, height=360, object_fit="contain",
                         elem_id="loha-train-gallery")
    status = gr.Markdown(elem_id="loha-train-status")
    file = gr.File(label="LoHa file", interactive=False, elem_id="loha-train-file")
    outputs = [bar, plot, sample, status, file, samples]
    inputs = [widgets[k] for k in SETTINGS]

    def on_train(*values):
        try:
            job = start(folders, dict(zip(SETTINGS, values)))
        except LohaError as exc:
            yield (gr.update(), gr.update(), gr.update(), f"**Error:** {html.escape(str(exc))}", gr.update(),
                   gr.update())
            return
        yield from follow(job)

    def on_save(name, *values):
        try:
            return f"Saved `{save_settings(folders, dict(zip(SETTINGS, values)), name)}`"
        except LohaError as exc:
            return f"**Error:** {html.escape(str(exc))}"

    def on_load(name):
        try:
            values = load_settings(folders, name)
        except LohaError as exc:
            return [gr.update()] * len(SETTINGS) + [f"**Error:** {html.escape(str(exc))}"]
        return [gr.update(value=values[k]) if k in values else gr.update() for k in SETTINGS] + [f"Loaded {name}"]

    train_button.click(fn=on_train, inputs=inputs, outputs=outputs)
    stop_button.click(fn=lambda: stop(), inputs=[], outputs=[status], queue=False)
    save_button.click(fn=on_save, inputs=[config_name, *inputs], outputs=[status])
    load_button.click(fn=on_load, inputs=[config_name], outputs=[*inputs, status])
    preset.change(fn=lambda name: on_load(name) if name else [gr.update()] * (len(SETTINGS) + 1), inputs=[preset],
                  outputs=[*inputs, status])
    refresh.click(fn=lambda: gr.update(choices=["demo", *sorted(folders.model_sources())]), inputs=[],
                  outputs=[widgets["model"]])

    def reattach():
        """A page load: show the job that is running (or ran last) with its settings in the fields."""
        job = _current
        if job is None:
            yield tuple(gr.update() for _ in outputs + inputs)
            return
        values = settings_of(job.config)
        listed = {path: name for name, path in folders.model_sources().items()}
        values["model"] = listed.get(values["model"], values["model"])
        fields = [gr.update(value=values[k]) if k in values else gr.update() for k in SETTINGS]
        for index, frame in enumerate(follow(job)):
            yield (*frame, *(fields if index == 0 else [gr.update()] * len(SETTINGS)))

    return [(reattach, outputs + inputs)]
