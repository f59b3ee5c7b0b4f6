"""The `loha` command line: every subcommand is declared here, each runs one library call.

    python -m loha inspect FILE [--json] [--against CHECKPOINT]
    python -m loha merge CHECKPOINT --loha FILE[:UNET[:TE]] [...] -o OUT [--dtype fp16|bf16|fp32]
                         [--device cpu|cuda] [--allow-unmatched] [--force]
    python -m loha demo [--out FOLDER]
    python -m loha convert SRC[:UNET[:TE]] [...] -o OUT --to lycoris|peft|lora [--rank R] [--base BASE]
    python -m loha train -o OUT [--model demo|DIFFUSERS_FOLDER|CHECKPOINT] [--data FOLDER] [--config FILE] [...]
    python -m loha ui [--checkpoints DIR] [--networks DIR] [--output DIR] [--port N]

Errors print as ``loha: <message>`` on stderr, without a traceback, and exit 1 (with
the flag that would have accepted what was refused); usage errors exit 2; an
interrupt exits 130 (after removing any partial output). Several training processes:
``accelerate launch --num_processes N -m loha train …``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ..errors import LohaError
from ..files.safetensors_io import DTYPE_NAMES

#: Library arguments (`LohaError.option`) -> the flag that sets them here.
OPTION_FLAGS = {"overwrite": "--force", "allow_unmatched": "--allow-unmatched", "tokenizer": "--tokenizer FOLDER",
                "vae": "--vae FOLDER", "optimizer": "--optimizer", "config": "--config FILE",
                "resume": "--resume"}


# --------------------------------------------------------------------------- handlers


def _inspect(args) -> int:
    from ..files.network import load
    from ..summary import against, render, summarize

    net = load(args.file)
    summary = summarize(net)
    match = against(net, args.against) if args.against else None
    if args.json:
        if match is not None:
            summary["against"] = match
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(render(summary, match))
    if match is not None and (match["unmatched"] or match["error"]):
        return 1
    return 0


def _merge(args) -> int:
    from ..merge import merge
    from .specs import uses_from_specs

    uses = uses_from_specs(args.loha)
    result = merge(args.checkpoint, uses, args.out, dtype=args.dtype, device=args.device,
                   allow_unmatched=args.allow_unmatched, overwrite=args.force, progress=None)
    err = sys.stderr
    if not result.streamed:
        print(f"loha: note: {args.checkpoint} is a pickle, loaded whole with torch.load(weights_only=True) "
              "(not streamed); the output is safetensors", file=err)
    for label, names in result.unmatched.items():
        print(f"loha: warning: {label}: {len(names)} names match nothing and were skipped: "
              + ", ".join(names), file=err)
    for label, keys in result.unknown_keys.items():
        print(f"loha: warning: {label}: {len(keys)} keys are of no known kind and were not merged: "
              + ", ".join(keys), file=err)
    if result.dropped:
        print(f"loha: note: non-tensor entries not written: {', '.join(result.dropped)}", file=err)
    for record in result.merged:
        print(f"merged {record['name']} (unet {record['unet']:g}, te {record['te']:g}, "
              f"{record['modules']} modules, sha256 {record.get('autov2', '-')})")
    print(f"wrote {result.out}: {result.tensors} tensors, {len(result.changed)} changed, "
          f"{result.bytes / 1e6:.1f} MB in {result.seconds['total']:.1f} s")
    return 0


def _demo(args) -> int:
    from .demo import run

    run(args.out, seed=args.seed)
    return 0


def _convert(args) -> int:
    from ..convert import kohya_to_peft, peft_to_kohya, to_lora
    from ..files.network import load
    from .specs import parse_spec

    specs = [parse_spec(s) for s in args.src]
    if args.to != "lora":
        if len(specs) != 1 or specs[0][1:] != (1.0, None):
            raise LohaError(f"--to {args.to} converts one network, without strengths")
        src = specs[0][0]
        if args.to == "lycoris":
            print(f"wrote {peft_to_kohya(src, args.out, args.base, overwrite=args.force)}")
        else:
            for folder in kohya_to_peft(src, args.out, args.base, overwrite=args.force):
                print(f"wrote {folder}")
        return 0
    uses = [(load(path), unet, te) for path, unet, te in specs]
    report = to_lora(uses, args.out, args.rank, args.base, dtype=args.dtype, overwrite=args.force)
    for layer in report.layers:
        if layer.rank < layer.exact_rank:
            print(f"{layer.name}: rank {layer.exact_rank} -> {layer.rank}, relative error {layer.error:.3e}")
    reduced = sum(layer.rank < layer.exact_rank for layer in report.layers)
    print(f"wrote {report.out}: {len(report.layers)} layers, {reduced} reduced, max relative error "
          f"{report.max_error:.3e}")
    return 0


def _train_config(args):
    """The run's TrainConfig: a --config file (or preset) first, the flags given over it."""
    from ..train import SAMPLE_DATA
    from ..train.optim import parse_arguments
    from ..train.settings import build_config, read_config

    import dataclasses

    from ..train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = vars(args)
    values = read_config(args.config) if given.get("config") else {}
    network = dict(values.get("network", {}))
    for key, value in given.items():
        if key.startswith("net_"):
            network[key[4:]] = value
        elif key == "optimizer_args":
            values[key] = {**values.get(key, {}), **parse_arguments(value)}
        elif key in fields:  # the flags' dests are TrainConfig's field names (network ones: net_ + NetworkSpec's)
            values[key] = value
    if network:
        values["network"] = network
    values.setdefault("data", SAMPLE_DATA)
    if "output" not in values:
        raise LohaError("give the output file: -o OUT.safetensors (or output_dir/output_name in --config)")
    return build_config(values)


