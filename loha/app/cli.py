"""The `loha` command line: every subcommand is declared here, each runs one library call.

    python -m loha inspect FILE [--json] [--against CHECKPOINT]
    python -m loha merge CHECKPOINT --loha FILE[:UNET[:TE]] [...] -o OUT [--dtype fp16|bf16|fp32]
                         [--device cpu|cuda] [--allow-unmatched] [--force]
    python -m loha demo [--out FOLDER]
    python -m loha convert SRC[:UNET[:TE]] [...] -o OUT --to lycoris|peft|lora [--rank R] [--base BASE]
    python -m loha train -o OUT [--model demo|DIFFUSERS_FOLDER|CHECKPOINT] [--data FOLDER] [...]
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
OPTION_FLAGS = {"overwrite": "--force", "allow_unmatched": "--allow-unmatched", "tokenizer": "--tokenizer FOLDER"}


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
    from ..train import SAMPLE_DATA, NetworkSpec, TrainConfig

    spec = NetworkSpec(preset=args.preset, rank=args.rank, alpha=args.alpha, conv_rank=args.conv_rank,
                       conv_alpha=args.conv_alpha, use_tucker=args.tucker, text_encoder=args.text_encoder)
    return TrainConfig(
        data=args.data or SAMPLE_DATA, output=args.out, model=args.model, tokenizer=args.tokenizer, vae=args.vae,
        network=spec, resolution=args.resolution, bucket_step=args.bucket_step, batch_size=args.batch_size,
        steps=args.steps, learning_rate=args.lr, text_encoder_lr=args.te_lr, lr_scheduler=args.scheduler,
        warmup_steps=args.warmup, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
        prediction_type=args.prediction, clip_skip=args.clip_skip, seed=args.seed, save_every=args.save_every,
        sample_every=args.sample_every, sample_prompt=args.sample_prompt, save_dtype=args.save_dtype,
        resume=args.resume, device=args.device)


def _train(args) -> int:
    from ..train import Callbacks, train

    every = max(1, args.log_every)

    def progress(step, total, loss, lr):  # called on the main process only
        if step % every == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}", flush=True)

    callbacks = Callbacks(progress=progress, log=lambda m: print(m, flush=True),
                          saved=lambda step, path: print(f"saved {path} (step {step})", flush=True),
                          sample=lambda step, images, path: print(f"samples {path}", flush=True))
    result = train(_train_config(args), callbacks)
    if result.losses and result.main:
        n = max(1, len(result.losses) // 10)
        first, last = sum(result.losses[:n]) / n, sum(result.losses[-n:]) / n
        print(f"done: {result.steps} steps in {result.seconds:.1f} s; mean loss first 10% {first:.4f}, "
              f"last 10% {last:.4f}", flush=True)
    return 0


def _ui(args) -> int:
    from .ui import Folders, build, missing_packages

    missing = missing_packages()
    if missing:
        raise LohaError(f"the UI needs {' and '.join(missing)}: pip install 'loha[ui]'")
    folders = Folders(checkpoints=args.checkpoints or ["."], networks=args.networks or ["."], output=args.output)
    build(folders).launch(server_name=args.host, server_port=args.port)
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
    from ..train.loop import MIXED_PRECISION, PREDICTION_TYPES, SCHEDULES
    from ..train.modules import PRESET_HELP

    p = sub.add_parser("train", help="train a LoHa on a folder of images", description=(
        "Train a LoHa on a folder of images (same-name .txt captions, N_name/ folders = N repeats) and write a "
        "LyCORIS/kohya .safetensors file. Runs out of the box on the demo model and the bundled sample images. "
        "Several processes: accelerate launch --num_processes N -m loha train …"))
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="demo",
                   help="'demo' (small SD1-architecture model, seeded), a diffusers folder (SD1.x/SD2.x/SDXL), "
                        "or an SD1.x/SD2.x/SDXL checkpoint")
    g.add_argument("--tokenizer", help="tokenizer folder for a checkpoint (vocab.json + merges.txt; for SDXL a "
                                       "folder with tokenizer/ and tokenizer_2/, e.g. a diffusers SDXL model)")
    g.add_argument("--vae", help="diffusers VAE folder (for a checkpoint without one)")
    g.add_argument("--data", help="image folder (default: the bundled sample images)")
    g.add_argument("-o", "--out", required=True, help="output .safetensors file")
    g.add_argument("--resolution", type=int, default=512, help="bucket area = resolution² (default 512)")
    g.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default 64)")

    g = p.add_argument_group("network")
    g.add_argument("--preset", default="attn-mlp", choices=list(PRESET_HELP),
                   help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    g.add_argument("--rank", type=int, default=8, help="linear rank (ss_network_dim)")
    g.add_argument("--alpha", type=float, default=4.0)
    g.add_argument("--conv-rank", type=int, default=4, help="rank of k×k convs (preset full)")
    g.add_argument("--conv-alpha", type=float, default=2.0)
    g.add_argument("--tucker", action="store_true", help="Tucker cores for k×k convs (use_tucker)")
    g.add_argument("--text-encoder", action="store_true", help="train the text encoder(s) too (SDXL: both)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=1, help="global batch, split over processes")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--te-lr", type=float, help="text-encoder learning rate (default --lr)")
    g.add_argument("--scheduler", default="constant", choices=SCHEDULES)
    g.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--mixed-precision", default="no", choices=list(MIXED_PRECISION))
    g.add_argument("--prediction", choices=PREDICTION_TYPES, help="default: the model's")
    g.add_argument("--clip-skip", type=int, default=1,
                   help="1 = the last layer (SD1/SD2), the penultimate one (SDXL); k skips k-1 more")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    g = p.add_argument_group("saving")
    g.add_argument("--save-every", type=int, default=0, help="intermediate file + resume state every N steps")
    g.add_argument("--save-dtype", default="fp32", choices=tuple(DTYPE_NAMES))
    g.add_argument("--sample-every", type=int, default=0, help="sample images every N steps")
    g.add_argument("--sample-prompt", default="", help="default: the first caption")
    g.add_argument("--resume", metavar="STATE", help="state folder of an earlier run (OUT-state)")
    g.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
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
