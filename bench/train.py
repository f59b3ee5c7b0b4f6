"""Training step time and memory: our LoHa trainer against lycoris-lora's LoHa.

Both run inside the same loop (`loha.train.Trainer`: same model, same cached latents,
same batches, noise, timesteps, AdamW, clipping); only the LoHa modules differ: ours
(ΔW autograd that keeps only the factors and the layer input) or lycoris-lora 4.1.3's
LohaModule (its default, non-bypass forward), on the same preset and ranks. Each
contender runs in its own process, so neither sees the other's memory high-water.

Memory is measured two ways: the bytes autograd keeps between forward and backward
(tensors saved for backward, model weights excluded; exact and repeatable), and the
peak resident memory from the first step on over the resident memory before it
(sampled every 2 ms; what the OS sees, allocator noise included). With CUDA, the
peak of torch.cuda.max_memory_allocated over the steps.

    python bench/train.py                       # demo model, 128 px, batch 2, rank 8
    python bench/train.py --model sd15 --resolution 512 --batch 1   # SD1.5's UNet sizes
    python bench/train.py --model sdxl --resolution 1024 --batch 1 --mixed-precision bf16 --gradient-checkpointing

Timings on a shared machine swing with its load, so each contender runs `--rounds`
times, alternating, and the fastest round's median counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    def __init__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _saved_bytes(trainer) -> int:
    """Bytes of the tensors autograd saves for backward in one step (weights excluded)."""
    persistent = {p.untyped_storage().data_ptr() for m in trainer.base.parts().values()
                  for p in list(m.parameters()) + list(m.buffers())}
    persistent |= {p.untyped_storage().data_ptr() for p in trainer.params}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in persistent:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._loss(0).backward()
    trainer.optimizer.zero_grad(set_to_none=False)
    return sum(seen.values())


#: lycoris-lora presets (as preset files) that select exactly our presets' layers: its
#: built-in attn-mlp also wraps the time embedding, and its "full" names it twice.
LYCORIS_PRESETS = {
    "attn-mlp": 'enable_conv = false\nunet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n',
    "full": ('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", '
             '"Upsample2D", "TimestepEmbedding"]\nunet_target_name = ["conv_in", "conv_out"]\n'),
}


def _use_lycoris(trainer, args) -> int:
    """Swap our modules for lycoris-lora's on the same model; returns its module count."""
    import logging
    import tempfile

    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    trainer.network.detach()
    base = trainer.base
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(LYCORIS_PRESETS[args.preset] + "text_encoder_target_module = []\ntext_encoder_target_name = []\n")
    try:
        net = create_network(1.0, args.rank, args.alpha, None, base.text_encoder, base.unet, algo="loha",
                             conv_dim=args.conv_rank, conv_alpha=args.conv_alpha, preset=f.name)
    finally:
        os.unlink(f.name)
    net.apply_to(base.text_encoder, base.unet, False, True)
    net.to(trainer.device)
    trainer.params = [p for p in net.parameters() if p.requires_grad]
    _reset_optimizer(trainer)
    trainer.lycoris = net
    return len(net.unet_loras)


def _reset_optimizer(trainer):
    from loha.train.optim import make_optimizer, make_scheduler

    c = trainer.config
    trainer.optimizer = make_optimizer(c.optimizer, [{"params": trainer.params, "lr": c.learning_rate}],
                                       c.weight_decay, c.optimizer_args)
    trainer.scheduler = make_scheduler(c.lr_scheduler, trainer.optimizer, c.warmup_steps, trainer.total)


