"""Time a forward pass with a LoHa applied in bypass: ours against the anchors, in one run.

    python bench/bypass.py            # SD1.5-size UNet at a 64×64 latent and its text encoder
    python bench/bypass.py --quick    # fewer rounds
    python bench/bypass.py --cpu-time # one thread, its CPU time (steadier on a shared machine)
    python bench/bypass.py --memory   # peak RSS of patch vs bypass, each in a fresh process
    python bench/bypass.py --tune     # the measurements behind the bypass numbers in tuning.py
    python bench/bypass.py --tune-tiles   # W' tile sizes against the plain layer

Everything is built here from seeds (diffusers UNet2DConditionModel and transformers
CLIPTextModel with the SD1.5 numbers, random weights; a LyCORIS LoHa over every layer
of both: linear and 1×1 rank 16, k×k conv rank 8). Nothing is downloaded.

Each round runs every method once, in turn (interleaved); the table shows medians:
- base: the model as it is;
- ours, bypass: `loha.bypass` (the handle is made once; between its rounds it is
  switched off, so the other methods run the plain layers);
- rebuild ΔW each forward: what upstream ComfyUI's bypass adapters (weight_adapter
  `h()`, "LoHa bypass mode is inefficient") and LyCORIS's `bypass_forward_diff` do:
  per layer and per call, ΔW = (w1a@w1b)⊙(w2a@w2b)·scale formed whole, and the layer's
  output plus x·ΔW (forward hooks written here, doing their math, not their code);
- patched: `loha.apply` before the round (not timed), `restore` after.
The LoHa part of a method is its time minus the base's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SD15, lycoris_loha, median, network_of, random_text_encoder, random_unet, timed  # noqa: E402

import loha  # noqa: E402
from loha.models.configs import PUBLISHED  # noqa: E402


def inputs(unet, latent: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, 4, latent, latent, generator=g), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)}


class Rebuild:
    """Forward hooks adding x·ΔW to each layer's output, ΔW formed whole at every call."""

    def __init__(self, layers):
        self.layers = layers
        self.handles = []

    def __enter__(self):
        for l in self.layers:
            self.handles.append(l.module.register_forward_hook(self._hook(l)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    @staticmethod
    def _hook(l):
        def hook(module, args, output):
            x = args[0]
            diff = ((l.a1 @ l.b1) * (l.a2 @ l.b2) * l.scale).reshape(module.weight.shape).to(x.dtype)
            if isinstance(module, torch.nn.Conv2d):
                return output + F.conv2d(x, diff, None, module.stride, module.padding, module.dilation, module.groups)
            return output + F.linear(x, diff)

        return hook


def run(args) -> None:
    torch.manual_seed(0)
    reps = args.reps or (2 if args.quick else 3)
    clock = _one_thread_timer() if args.cpu_time else timed
    t0 = time.perf_counter()
    unet = random_unet(SD15)
    te = random_text_encoder(PUBLISHED["sd1"]["text_encoder"])
    _, layers = lycoris_loha(unet, text_encoder=te)
    network = network_of(layers)
    parts = {"unet": unet, "text_encoder": te}
    unet_in = inputs(unet, args.latent)
    ids = torch.randint(0, te.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(1))
    print(f"SD1.5 UNet + CLIP-L: {len(layers)} LoHa layers, latent {args.latent}×{args.latent} "
          f"(built in {time.perf_counter() - t0:.0f} s); torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{' (one thread CPU time)' if args.cpu_time else ''}; load average {_load()}")

    handle = loha.bypass(parts, network)
    assert not handle.unmatched, handle.unmatched
    handle.enabled = False

    def forward(part):
        with torch.no_grad():
            if part == "unet":
                return unet(**unet_in).sample
            return te(ids).last_hidden_state

    def base(part):
        forward(part)

    def bypass(part):
        handle.enabled = True
        try:
            forward(part)
        finally:
            handle.enabled = False

    def rebuild(part):
        with Rebuild(layers):
            forward(part)

    def patched(part):
        patch = loha.apply(parts, network)
        try:
            return clock(lambda: forward(part))
        finally:
            patch.restore()

    methods = {"base": base, "ours, bypass": bypass, "rebuild ΔW each forward": rebuild, "patched": patched}
    # the outputs agree (a check, not timed)
    with torch.no_grad():
        patch = loha.apply(parts, network)
        want = forward("unet")
        patch.restore()
        handle.enabled = True
        got = forward("unet")
        handle.enabled = False
        print(f"bypass vs patched UNet output: max |Δ| {float((got - want).abs().max()):.2e} "
              f"(outputs up to {float(want.abs().max()):.2f})")
    for part in ("unet", "text_encoder"):
        times = {m: [] for m in methods}
        for _ in range(reps):
            for name, fn in methods.items():
                t = fn(part) if name == "patched" else clock(lambda fn=fn: fn(part))
                times[name].append(t)
        med = {m: median(ts) for m, ts in times.items()}
        b = med["base"]
        print(f"\n{part} forward ({'latent %d×%d' % (args.latent, args.latent) if part == 'unet' else '77 tokens'}), "
              f"medians of {reps} interleaved rounds; load average now {_load()}")
        print(f"{'method':<26}{'seconds':>9}{'vs base':>9}{'LoHa part':>11}   runs")
        for name, ts in times.items():
            extra = med[name] - b
            print(f"{name:<26}{med[name]:>9.3f}{med[name] / b:>8.2f}x{extra:>10.3f}s   {' '.join(f'{x:.2f}' for x in ts)}")
        ours, anchor = med["ours, bypass"] - b, med["rebuild ΔW each forward"] - b
        print(f"bypass adds {100 * ours / b:+.1f} % to the base forward (target ≤ +10 %); its LoHa part is "
              f"{anchor / max(ours, 1e-9):.1f}× faster than rebuilding ΔW each forward (target ≥ 3×)")
    handle.remove()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


# ---- memory --------------------------------------------------------------------------------


def memory(args) -> None:
    """Peak RSS of the model alone, patched, and bypassed, each in a fresh process (one forward each)."""
    rows = {}
    for mode in ("base", "patch", "bypass"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", mode, "--latent", str(args.latent)],
                              capture_output=True, text=True, check=True)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"SD1.5 UNet (fp32), full LoHa, one forward at a {args.latent}×{args.latent} latent; peak RSS per process:")
    print(f"{'mode':<8}{'model GB':>10}{'after apply GB':>16}{'peak GB':>10}")
    for mode, r in rows.items():
        print(f"{mode:<8}{r['model'] / 2**30:>10.2f}{r['applied'] / 2**30:>16.2f}{r['peak'] / 2**30:>10.2f}")
    print(f"factors: {rows['bypass']['factors'] / 2**20:.0f} MiB; patch holds {(rows['patch']['applied'] - rows['base']['applied']) / 2**30:.2f} GB more "
          f"than the model, bypass {(rows['bypass']['applied'] - rows['base']['applied']) / 2**30:.2f} GB")


def memory_child(mode: str, latent: int) -> None:
    torch.manual_seed(0)
    unet = random_unet(SD15)
    _, layers = lycoris_loha(unet)
    network = network_of(layers)
    factors = sum(t.numel() * t.element_size() for m in network.modules.values() for t in network.tensors(m).values())
    del layers
    import gc

    gc.collect()
    model = _rss()
    if mode == "patch":
        handle = loha.apply({"unet": unet}, network)
    elif mode == "bypass":
        handle = loha.bypass({"unet": unet}, network)
    applied = _rss()
    with torch.no_grad():
        unet(**inputs(unet, latent))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mode != "base":
        handle.restore()
    print(json.dumps({"model": model, "applied": applied, "peak": peak, "factors": factors}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- tuning ------------------------------------------------------------------------------------


def tune(args) -> None:
    """What building W' costs per element, in multiply-adds of the layer's own GEMM.

    The merged form's extra time over the plain layer, per element of W, against the
    plain layer's time per multiply-add: the ratio tuning.BYPASS_BUILD_MACS_PER_ELEMENT holds.
    One thread, its CPU time (steadier than the wall clock when other processes share the
    machine); both sides scale alike with threads.
    """
    from loha import kernels
    from loha.kernels import bypass as B

    timed = _one_thread_timer()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread (its CPU time); load average {_load()}")
    ratios = []
    for o, k, r, t in ((320, 320, 16, 4096), (1280, 1280, 16, 256), (1280, 11520, 8, 256), (640, 5760, 8, 1024)):
        w = torch.randn(o, k, generator=g) * 0.02
        f = [torch.randn(*s, generator=g) * 0.05 for s in ((o, r), (r, k), (o, r), (r, k))]
        step = kernels.step(kernels.HADAMARD, f, 1.0, 1.0, (o, k), "cpu")
        x = torch.randn(t, k, generator=g)
        plain, merged = [], []
        for _ in range(7):  # interleaved
            plain.append(timed(lambda: F.linear(x, w)))
            merged.append(timed(lambda: B.forward_merged(x, w, None, [step])))
        per_mac = median(plain) / (t * o * k)
        per_element = max(0.0, median(merged) - median(plain)) / (o * k)
        ratios.append(per_element / per_mac)
        print(f"  W {o}×{k} rank {r}, {t} tokens: plain {median(plain) * 1e3:.1f} ms, merged {median(merged) * 1e3:.1f} ms: "
              f"building W' {per_element * 1e9:.2f} ns/element, GEMM {per_mac * 1e12:.1f} ps/MAC -> {ratios[-1]:.0f} MACs per element")
    print(f"median: {median(ratios):.0f} MACs per element built (tuning.BYPASS_BUILD_MACS_PER_ELEMENT['cpu'])")


def tune_tiles(args) -> None:
    """W' tile sizes: the merged form's time against the plain layer's (one thread's CPU time)."""
    from loha import kernels
    from loha.kernels import bypass as B
    from loha.kernels import tuning

    timed = _one_thread_timer()
    g = torch.Generator().manual_seed(0)
    sizes = (19, 21, 23, 25)
    print(f"one thread, ms: plain layer / tiles of {', '.join(f'2^{s}' for s in sizes)}")
    for o, k, r, t in ((640, 5760, 8, 1024), (1280, 11520, 8, 256), (1280, 1280, 16, 1024)):
        w = torch.randn(o, k, generator=g) * 0.02
        f = [torch.randn(*s, generator=g) * 0.05 for s in ((o, r), (r, k), (o, r), (r, k))]
        step = kernels.step(kernels.HADAMARD, f, 1.0, 1.0, (o, k), "cpu")
        x = torch.randn(t, k, generator=g)
        res: dict = {"plain": []}
        for _ in range(5):  # interleaved
            res["plain"].append(timed(lambda: F.linear(x, w)))
            for size in sizes:
                tuning.BYPASS_TILE_ELEMS = 1 << size
                res.setdefault(size, []).append(timed(lambda: B.forward_merged(x, w, None, [step])))
        line = ", ".join(f"{median(v) * 1e3:.1f}" for key, v in res.items() if key != "plain")
        print(f"  {o}×{k} at {t} tokens: {median(res['plain']) * 1e3:.1f} / {line}")


def _one_thread_timer():
    """torch on one thread, and a timer of this thread's CPU time (steadier on a shared machine)."""
    torch.set_num_threads(1)

    def timed(fn):
        start = time.thread_time()
        fn()
        return time.thread_time() - start

    return timed


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--reps", type=int, default=0, help="rounds (default 3, --quick 2)")
    p.add_argument("--latent", type=int, default=64, help="latent size (64: a 512×512 image)")
    p.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    p.add_argument("--memory", action="store_true", help="peak RSS of patch vs bypass instead")
    p.add_argument("--memory-child", choices=("base", "patch", "bypass"), help=argparse.SUPPRESS)
    p.add_argument("--tune", action="store_true", help="measure the dispatch ratio instead")
    p.add_argument("--tune-tiles", action="store_true", help="measure W' tile sizes instead")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.memory_child:
        memory_child(args.memory_child, args.latent)
    elif args.memory:
        memory(args)
    elif args.tune:
        tune(args)
    elif args.tune_tiles:
        tune_tiles(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
