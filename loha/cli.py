"""The `loha` command line: inspect, merge, demo.

    python -m loha inspect FILE [--json] [--against CHECKPOINT]
    python -m loha merge CHECKPOINT --loha FILE[:UNET[:TE]] [...] -o OUT [--dtype fp16|bf16|fp32]
                         [--device cpu|cuda] [--allow-unmatched] [--force]
    python -m loha demo [--out FOLDER]
    python -m loha convert SRC[:UNET[:TE]] [...] -o OUT --to lycoris|peft|lora [--rank R] [--base BASE]
    python -m loha train -o OUT [--model demo|DIFFUSERS_FOLDER|CHECKPOINT] [--data FOLDER] [...]
    python -m loha ui [--checkpoints DIR] [--networks DIR] [--output DIR] [--port N]

Errors print as ``loha: <message>`` on stderr, without a traceback, and exit 1;
usage errors exit 2; an interrupt exits 130 (after removing any partial output).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from .errors import LohaError


def _inspect(args) -> int:
    from .format import load
    from .inspect import against, render, summarize

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
    from .merge import merge, uses_from_specs

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loha", description="LoHa (LyCORIS low-rank Hadamard) networks: "
                                     "inspect files, merge them into checkpoints, run the demo.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="what a network file holds", description="Family, parts, ranks, alphas, "
                       "Tucker/DoRA, dtypes, training metadata of a network file.")
    p.add_argument("file", help="network file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--against", metavar="CHECKPOINT",
                   help="also list the names that match no weight of this checkpoint (exit 1 if any)")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("merge", help="bake networks into a checkpoint",
                       description="Merge networks into a checkpoint, tensor by tensor, into a new safetensors file.")
    p.add_argument("checkpoint", help="checkpoint (.safetensors; a .ckpt is loaded whole, weights only)")
    p.add_argument("--loha", action="append", required=True, metavar="FILE[:UNET[:TE]]",
                   help="network and its strengths (default 1; TE defaults to UNET); repeat for several")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (written only when complete)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                   help="dtype of every floating tensor of the output (default: keep each tensor's)")
    p.add_argument("--device", default="cpu", help="where ΔW is computed and added: cpu (default) or cuda")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="merge even if some network names match no weight (they are listed)")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists (never the input)")
    p.set_defaults(run=_merge)

    p = sub.add_parser("demo", help="the whole job on a small built-in model",
                       description="Build a small SD1-architecture checkpoint and a LoHa, merge, patch, "
                       "check they agree, and draw the effect. Needs diffusers and transformers.")
    p.add_argument("--out", default="loha-demo", help="folder for its files (default ./loha-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo)

    from .convert import add_convert_parser

    add_convert_parser(sub)
    from .train.cli import add_train_parser

    add_train_parser(sub)
    from .ui import add_ui_parser

    add_ui_parser(sub)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds, so partial output files are removed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except LohaError as exc:
        print(f"loha: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loha: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