def _base(name: str, dtype=torch.float32):
    """The demo model; the same with SD1.5's full-size UNet; or SDXL's full-size UNet with
    one-layer CLIP-L- and OpenCLIP-G-wide text encoders (2048-wide context, 1280 pooled) and the
    demo's VAE (seeded random weights: the UNet is what a step's time and memory are about)."""
    from loha.train.models import SDXLModel, demo_model

    base = demo_model(0)
    if name == "sd15":
        from _common import SD15, random_unet

        base.unet = random_unet(SD15, dtype)
        base.name = "random-sd15-unet"
    elif name == "sdxl":
        from _common import SDXL, random_unet
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        small = dict(vocab_size=1000, max_position_embeddings=77, num_hidden_layers=1, intermediate_size=1024)
        torch.manual_seed(1)
        te1 = CLIPTextModel(CLIPTextConfig(**small, hidden_size=768, num_attention_heads=12)).eval()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**small, hidden_size=1280, num_attention_heads=20,
                                                         projection_dim=1280)).eval()
        base = SDXLModel(random_unet(SDXL, dtype), te1, base.vae, base.tokenizer, "sdxl", "random-sdxl-unet",
                         text_encoder_2=te2, tokenizer_2=base.tokenizer)
    return base


def contender(args) -> dict:
    from loha.train import SAMPLE_DATA, NetworkSpec, TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    spec = NetworkSpec(preset=args.preset, rank=args.rank, alpha=args.alpha, conv_rank=args.conv_rank,
                       conv_alpha=args.conv_alpha)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(data=SAMPLE_DATA, output=os.devnull + ".safetensors", network=spec,
                         resolution=args.resolution, batch_size=args.batch, steps=args.steps + args.warmup,
                         learning_rate=1e-3, seed=0, device=device, mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing)
    # built in the dtype it trains in: SDXL's UNet is 10 GB in fp32
    trainer = Trainer(config, base=_base(args.model, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.mixed_precision, torch.float32)))
    trainer._prepare()
    modules = sum(trainer.network.counts().values())
    if args.which == "lycoris":
        modules = _use_lycoris(trainer, args)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    times, losses = [], []
    before = _rss()  # the allocator keeps what a step freed, so the peak counts from the first step
    with _PeakRss() as peak:
        saved = _saved_bytes(trainer)
        for _ in range(args.warmup):
            trainer._train_step()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(trainer._train_step())
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"which": args.which, "modules": modules, "step_s": statistics.median(times), "steps": times,
           "saved_mb": saved / 2**20, "rss_peak_mb": (peak.peak - before) / 2**20, "losses": losses}
    if cuda:
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - start_alloc) / 2**20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", choices=("demo", "sd15", "sdxl"))
    p.add_argument("--rounds", type=int, default=2, help="runs per contender, alternating (fastest counts)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default="attn-mlp", choices=("attn-mlp", "full"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--conv-rank", type=int, default=4)
    p.add_argument("--conv-alpha", type=float, default=2.0)
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device")
    p.add_argument("--which", choices=("ours", "lycoris"), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.which:
        print(json.dumps(contender(args)))
        return 0
    results = {}
    for _ in range(args.rounds):
        for which in ("ours", "lycoris"):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--which", which]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            run = json.loads(done.stdout.strip().splitlines()[-1])
            if which not in results or run["step_s"] < results[which]["step_s"]:
                results[which] = run
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    ours, theirs = results["ours"], results["lycoris"]
    print(f"{args.model} model, {args.resolution} px, batch {args.batch}, preset {args.preset}, "
          f"rank {args.rank}, {args.mixed_precision} precision, {args.threads} threads, "
          f"{ours['modules']} vs {theirs['modules']} modules")
    rows = [("step time (median s)", "step_s"), ("saved for backward (MB)", "saved_mb"),
            ("peak RSS over pre-training (MB)", "rss_peak_mb")]
    if "cuda_peak_mb" in ours:
        rows.append(("CUDA peak over start (MB)", "cuda_peak_mb"))
    print(f"{'':28} {'loha':>10} {'lycoris':>10} {'loha/lycoris':>13}")
    for label, key in rows:
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        print(f"{label:28} {ours[key]:10.3f} {theirs[key]:10.3f} {ratio:13.3f}")
    if ours["modules"] != theirs["modules"]:
        print("warning: the two networks wrap different numbers of layers")
    print("same model, cached latents, batches, noise, timesteps and AdamW; the initial factors are each "
          "library's own draw, so the losses differ slightly")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
