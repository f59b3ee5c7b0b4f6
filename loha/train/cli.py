"""`python -m loha train …`: the trainer's command line (`add_train_parser` plugs it
into `loha.cli`; `main` runs it alone, which is what ``accelerate launch -m
loha.train.cli …`` does on several processes)."""

from __future__ import annotations

import argparse
import sys

from ..errors import LohaError

DESCRIPTION = ("Train a LoHa on a folder of images (same-name .txt captions, N_name/ folders = N repeats) "
               "and write a LyCORIS/kohya .safetensors file. Runs out of the box on the demo model and "
               "the bundled sample images. Several processes: accelerate launch --num_processes N -m "
               "loha.train.cli …")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .loop import DTYPES, PREDICTION_TYPES, SCHEDULES
    from .modules import PRESET_HELP

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
    g.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    g.add_argument("--prediction", choices=PREDICTION_TYPES, help="default: the model's")
    g.add_argument("--clip-skip", type=int, default=1,
                   help="1 = the last layer (SD1/SD2), the penultimate one (SDXL); k skips k-1 more")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    g = p.add_argument_group("saving")
    g.add_argument("--save-every", type=int, default=0, help="intermediate file + resume state every N steps")
    g.add_argument("--save-dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    g.add_argument("--sample-every", type=int, default=0, help="sample images every N steps")
    g.add_argument("--sample-prompt", default="", help="default: the first caption")
    g.add_argument("--resume", metavar="STATE", help="state folder of an earlier run (OUT-state)")
    g.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")


def config_from_args(args):
    from . import SAMPLE_DATA
    from .loop import TrainConfig
    from .modules import NetworkSpec

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


def run(args) -> int:
    from .loop import Callbacks, train

    every = max(1, args.log_every)

    def progress(step, total, loss, lr):  # called on the main process only
        if step % every == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}", flush=True)

    callbacks = Callbacks(progress=progress, log=lambda m: print(m, flush=True),
                          saved=lambda step, path: print(f"saved {path} (step {step})", flush=True),
                          sample=lambda step, images, path: print(f"samples {path}", flush=True))
    result = train(config_from_args(args), callbacks)
    if result.losses and result.main:
        n = max(1, len(result.losses) // 10)
        first, last = sum(result.losses[:n]) / n, sum(result.losses[-n:]) / n
        print(f"done: {result.steps} steps in {result.seconds:.1f} s; mean loss first 10% {first:.4f}, "
              f"last 10% {last:.4f}", flush=True)
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` to `loha`'s subcommands."""
    p = subparsers.add_parser("train", help="train a LoHa on a folder of images", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loha train", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LohaError as exc:
        print(f"loha: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