def _train(args) -> int:
    from ..train import Callbacks, train
    from ..train.settings import write_config

    config = _train_config(args)
    if getattr(args, "save_config", None):
        print(f"wrote {write_config(config, args.save_config)}; train with: loha train --config {args.save_config}")
        return 0
    follow = _TrainProgress(max(1, getattr(args, "log_every", 10)))
    callbacks = Callbacks(progress=follow.progress, timing=follow.timing, log=follow.write,
                          saved=lambda step, path: follow.write(f"saved {path} (step {step})"),
                          sample=lambda step, images, path: follow.write(f"samples {path}"))
    try:
        result = train(config, callbacks)
    finally:
        follow.close()
    if result.losses and result.main:
        n = max(1, len(result.losses) // 10)
        first, last = sum(result.losses[:n]) / n, sum(result.losses[-n:]) / n
        ended = f"stopped at step {result.steps} of {result.total}" if result.stopped else f"done: {result.steps} steps"
        print(f"{ended} in {result.seconds:.1f} s; mean loss first 10% {first:.4f}, last 10% {last:.4f} "
              f"-> {result.path}", flush=True)
    return 0


class _TrainProgress:
    """A tqdm bar (steps, s/step, ETA, loss) on a terminal; elsewhere (a log file, a pipe, a
    notebook cell) a line every `every` steps and at the end, with the same numbers."""

    def __init__(self, every: int):
        self.every, self.bar = every, None
        self.terminal = sys.stderr.isatty()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, step, total, loss, lr) -> None:
        pass  # timing() has the same step with its times

    def timing(self, info) -> None:
        from tqdm import tqdm

        if self.terminal:
            if self.bar is None:
                self.bar = tqdm(total=info.total, initial=info.step - 1, unit="step", dynamic_ncols=True,
                                desc="loha train")
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.3g}", refresh=False)
            self.bar.update(info.step - self.bar.n)
        elif info.step % self.every == 0 or info.step == info.total:
            interval = tqdm.format_interval
            print(f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.3g}  "
                  f"{info.seconds_per_step:.2f} s/step  elapsed {interval(info.elapsed)}  ETA {interval(info.eta)}",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _ui(args) -> int:
    from .ui import Folders, build, missing_packages

    missing = missing_packages()
    if missing:
        raise LohaError(f"the UI needs {' and '.join(missing)}: pip install 'loha[ui]'")
    folders = Folders(checkpoints=args.checkpoints or ["."], networks=args.networks or ["."], output=args.output)
    build(folders).queue().launch(server_name=args.host, server_port=args.port)  # queue: progress and streams
    return 0


# --------------------------------------------------------------------------- the parser


