"""Time a forward pass with a LoHa applied in bypass: ours against the anchors, in one run.

    python bench/bypass.py            # SD1.5-size UNet at a 64×64 latent and its text encoder
    python bench/bypass.py --quick    # fewer rounds
    python bench/bypass.py --cpu-time # one thread, its CPU time (steadier on a shared machine)
    python bench/bypass.py --memory   # peak RSS of patch vs bypass, each in a fresh process
    python bench/bypass.py --tune     # the measurements behind the bypass numbers in tuning.py
    python bench/bypass.py --tune-tiles   # W' tile sizes against the plain layer
    python bench/bypass.py --cuda     # on a GPU, fp16 (the issue-17 targets printed)
    python bench/bypass.py --tune --cuda  # the fused Triton kernel's tiles on a GPU (tuning.TRITON_BYPASS_*)
    TRITON_INTERPRET=1 python bench/bypass.py --tiny [--tune --triton]   # the bench itself, checked on a CPU

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
The LoHa part of a method is its time minus the base's. On CUDA the models are fp16, each
method runs once before the timed rounds (Triton compiles, cuBLAS start-up) and every
timed span ends with torch.cuda.synchronize; linear layers then go through the fused
Triton kernel (`loha/kernels/triton_bypass.py`).

`--tiny` runs the same code on SD1.5's UNet structure and a CLIP at tiny widths
(`tests/tiny_models.py`) with few rounds: a check of the bench itself (`bench/gpu.sh` on
a machine without CUDA). `--tune --cuda` sweeps the fused kernel's tiles; with `--triton`
it does so on CPU tensors under TRITON_INTERPRET=1 (with `--tiny`: small shapes).
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
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # tiny_models

from _common import (  # noqa: E402
    SD15,
    kernel_median,
    lycoris_loha,
    median,
    move_factors,
    network_of,
    random_text_encoder,
    random_unet,
    timed_on,
)

import loha  # noqa: E402
from loha.models.configs import PUBLISHED  # noqa: E402


def inputs(unet, latent: int, seed: int = 0, device="cpu", dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, 4, latent, latent, generator=g).to(device, dtype),
            "timestep": torch.tensor([500], device=device),
            "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)}


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
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = torch.float16 if args.cuda else torch.float32
    reps = args.reps or (10 if args.cuda else 1 if args.tiny else 2 if args.quick else 3)
    clock = _one_thread_timer() if args.cpu_time else (lambda fn: timed_on(device, fn))
    unit, per_s = ("ms", 1e3) if args.cuda or args.tiny else ("s", 1.0)
    t0 = time.perf_counter()
    if args.tiny:
        from tiny_models import clip_text, sd1_unet

        unet, te, label = sd1_unet(), clip_text(), "tiny SD1.5-structured UNet + CLIP"
    else:
        unet, te, label = random_unet(SD15), random_text_encoder(PUBLISHED["sd1"]["text_encoder"]), "SD1.5 UNet + CLIP-L"
    latent = args.latent
    n_tokens = te.config.max_position_embeddings
    _, layers = lycoris_loha(unet, text_encoder=te)
    network = network_of(layers)
    if args.cuda:
        for part in (unet, te):
            part.to(device, dtype)
    move_factors(layers, device)
    parts = {"unet": unet, "text_encoder": te}
    unet_in = inputs(unet, latent, device=device, dtype=dtype)
    ids = torch.randint(0, te.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    where = (f"{torch.cuda.get_device_name()}, fp16" if args.cuda else
             f"CPU, fp32, {torch.get_num_threads()} threads{' (one thread CPU time)' if args.cpu_time else ''}")
    print(f"{label}: {len(layers)} LoHa layers, latent {latent}×{latent} (built in {time.perf_counter() - t0:.0f} s); "
          f"torch {torch.__version__}, {where}; load average {_load()}")

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
    if args.cuda or args.tiny:  # Triton compiles, cuBLAS start-up, first calls: not timed
        for part in parts:
            for fn in methods.values():
                fn(part)
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
        print(f"\n{part} forward ({'latent %d×%d' % (latent, latent) if part == 'unet' else '%d tokens' % n_tokens}), "
              f"medians of {reps} interleaved rounds; load average now {_load()}")
        print(f"{'method':<26}{unit:>9}{'vs base':>9}{'LoHa part':>12}   runs")
        for name, ts in times.items():
            extra = med[name] - b
            print(f"{name:<26}{med[name] * per_s:>9.3f}{med[name] / b:>8.2f}x{extra * per_s:>9.3f}{unit:<3}   "
                  f"{' '.join(f'{x * per_s:.2f}' for x in ts)}")
        ours, anchor = med["ours, bypass"] - b, med["rebuild ΔW each forward"] - b
        added, faster = 100 * ours / b, anchor / max(ours, 1e-9)
        print(f"bypass adds {added:+.1f} % to the base forward (target ≤ +10 %); its LoHa part is "
              f"{faster:.1f}× faster than rebuilding ΔW each forward (target ≥ 3×)")
        if args.cuda and part == "unet":
            print(f"  target (SD1.5 UNet fp16, CUDA): bypass adds ≤ +10 % to the forward: "
                  f"{'yes' if added <= 10 else 'NO'} ({added:+.1f} %)")
            print(f"  target (SD1.5 UNet fp16, CUDA): its LoHa part ≥ 3× faster than rebuilding ΔW each forward: "
                  f"{'yes' if faster >= 3 else 'NO'} ({faster:.1f}×)")
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


#: (what, tokens, out, in) of linear layers the bypass runs merged at one diffusion step with
#: CFG (batch 2): SD1.5 at a 64×64 latent, SDXL at 128×128 (attention levels 64², 32², 16²).
TRITON_SHAPES = [
    ("SD1.5 attn 64²", 8192, 320, 320),
    ("SD1.5 ff in 64²", 8192, 2560, 320),
    ("SD1.5 ff out 32²", 2048, 640, 2560),
    ("SD1.5 attn 16²", 512, 1280, 1280),
    ("SDXL attn 64²", 8192, 640, 640),
    ("SDXL attn 32²", 2048, 1280, 1280),
    ("SDXL ff in 32²", 2048, 10240, 1280),
]
#: (BLOCK_T, BLOCK_O, BLOCK_K) tried; one that does not fit a dtype on this GPU is reported and left out.
TRITON_TILES = [(64, 64, 32), (128, 64, 32), (64, 128, 32), (128, 128, 32), (64, 64, 64), (128, 128, 64)]


def tune_triton(args) -> None:
    """The fused bypass kernel's tiles (tuning.TRITON_BYPASS_BLOCK_T/O/K) in its merged form, the
    one the dispatch takes at these token counts, against the plain layer (cuBLAS), per dtype,
    each result checked against the patched layer's; and the values they suggest for tuning.py.
    On CUDA; with --triton on CPU tensors under TRITON_INTERPRET=1 (--tiny: small shapes, two
    tiles, a check of this code). Where the interpreter cannot run the kernel, it says so and
    times the CPU bypass (`forward_merged`) on the same shapes instead."""
    import numpy
    import triton

    from loha import delta as D
    from loha.kernels import triton_bypass as TB
    from loha.kernels import tuning

    dev = torch.device("cuda" if args.cuda else "cpu")
    if dev.type == "cpu" and not TB._interpreting():
        raise SystemExit("--tune --triton without CUDA needs TRITON_INTERPRET=1")
    where = torch.cuda.get_device_name() if args.cuda else "CPU tensors, Triton's interpreter"
    print(f"{where}; torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")
    shapes, tiles, rank, reps = TRITON_SHAPES, TRITON_TILES, 16, 10
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if args.tiny:
        shapes, tiles, rank, reps = [("tiny a", 32, 48, 64), ("tiny b", 20, 32, 40)], [(16, 16, 16), (32, 32, 16)], 4, 1
        dtypes = (torch.float16,)
    now = (tuning.TRITON_BYPASS_BLOCK_T, tuning.TRITON_BYPASS_BLOCK_O, tuning.TRITON_BYPASS_BLOCK_K)
    tiles = list(dict.fromkeys([now, *tiles])) if not args.tiny else tiles
    g = torch.Generator().manual_seed(0)

    def case(o, k, t, dtype):
        f = [(torch.randn(*s, generator=g) * 0.1).to(dev) for s in ((o, rank), (rank, k), (o, rank), (rank, k))]
        w = (torch.randn(o, k, generator=g) * 0.02).to(dev, dtype)
        x = torch.randn(t, k, generator=g).to(dev, dtype)
        patched = (w.float() + 0.5 * D.hadamard_delta(*f)).to(dtype)
        return x, w, f, patched

    if dev.type == "cpu":
        try:
            x, w, f, _ = case(16, 16, 16, torch.float16)
            TB.linear_merged(x, w, None, *f, 0.5, block_t=16, block_o=16, block_k=16, num_warps=1)
        except Exception as e:  # noqa: BLE001 — whatever the interpreter raises, said and worked around
            print(f"Triton's interpreter cannot run the bypass kernel here ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''}); timing the CPU bypass "
                  f"(kernels.bypass.forward_merged) on the same shapes instead")
            _time_cpu_bypass(shapes, rank, dtypes, case, reps)
            return

    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-5}
    score: dict = {}  # tile -> {dtype: its time over that dtype's fastest tile's}
    for dtype in dtypes:
        cases = [case(o, k, t, dtype) for _, t, o, k in shapes]
        plain = [kernel_median(lambda c=c: F.linear(c[0], c[1]), dev, reps) for c in cases]
        print(f"\n{str(dtype)[6:]}, rank {rank}: the plain layers {sum(plain) * 1e3:.3f} ms over {len(shapes)} shapes "
              f"({', '.join(f'{n} {t}×{o}×{k}' for n, t, o, k in shapes)})")
        totals = {}
        for tile in tiles:
            blocks = dict(block_t=tile[0], block_o=tile[1], block_k=tile[2])
            try:
                ts, worst = [], 0.0
                for x, w, f, patched in cases:
                    ts.append(kernel_median(lambda: TB.linear_merged(x, w, None, *f, 0.5, **blocks), dev, reps))
                    want = F.linear(x.float(), patched.float())
                    got = TB.linear_merged(x, w, None, *f, 0.5, **blocks).float()
                    worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            except Exception as e:  # noqa: BLE001 — a tile too big for this GPU (out of resources)
                print(f"  {'×'.join(map(str, tile))}: does not fit ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            wrong = worst > 4 * ulp[dtype]
            per = " ".join(f"{a / b:.2f}" for a, b in zip(ts, plain))
            print(f"  {'×'.join(map(str, tile))}: {sum(ts) * 1e3:.3f} ms, {sum(ts) / sum(plain):.2f}× the plain layers "
                  f"(per shape {per}); max error {worst:.1e} of the output{'  WRONG' if wrong else ''}")
            if not wrong:
                totals[tile] = sum(ts)
        if not totals:
            print("  no tile ran correctly")
            continue
        best = min(totals, key=totals.get)
        for tile, t in totals.items():
            score.setdefault(tile, {})[dtype] = t / totals[best]
        print(f"  fastest: {'×'.join(map(str, best))}" + (f" ({totals[now] / totals[best]:.2f}× faster than the current "
              f"{'×'.join(map(str, now))})" if now in totals else ""))
        del cases
    complete = [c for c in score if len(score[c]) == len(dtypes)]
    if not complete:
        print("\nno tile ran correctly in every dtype: nothing to suggest")
        return
    best = min(complete, key=lambda c: sum(score[c].values()))

    def rel(c):
        return f"{'×'.join(map(str, c))} (" + ", ".join(f"{str(d)[6:]} {score[c][d]:.2f}" for d in dtypes) + \
            " × each dtype's fastest)"

    print("\nsuggested for loha/kernels/tuning.py (one tile for every dtype: the least summed time over each "
          "dtype's fastest):")
    print(f"  now:     {rel(now) if now in complete else '×'.join(map(str, now)) + ' (not timed)'}")
    print(f"  fastest: {rel(best)}")
    print(f"  TRITON_BYPASS_BLOCK_T = {best[0]}\n  TRITON_BYPASS_BLOCK_O = {best[1]}\n  TRITON_BYPASS_BLOCK_K = {best[2]}")


def _time_cpu_bypass(shapes, rank, dtypes, case, reps) -> None:
    """The CPU bypass's merged form against the plain layer on the sweep's shapes (the interpreter's stand-in)."""
    from loha import kernels
    from loha.kernels import bypass as B

    for dtype in dtypes:
        for name, t, o, k in shapes:
            x, w, f, patched = case(o, k, t, dtype)
            step = kernels.step(kernels.HADAMARD, f, 0.5, 1.0, (o, k), "cpu")
            plain = kernel_median(lambda: F.linear(x, w), "cpu", reps)
            merged = kernel_median(lambda: B.forward_merged(x, w, None, [step]), "cpu", reps)
            err = float((B.forward_merged(x, w, None, [step]).float() - F.linear(x.float(), patched.float())).abs().max())
            print(f"  {str(dtype)[6:]} {name} {t}×{o}×{k}: plain {plain * 1e3:.3f} ms, CPU bypass {merged * 1e3:.3f} ms "
                  f"({merged / plain:.2f}×), max |Δ| from the patched layer {err:.1e}")


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
    p.add_argument("--latent", type=int, help="latent size (default 64: a 512×512 image; --tiny 8)")
    p.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    p.add_argument("--memory", action="store_true", help="peak RSS of patch vs bypass instead")
    p.add_argument("--memory-child", choices=("base", "patch", "bypass"), help=argparse.SUPPRESS)
    p.add_argument("--tune", action="store_true", help="measure the dispatch ratio instead")
    p.add_argument("--tune-tiles", action="store_true", help="measure W' tile sizes instead")
    p.add_argument("--cuda", action="store_true", help="on CUDA, fp16; with --tune: the fused Triton kernel's tiles")
    p.add_argument("--triton", action="store_true", help="with --tune: the Triton tiles on CPU tensors (TRITON_INTERPRET=1)")
    p.add_argument("--tiny", action="store_true", help="SD1.5's structure at tiny widths, few rounds: checks the bench")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: this torch sees no CUDA device")
    if args.cuda and args.cpu_time:
        raise SystemExit("--cpu-time times the CPU; it does not go with --cuda")
    if args.latent is None:
        args.latent = 8 if args.tiny else 64
    if args.memory_child:
        memory_child(args.memory_child, args.latent)
    elif args.memory:
        memory(args)
    elif args.tune:
        tune_triton(args) if args.cuda or args.triton else tune(args)
    elif args.tune_tiles:
        tune_tiles(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