def _declare_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what a network file holds", description="Family, parts, ranks, alphas, "
                       "Tucker/DoRA, dtypes, training metadata of a network file.")
    p.add_argument("file", help="network file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--against", metavar="CHECKPOINT",
                   help="also list the names that match no weight of this checkpoint (exit 1 if any)")
    p.set_defaults(run=_inspect)


def _declare_merge(sub) -> None:
    p = sub.add_parser("merge", help="bake networks into a checkpoint",
                       description="Merge networks into a checkpoint, tensor by tensor, into a new safetensors file.")
    p.add_argument("checkpoint", help="checkpoint (.safetensors; a .ckpt is loaded whole, weights only)")
    p.add_argument("--loha", action="append", required=True, metavar="FILE[:UNET[:TE]]",
                   help="network and its strengths (default 1; TE defaults to UNET); repeat for several")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (written only when complete)")
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES),
                   help="dtype of every floating tensor of the output (default: keep each tensor's)")
    p.add_argument("--device", default="cpu", help="where ΔW is computed and added: cpu (default) or cuda")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="merge even if some network names match no weight (they are listed)")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists (never the input)")
    p.set_defaults(run=_merge)


def _declare_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole job on a small built-in model",
                       description="Build a small SD1-architecture checkpoint and a LoHa, merge, patch, "
                       "check they agree, and draw the effect. Needs diffusers and transformers.")
    p.add_argument("--out", default="loha-demo", help="folder for its files (default ./loha-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo)


def _declare_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="PEFT ↔ LyCORIS, LoHa → LoRA",
        description="Convert a PEFT LoHa folder to a LyCORIS/kohya file (--to lycoris) or back (--to peft), "
        "or one or more networks into one kohya LoRA (--to lora), exact or reduced to --rank.")
    p.add_argument("src", nargs="+", metavar="SRC[:UNET[:TE]]",
                   help="network file or PEFT folder; with --to lora, several, each with its strengths")
    p.add_argument("-o", "--out", required=True, help="output file (lycoris, lora) or folder (peft)")
    p.add_argument("--to", required=True, choices=("lycoris", "peft", "lora"))
    p.add_argument("--rank", type=int, help="--to lora: reduce layers above this rank by SVD (errors are printed)")
    p.add_argument("--base", help="base model: sd1, sd2, sdxl (default: the network's family), a diffusers "
                   "folder, or a checkpoint file (not for --to peft)")
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="fp32", help="--to lora: dtype of the factors")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_convert)


def _declare_train(sub) -> None:
    import dataclasses

    from ..train.loop import MIXED_PRECISION, PREDICTION_TYPES, SCHEDULES, TRACKERS, TrainConfig
    from ..train.modules import PRESET_HELP, NetworkSpec
    from ..train.optim import OPTIMIZERS
    from ..train.settings import CONFIG_PRESETS

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults.update({"net_" + f.name: f.default for f in dataclasses.fields(NetworkSpec)})
    p = sub.add_parser("train", help="train a LoHa on a folder of images", description=(
        "Train a LoHa on a folder of images (same-name .txt captions, N_name/ folders = N repeats) and write a "
        "LyCORIS/kohya .safetensors file. Runs out of the box on the demo model and the bundled sample images. "
        "Settings come from --config (a kohya sd-scripts TOML/JSON config, or a preset), then the flags given. "
        "Several processes: accelerate launch --num_processes N -m loha train …"),
        argument_default=argparse.SUPPRESS)

    def add(group, *flags, dest, help, **kwargs):
        default = defaults.get(dest)
        shown = "" if default in (None, "", 0, False) or dest.endswith("data") else f" (default {default})"
        group.add_argument(*flags, dest=dest, help=help + shown, **kwargs)

    flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("config")
    g.add_argument("--config", metavar="FILE", help="a TOML/JSON config with kohya sd-scripts' key names, or a preset: "
                   + ", ".join(CONFIG_PRESETS) + "; flags given override it")
    g.add_argument("--save-config", metavar="FILE", help="write the run's config (TOML, or JSON by extension) and "
                   "exit without training")
    g = p.add_argument_group("model and data")
    add(g, "--model", dest="model", help="'demo' (small SD1-architecture model, seeded), a diffusers folder "
        "(SD1.x/SD2.x/SDXL), or an SD1.x/SD2.x/SDXL checkpoint (any: fp16/bf16, pruned or not, its VAE is used)")
    add(g, "--tokenizer", dest="tokenizer", help="tokenizer folder instead of the shipped CLIP one (for SDXL a "
        "folder with tokenizer/ and tokenizer_2/)")
    add(g, "--vae", dest="vae", help="diffusers VAE folder (for a checkpoint without one)")
    add(g, "--data", dest="data", help="image folder (default: the bundled sample images)")
    add(g, "-o", "--out", dest="output", help="output .safetensors file")
    add(g, "--resolution", dest="resolution", type=int, help="bucket area = resolution²")
    add(g, "--bucket-step", dest="bucket_step", type=int, help="bucket sides are multiples of this")

    g = p.add_argument_group("network")
    add(g, "--preset", dest="net_preset", choices=list(PRESET_HELP),
        help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    add(g, "--rank", dest="net_rank", type=int, help="linear rank (network_dim)")
    add(g, "--alpha", dest="net_alpha", type=float, help="network_alpha")
    add(g, "--conv-rank", dest="net_conv_rank", type=int, help="rank of k×k convs (preset full)")
    add(g, "--conv-alpha", dest="net_conv_alpha", type=float, help="alpha of k×k convs")
    add(g, "--tucker", dest="net_use_tucker", action=flag, help="Tucker cores for k×k convs (use_tucker)")
    add(g, "--text-encoder", dest="net_text_encoder", action=flag, help="train the text encoder(s) too (SDXL: both)")
    add(g, "--rank-dropout", dest="net_rank_dropout", type=float, help="LyCORIS rank_dropout: drop rows of ΔW")
    add(g, "--module-dropout", dest="net_module_dropout", type=float, help="LyCORIS module_dropout: skip modules")
    add(g, "--dora-wd", dest="net_dora_wd", action=flag, help="weight-decomposed LoHa (LyCORIS dora_wd)")
    add(g, "--train-norm", dest="net_train_norm", action=flag,
        help="also train the preset's norm layers' scale and shift (LyCORIS train_norm: w_norm, b_norm)")

    g = p.add_argument_group("optimisation")
    add(g, "--steps", dest="steps", type=int, help="optimizer steps (max_train_steps)")
    add(g, "--epochs", dest="epochs", type=int, help="passes over the data instead of --steps (max_train_epochs)")
    add(g, "--batch-size", dest="batch_size", type=int, help="images per micro-step, split over processes")
    add(g, "--gradient-accumulation-steps", "--grad-accum", dest="gradient_accumulation_steps", type=int,
        help="micro-steps per optimizer step")
    add(g, "--lr", dest="learning_rate", type=float, help="learning rate")
    add(g, "--te-lr", dest="text_encoder_lr", type=float, help="text-encoder learning rate (default --lr)")
    add(g, "--optimizer", dest="optimizer", choices=list(OPTIMIZERS),
        help="AdamW8bit needs bitsandbytes, Prodigy prodigyopt, Lion lion-pytorch, Adafactor transformers")
    add(g, "--optimizer-args", dest="optimizer_args", nargs="*", metavar="KEY=VALUE",
        help="extra optimizer arguments (kohya's optimizer_args), e.g. d_coef=2 betas=(0.9,0.99)")
    add(g, "--scheduler", dest="lr_scheduler", choices=SCHEDULES, help="diffusers' get_scheduler schedule")
    add(g, "--warmup", dest="warmup_steps", type=int, help="warm-up steps")
    add(g, "--lr-cycles", dest="lr_scheduler_num_cycles", type=int, help="cosine_with_restarts cycles")
    add(g, "--lr-power", dest="lr_scheduler_power", type=float, help="polynomial power")
    add(g, "--weight-decay", dest="weight_decay", type=float, help="weight decay")
    add(g, "--max-grad-norm", dest="max_grad_norm", type=float, help="0 = no clipping")
    add(g, "--gradient-checkpointing", dest="gradient_checkpointing", action=flag, help="recompute activations")
    add(g, "--mixed-precision", dest="mixed_precision", choices=list(MIXED_PRECISION), help="the frozen model's dtype")
    add(g, "--prediction", dest="prediction_type", choices=PREDICTION_TYPES, help="default: the model's")
    add(g, "--clip-skip", dest="clip_skip", type=int,
        help="1 = the last layer (SD1/SD2), the penultimate one (SDXL); k skips k-1 more")
    add(g, "--noise-offset", dest="noise_offset", type=float, help="kohya's noise offset")
    add(g, "--min-snr-gamma", dest="min_snr_gamma", type=float, help="min-SNR loss weighting γ (5 is usual)")
    add(g, "--seed", dest="seed", type=int, help="seed of everything random")
    add(g, "--device", dest="device", help="cpu or cuda (default: cuda if available)")

    g = p.add_argument_group("captions and images")
    add(g, "--shuffle-caption", dest="shuffle_caption", action=flag, help="shuffle the comma-separated tags")
    add(g, "--keep-tokens", dest="keep_tokens", type=int, help="tags at the front that never move or drop")
    add(g, "--caption-dropout", dest="caption_dropout_rate", type=float, help="train on no caption this often")
    add(g, "--caption-tag-dropout", dest="caption_tag_dropout_rate", type=float, help="drop each tag this often")
    add(g, "--flip-aug", dest="flip_aug", action=flag, help="mirror images at random (both sides encoded once)")

    g = p.add_argument_group("saving, samples and logs")
    add(g, "--save-every", dest="save_every", type=int, help="intermediate file + resume state every N steps")
    add(g, "--save-dtype", dest="save_dtype", choices=tuple(DTYPE_NAMES), help="dtype of the file")
    add(g, "--sample-every", dest="sample_every", type=int, help="sample images every N steps")
    add(g, "--sample-prompts", "--sample-prompt", dest="sample_prompts", metavar="FILE_OR_PROMPT",
        help="kohya prompt file (one a line: prompt --n negative --w 512 --h 512 --s 20 --l 7 --d 1) or one "
             "prompt; default: the first caption")
    add(g, "--sample-steps", dest="sample_steps", type=int, help="sampling steps when a prompt has no --s")
    add(g, "--resume", dest="resume", metavar="STATE", help="state folder of an earlier run (OUT-state); "
        "says what differs from the saved setup")
    add(g, "--log-with", dest="log_with", choices=TRACKERS[1:], help="log loss and lr per step")
    add(g, "--logging-dir", dest="logging_dir", help="default: OUT-logs")
    g.add_argument("--log-every", type=int, help="without a terminal, print a progress line every N steps "
                   "(default 10)")

    g = p.add_argument_group("metadata (written as modelspec.* / ss_*)")
    for name, help in (("title", "title"), ("author", "author"), ("description", "description"),
                       ("license", "licence"), ("tags", "comma-separated tags"),
                       ("trigger-words", "trigger words"), ("comment", "training comment")):
        add(g, f"--{name}", dest=name.replace("-", "_"), help=help)
    p.set_defaults(run=_train)


def _declare_ui(sub) -> None:
    p = sub.add_parser("ui", help="Merge and Inspect (and Train) in a browser",
                       description="The LoHa tabs the WebUI shows, as a standalone Gradio app "
                       "(pip install 'loha[ui]').")
    p.add_argument("--checkpoints", action="append", metavar="DIR", help="checkpoint folder (repeatable; default .)")
    p.add_argument("--networks", action="append", metavar="DIR", help="network folder (repeatable; default .)")
    p.add_argument("--output", default=".", metavar="DIR", help="where merges are written (default .)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's first free one)")
    p.set_defaults(run=_ui)


SUBCOMMANDS = (_declare_inspect, _declare_merge, _declare_demo, _declare_convert, _declare_train, _declare_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loha", description="LoHa (LyCORIS low-rank Hadamard) networks: "
                                     "inspect files, merge them into checkpoints, convert, train, run the demo.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for declare in SUBCOMMANDS:
        declare(sub)
    return parser


# --------------------------------------------------------------------------- running


def error_line(exc: LohaError) -> str:
    """What the CLI prints for a refused call: the message, and the flag that would accept it."""
    flag = OPTION_FLAGS.get(exc.option or "")
    return f"loha: {exc}" + (f" (pass {flag})" if flag else "")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds, so partial output files are removed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except LohaError as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    except OSError as exc:  # the disk or the folder, not the input (a full disk, a read-only folder)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"loha: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loha: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
