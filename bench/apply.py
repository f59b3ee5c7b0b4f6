"""Time applying a full LoHa to a whole UNet: ours against the anchors, in one run.

    python bench/apply.py            # SD1.5-size UNet, fp32 and fp16 weights (~5 min on 2 cores)
    python bench/apply.py --quick    # fewer repetitions
    python bench/apply.py --sdxl     # SDXL-size UNet (fp16 weights unless --dtypes says otherwise)
    python bench/apply.py --tune     # the measurements behind loha/kernels/tuning.py
    python bench/apply.py --family sd3.5-medium   # a diffusion transformer in its checkpoint layout
    python bench/apply.py --sdxl --cuda           # on a GPU, against the HBM floor and LyCORIS's Triton kernel
    python bench/apply.py --tune --cuda           # the Triton tiles and the Khatri–Rao crossover on a GPU
    TRITON_INTERPRET=1 python bench/apply.py --tiny --triton [--tune]   # the bench itself, checked on a CPU

Everything is built here from seeds (diffusers UNet2DConditionModel with the SD1.5 or
SDXL numbers, random weights; a LyCORIS LoHa over every targetable layer: linear and
1×1 rank 16, conv rank 8, hada_w2_a randomised so ΔW ≠ 0). Nothing is downloaded.

Each repetition runs every method once, in turn (interleaved); the table shows medians.
Ours is timed as the kernel alone, and as users meet it: the whole `loha.apply` +
`restore` (planning, checks, keeping the originals, patching, putting them back) as it
runs again and again (the memory `restore` keeps is reused), the same cold (after
`loha.release_memory()`: fresh memory, whose page faults cost more than the kernel), and
a re-patch (`handle.reapply`: what a change of strengths or networks costs while patched). A second table does the same for a DoRA LoHa of the same shape.
The anchors are short functions written here that do what each tool's merge does
(their math and their copies), not their code:
- ComfyUI: per module, back up the weight, an fp32 copy of it, two fp32 matmuls,
  product, scale, cast to the weight dtype, add, store;
- WebUI (network_hada): per module, rebuild both products, multiply, scale, add to an
  fp32 copy of the weight and copy back (its backup is taken once and kept);
- LyCORIS 4.1.3: its own modules' `merge_to` (which applies alpha/rank twice: a bug we
  do not copy; timed anyway); on CUDA also its Triton `loha_merge` kernel;
- PEFT: `LoHaConfig` on the same UNet (factors copied from the LyCORIS ones), each
  LoHa layer's `merge()` — what `merge_adapter()` runs (timed after the others: its
  layers rename the model's modules);
- ComfyUI, DoRA: per module as above, then `weight_decompose` (the norm of the weight,
  W0+ΔW scaled by dora_scale / norm) — what its LoHa adapter runs for a DoRA file.
- Khatri–Rao `addmm_` (GPU and --tiny): one GEMM per layer on the exact rank-R1·R2 pair
  (`loha.delta.khatri_rao`/`face_split`) through our row tiles: the form the dispatch takes
  at tiny rank products.
The floors: bytes of W read and written over the measured streaming bandwidth, and the
matmul FLOPs 2·2·O·K·R over the measured fp32 square-matmul rate. On CUDA the floor is the
HBM one alone (the products run on tensor cores), the measured copy bandwidth of a 1 GiB
buffer; ours is grouped Triton launches there, and each method runs once before the timed
rounds (compiles, LyCORIS's own kernel tuning, cuBLAS start-up).

`--tiny` runs the same code on SDXL's UNet structure at tiny widths (`tests/tiny_models.py`)
with few rounds: a check of the bench itself (`bench/gpu.sh` on a machine without CUDA).
`--triton` adds our Triton kernel run on CPU tensors, which needs TRITON_INTERPRET=1.

`--family NAME` (a published transformer of `loha.models.configs.PUBLISHED_TRANSFORMERS`,
bf16 weights unless --dtypes says otherwise) times the whole job as ComfyUI has it: the
weights in the family's checkpoint layout (fused q/k/v and the like, as ComfyUI holds
them), a LoHa as SimpleTuner writes it (``lycoris_`` + diffusers paths, chosen by
lycoris-lora over the Attention/FeedForward modules and the blocks, rank 16), applied
by `loha.apply` (planning, then our kernels on row slices of the fused weights) against
the ComfyUI way on the same slices (per key: backup, fp32 copy, per patch the two fp32
products on its rows, scale, cast, add; round once).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # tiny_models

from _common import (  # noqa: E402
    SD15,
    SDXL,
    Layer,
    kernel_median,
    lycoris_loha,
    matmul_rate,
    median,
    move_factors,
    network_of,
    random_unet,
    stream_bandwidth,
    synchronizer,
    timed,
)

import loha  # noqa: E402
from loha import delta as D  # noqa: E402
from loha import kernels  # noqa: E402
from loha.kernels import tiled  # noqa: E402


def peft_loha(unet, layers):
    """PEFT's LoHa on the same modules with the same factors and alphas."""
    from peft import LoHaConfig, inject_adapter_in_model
    from peft.tuners.loha import LoHaLayer

    names = [l.name for l in layers]
    ranks = {l.name: l.a1.shape[1] for l in layers}
    cfg = LoHaConfig(
        r=16,
        alpha=16,
        target_modules=names,
        rank_pattern={n: r for n, r in ranks.items() if r != 16},
        alpha_pattern={n: l.scale * l.a1.shape[1] for n, l in zip(names, layers) if l.scale * l.a1.shape[1] != 16},
    )
    inject_adapter_in_model(cfg, unet)
    mods = dict(unet.named_modules())
    with torch.no_grad():
        for l in layers:
            pl = mods[l.name]
            assert isinstance(pl, LoHaLayer), l.name
            for attr, src in (("hada_w1_a", l.a1), ("hada_w1_b", l.b1), ("hada_w2_a", l.a2), ("hada_w2_b", l.b2)):
                dst = getattr(pl, attr)["default"]
                dst.copy_(src.reshape(dst.shape))
            pl.requires_grad_(False)
            l.peft = pl
            l.module = pl.get_base_layer()


def weight(l: Layer) -> torch.Tensor:
    return l.module.weight.data


# ---- the methods ------------------------------------------------------------------------


def ours(layers):
    kernels.add_hadamard_many_([(weight(l), l.a1, l.b1, l.a2, l.b2, l.scale) for l in layers])


def triton_grouped(layers):
    """Our Triton kernel called directly (on CPU tensors: under TRITON_INTERPRET=1)."""
    from loha.kernels import triton_hadamard

    triton_hadamard.add_hadamard_many_([(weight(l), l.a1, l.b1, l.a2, l.b2, l.scale) for l in layers])


def khatri_rao_addmm(layers):
    """W += s·(a1•a2)(b1∗b2): one GEMM per layer on the exact rank-R1·R2 pair, through our row tiles."""
    for l in layers:
        w = weight(l)
        pair = (D.khatri_rao(l.a1, l.a2), D.face_split(l.b1, l.b2))
        kernels._run_jobs([tiled.Job(w.view(w.shape[0], -1), tiled.MATMUL, pair, l.scale)])


def ours_with_backup(layers):
    """Ours plus the per-patch backup copy ComfyUI makes (to compare like with like)."""
    for l in layers:
        backup = weight(l).to("cpu", copy=True)
        del backup
    ours(layers)


def comfy_way(layers):
    """Per module: backup, fp32 working copy, two fp32 matmuls, product, scale, cast, add, store."""
    for l in layers:
        w = weight(l)
        backup = w.to("cpu", copy=True)  # kept to unpatch later (freed here: memory)
        temp = w.to(torch.float32, copy=True)
        diff = (l.a1.float() @ l.b1.float()) * (l.a2.float() @ l.b2.float())
        temp += (l.scale * diff).reshape(temp.shape).to(temp.dtype)
        l.module.weight.data = temp.to(w.dtype)  # the patched weight replaces the parameter's data
        del backup


def comfy_dora_way(layers):
    """ComfyUI's LoHa adapter on a DoRA module: the ComfyUI way, then weight_decompose."""
    for l in layers:
        w = weight(l)
        backup = w.to("cpu", copy=True)
        temp = w.to(torch.float32, copy=True)
        diff = ((l.a1.float() @ l.b1.float()) * (l.a2.float() @ l.b2.float())).reshape(temp.shape)
        diff *= l.scale
        calc = temp + diff
        norm = temp.reshape(temp.shape[0], -1).norm(dim=1, keepdim=True).reshape(temp.shape[0], *[1] * (temp.dim() - 1))
        norm = norm + torch.finfo(temp.dtype).eps
        calc *= l.dora.reshape(norm.shape) / norm
        temp[:] = calc
        l.module.weight.data = temp.to(w.dtype)
        del backup


def ours_dora(layers):
    """Ours on the DoRA layers, in place: kernels.apply_steps_, norms of W0+ΔW tile by tile."""
    for l in layers:
        w = weight(l)
        step = kernels.step(kernels.HADAMARD, (l.a1, l.b1, l.a2, l.b2), l.scale, 1.0, tuple(w.shape), w.device, l.dora)
        kernels.apply_steps_(w, [step])


def whole_call(model, network, cold: bool = False):
    """loha.apply + restore, as a user calls them; `cold`: without the memory the last patch kept."""

    def call(layers):
        if cold:
            loha.release_memory()  # not timed: the next apply takes fresh memory from the OS
        return timed(lambda: loha.apply(model, network).restore())

    return call


def repatch(model, network):
    """What a change of strengths or networks costs while patched: handle.reapply (only it is timed)."""

    def call(layers):
        handle = loha.apply(model, network)
        try:
            return timed(lambda: handle.reapply(network))
        finally:
            handle.restore()

    return call


def webui_way(layers):
    """network_hada: rebuild both products, multiply, scale, add via an fp32 copy, copy back."""
    for l in layers:
        w = weight(l)
        updown = (l.a1 @ l.b1) * (l.a2 @ l.b2)
        updown = updown.reshape(w.shape) * l.scale
        w.copy_((w.to(dtype=updown.dtype) + updown).to(dtype=w.dtype))


def lycoris_merge(layers):
    for l in layers:
        l.lyco.merge_to(1.0)


def lycoris_triton(layers):
    """LyCORIS 4.1.3's Triton LoHa merge kernel, layer by layer (CUDA only)."""
    from lycoris.kernels.triton.loha.hada import loha_merge

    for l in layers:
        w = weight(l)
        flat = w.view(w.shape[0], -1)
        out = loha_merge(l.a1, l.b1, l.a2, l.b2, gamma=l.scale, base=flat, out_dtype=w.dtype)
        l.module.weight.data = out.view(w.shape)  # it returns a new tensor: store it as the weight


def peft_merge(layers):
    for l in layers:
        l.peft.merged_adapters.clear()  # we restore nothing: each run merges afresh
        l.peft.merge()


# ---- a diffusion transformer in its checkpoint layout ---------------------------------------------


def family_state(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """Random weights of a published transformer in its checkpoint layout, and a SimpleTuner-style
    LoHa for it (rank 16, alpha 16, every factor random so ΔW ≠ 0) as tensors."""
    from loha.keys import layouts
    from loha.models.structures import published_transformer

    with torch.device("meta"):
        model = published_transformer(name)["transformer"]
    shapes = {path: tuple(m.weight.shape) for path, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    layout = next((lay for side in ("diffusers",) if (lay := layouts.find_layout(shapes, side))), None)
    checkpoint = dict(shapes)
    for fused in layouts.place(layout, shapes, "diffusers") if layout else []:
        for segment in fused.segments:
            checkpoint.pop(segment.part, None)
        checkpoint[fused.checkpoint] = (fused.rows, *shapes[fused.segments[0].part][1:])
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path, shape in checkpoint.items():
        w = torch.empty(shape, dtype=dtype)
        state[f"diffusion_model.{path}.weight"] = w.copy_(torch.randn(shape, generator=gen) * 0.02)
    tensors = {}
    for path in _simpletuner_paths(model):
        o, k = shapes[path][0], math.prod(shapes[path][1:])
        name = "lycoris_" + path.replace(".", "_")
        for i in "12":
            tensors[f"{name}.hada_w{i}_a"] = torch.randn(o, 16, generator=gen) * 0.05
            tensors[f"{name}.hada_w{i}_b"] = torch.randn(16, k, generator=gen) * 0.05
        tensors[f"{name}.alpha"] = torch.tensor(16.0)
    return state, tensors


def _simpletuner_paths(model) -> list[str]:
    """The module paths lycoris-lora wraps with SimpleTuner's preset (Attention, FeedForward, the blocks)."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    blocks = {type(block).__name__ for child in model.children() if isinstance(child, torch.nn.ModuleList)
              for block in child}
    LycorisNetwork.apply_preset({"target_module": ["Attention", "FeedForward", *blocks]})
    net = create_lycoris(model, 1.0, 1, 1, algo="loha", warn_on_unmatched=False)
    paths = {id(m): n for n, m in model.named_modules()}
    return [paths[id(lora.org_module[0])] for lora in net.loras]


def comfy_way_keyed(state: dict, items_by_key: dict) -> None:
    """ComfyUI's patching per key: backup, fp32 copy, per patch its rows' two fp32 products,
    scale, cast, add; the fp32 copy rounded back into the weight."""
    for key, items in items_by_key.items():
        w = state[key]
        backup = w.to("cpu", copy=True)
        temp = w.to(torch.float32, copy=True)
        for it in items:
            a1, b1, a2, b2 = (t.float() for t in it.factors)
            rows = it.target.rows
            region = temp if rows is None else temp.narrow(0, rows[0], rows[1] - rows[0])
            region += (it.scale * ((a1 @ b1) * (a2 @ b2))).reshape(region.shape)
        w.copy_(temp)
        del backup


def run_family(args) -> None:
    import loha
    from loha.patch import by_tensor, plan_modules

    dtype = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[args.dtypes or "bf16"]
    reps = args.reps or (2 if args.quick else 3)
    t0 = time.perf_counter()
    state, tensors = family_state(args.family, dtype)
    network = loha.from_tensors(tensors, args.family)
    params = sum(v.numel() for v in state.values())
    view = loha.patch.ModelView(state)
    items, unmatched = plan_modules(view.names, [loha.patch.Use(network)])
    assert not unmatched, unmatched
    grouped = by_tensor(items)
    sliced = sum(1 for it in items if it.target.rows is not None)
    print(f"{args.family} ({view.names.family}, checkpoint layout): {params / 1e9:.2f}B weights in {len(state)} tensors, "
          f"{str(dtype)[6:]}; LoHa of {len(network.modules)} modules (rank 16), {sliced} of them on row slices of "
          f"{sum(1 for g in grouped.values() if g[0].target.rows is not None)} fused weights; built in "
          f"{time.perf_counter() - t0:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    del view, items
    times: dict[str, list[float]] = {"ours: loha.apply (plan + apply)": [], "ours: kernels only": [],
                                     "ComfyUI way": []}
    checked = sorted(grouped, key=lambda k: -state[k].numel())[:16]  # compared after each round
    for rep in range(reps):
        handle = None

        def ours_total():
            nonlocal handle
            handle = loha.apply(state, network)

        times["ours: loha.apply (plan + apply)"].append(timed(ours_total))
        handle.restore()  # frees its backups before ours are taken (memory)
        del handle
        backup = {k: state[k].clone() for k in grouped}
        times["ours: kernels only"].append(timed(lambda: _apply_items(state, grouped)))
        mine = {k: state[k].clone() for k in checked}
        for key, value in backup.items():
            state[key].copy_(value)
        times["ComfyUI way"].append(timed(lambda: comfy_way_keyed(state, grouped)))
        worst = max(float((state[k].float() - mine[k].float()).abs().max()) for k in checked)
        step = max(float(torch.finfo(dtype).eps * state[k].float().abs().max()) for k in checked)
        print(f"round {rep + 1}: largest difference ours vs ComfyUI way {worst:.3g} (one {str(dtype)[6:]} step at the "
              f"largest weight: {step:.3g})")
        for key, value in backup.items():
            state[key].copy_(value)
        del backup, mine
    comfy = median(times["ComfyUI way"])
    print(f"\n{'method':<34}{'seconds':>9}{'vs ComfyUI':>12}   runs")
    for name, ts in times.items():
        t = median(ts)
        print(f"{name:<34}{t:>9.2f}{comfy / t:>11.1f}x   {' '.join(f'{x:.2f}' for x in ts)}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {_load()}")


def _apply_items(state: dict, grouped: dict) -> None:
    from loha.patch import apply_to_tensor

    batch: list = []
    with torch.no_grad():
        for key, items in grouped.items():
            apply_to_tensor(state[key], items, batch)
        kernels.add_hadamard_many_(batch)


# ---- floors --------------------------------------------------------------------------------


def floors(layers, bw: float, rate: float) -> dict:
    nbytes = sum(2 * weight(l).numel() * weight(l).element_size() for l in layers)
    flops = sum(2 * 2 * l.a1.shape[0] * l.b1.shape[1] * l.a1.shape[1] for l in layers)
    return {"memory": nbytes / bw, "compute": flops / rate}


# ---- the run ---------------------------------------------------------------------------------


def set_weight_dtype(layers, dtype, device):
    for l in layers:
        l.module.weight.data = l.module.weight.data.to(device=device, dtype=dtype)
    move_factors(layers, device)


def run(args) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.tiny:
        from tiny_models import SDXL_UNET

        config, label = SDXL_UNET, "tiny SDXL-structured"
    else:
        config, label = (SDXL, "SDXL") if args.sdxl else (SD15, "SD1.5")
    dtypes = [dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[d] for d in args.dtypes.split(",")]
    reps = args.reps or (3 if args.quick or args.tiny else 5)
    anchor_reps = max(1, min(reps, 1 if args.quick else 3))

    t0 = time.perf_counter()
    build_dtype = torch.float32 if torch.float32 in dtypes else dtypes[0]
    unet = random_unet(config, dtype=build_dtype)
    net, layers = lycoris_loha(unet)
    _, dora_layers = lycoris_loha(unet, seed=2, dora=True)
    net.to(device)  # LyCORIS's merge_to works where its factors are
    model = {"unet": unet}
    loha_methods = {"ours": ours}
    if args.triton and device.type == "cpu":
        loha_methods["ours, Triton (interpreted)"] = triton_grouped
    loha_methods.update({
        "ours + backup copy": ours_with_backup,
        "ours, whole apply+restore": whole_call(model, network_of(layers)),
        "  … cold (fresh memory)": whole_call(model, network_of(layers), cold=True),
        "ours, re-patch": repatch(model, network_of(layers)),
    })
    if device.type == "cuda" or args.tiny:
        loha_methods["Khatri–Rao addmm_"] = khatri_rao_addmm
    loha_methods.update({"ComfyUI way": comfy_way, "WebUI way": webui_way, "LyCORIS merge_to": lycoris_merge})
    if device.type == "cuda":
        loha_methods["LyCORIS Triton"] = lycoris_triton
    tables = {
        "LoHa": (layers, loha_methods),
        "DoRA LoHa": (dora_layers, {
            "ours": ours_dora, "ours, whole apply+restore": whole_call(model, network_of(dora_layers)),
            "ComfyUI way": comfy_dora_way,
        }),
    }
    print(
        f"{label} UNet: {len(layers)} LoHa layers, {sum(weight(l).numel() for l in layers) / 1e6:.0f}M weights "
        f"(built in {time.perf_counter() - t0:.0f} s); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}"
    )

    def probe_floor():
        if device.type == "cpu":
            bwd = stream_bandwidth(reps=2)
            return max(bwd.values()), matmul_rate(reps=2)
        return _cuda_floors()

    if device.type == "cpu":
        from loha.kernels import native

        why = native.why_not()
        print(f"ours on CPU: {'native accelerator (native.c)' if not why else 'pure-torch tiles (native: ' + why + ')'}")
    else:
        import triton

        print(f"ours on CUDA: grouped Triton launches (triton {triton.__version__}) on {torch.cuda.get_device_name()}")
    print(f"load average before: {_load()}")
    sync = synchronizer(device)
    unit, per_s = ("ms", 1e3) if device.type == "cuda" or args.tiny else ("s", 1.0)

    for dtype in dtypes:
        set_weight_dtype(layers + dora_layers, dtype, device)
        failed: dict = {}  # (table, method) -> why: an anchor that fails is reported, not fatal

        def attempt(name, method, fn, rows):
            if (name, method) in failed:
                return None
            try:
                return _time(fn, rows, sync)
            except Exception as e:  # noqa: BLE001 — any anchor's error, shown in its row
                if method.startswith("ours"):
                    raise
                failed[name, method] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                return None

        if device.type == "cuda":  # compiles, LyCORIS's kernel tuning, cuBLAS start-up: not timed
            for name, (rows, methods) in tables.items():
                for method, fn in methods.items():
                    if method.startswith("ours") or "Triton" in method or "Khatri" in method:
                        attempt(name, method, fn, rows)
        probes = []
        results = {}
        for name, (rows, methods) in tables.items():
            results[name] = {m: [] for m in methods}
        for rep in range(reps):
            probes.append(probe_floor())  # the floor is measured in the same rounds
            for name, (rows, methods) in tables.items():
                for method, fn in methods.items():
                    if not method.startswith(("ours", " ")) and rep >= anchor_reps:
                        continue
                    if (t := attempt(name, method, fn, rows)) is not None:
                        results[name][method].append(t)
        bw = median([p[0] for p in probes])
        rate = median([p[1] for p in probes])
        fl = floors(layers, bw, rate)
        floor = fl["memory"] if device.type == "cuda" else max(fl.values())
        dname = str(dtype).replace("torch.", "")
        kind = "HBM floor" if device.type == "cuda" else "floor"
        print(
            f"\n{label} {dname}: {kind} {floor * per_s:.3f} {unit} (memory {fl['memory'] * per_s:.3f} {unit}: "
            f"{2 * sum(weight(l).numel() * weight(l).element_size() for l in layers) / 1e9:.2f} GB of W read and "
            f"written at {bw / 1e9:.1f} GB/s; matmul {fl['compute'] * per_s:.3f} {unit} at {rate / 1e9:.0f} fp32 "
            f"GFLOP/s{', not a floor on tensor cores' if device.type == 'cuda' else ''}); medians of {reps} (ours) / "
            f"{anchor_reps} (anchors) interleaved rounds; load average now {_load()}"
        )
        for name, times in results.items():
            comfy = median(times["ComfyUI way"]) if times["ComfyUI way"] else math.nan
            print(f"{name}:")
            print(f"  {'method':<28}{unit:>9}{'vs ComfyUI':>12}{'vs floor':>10}   runs")
            for method, ts in times.items():
                if not ts:
                    print(f"  {method:<28}   failed: {failed.get((name, method))}")
                    continue
                t = median(ts)
                print(f"  {method:<28}{t * per_s:>9.3f}{comfy / t:>11.1f}x{t / floor:>9.2f}x   "
                      f"{' '.join(f'{x * per_s:.2f}' for x in ts)}")
            whole = median(times["ours, whole apply+restore"])
            target = "≥ 8×" if name == "LoHa" else "≥ 1×, no slower"
            print(f"  the whole apply+restore: {comfy / whole:.1f}× the ComfyUI way (target {target})")
        if device.type == "cuda":
            ours_t, lyco = median(results["LoHa"]["ours"]), results["LoHa"]["LyCORIS Triton"]
            print(f"  target ({label} {dname}): ours within 1.5× of the HBM floor: "
                  f"{'yes' if ours_t <= 1.5 * floor else 'NO'} ({ours_t / floor:.2f}×)")
            versus = (f"{'yes' if ours_t < median(lyco) else 'NO'} ({median(lyco) / ours_t:.2f}× faster)" if lyco
                      else f"not measured ({failed.get(('LoHa', 'LyCORIS Triton'))})")
            print(f"  target ({label} {dname}): ours faster than LyCORIS's Triton loha_merge: {versus}")
    if not args.no_peft:  # last: PEFT's layers rename the model's modules
        peft_loha(unet, layers)
        ts = [_time(peft_merge, layers, sync) for _ in range(anchor_reps)]
        print(f"\nPEFT merge ({dname}, after the rounds above): {median(ts) * per_s:.3f} {unit}, "
              f"{median(results['LoHa']['ComfyUI way']) / median(ts):.1f}x the ComfyUI way")
    del net
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def _time(fn, rows, sync) -> float:
    """Seconds of one call: its own figure when it returns one (the part it times), else its wall time."""
    took = []

    def call():
        took.append(fn(rows))
        sync()

    sync()  # nothing of the last call still running in the timed span
    elapsed = timed(call)
    return took[0] if isinstance(took[0], float) else elapsed


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cuda_floors():
    x = torch.empty(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() * 4 / (time.perf_counter() - t)
    a = torch.randn(8192, 8192, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    rate = 5 * 2 * 8192**3 / (time.perf_counter() - t)
    return bw, rate


# ---- tuning: the measurements behind loha/kernels/tuning.py -----------------------------------


def tune(args) -> None:
    from loha.kernels import native, tiled, tuning

    reps = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def med(fn, n=reps):
        fn()
        return median([timed(fn) for _ in range(n)])

    gen = torch.Generator().manual_seed(0)

    def factors(o, k, r1, r2):
        return [torch.randn(*s, generator=gen) * 0.1 for s in ((o, r1), (r1, k), (o, r2), (r2, k))]

    # 1. Khatri–Rao vs two products per tile: one thread, its CPU time (steadier than the
    #    wall clock when other processes share the machine), ns per element of W.
    def thread_med(fn, n=reps):
        fn()
        ts = []
        for _ in range(n):
            t = time.thread_time()
            fn()
            ts.append(time.thread_time() - t)
        return median(ts)

    from loha import delta as D

    print(f"native accelerator: {'in use' if native.lib() else 'not in use: ' + native.why_not()}")
    print("\nKhatri-Rao addmm_ vs the products (MKL / oneDNN / native) (1 thread CPU time, W 1280x11520, ns/element):")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    o, k = 1280, 11520
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(o, k).to(dtype)
        line = []
        for r in (1, 2, 3, 4, 5, 6):
            a1, b1, a2, b2 = factors(o, k, r, r)
            forms = [
                tiled.Job(w, tiled.MATMUL, (D.khatri_rao(a1, a2), D.face_split(b1, b2)), 0.01),
                tiled.Job(w, tiled.HADAMARD, (a1, b1, a2, b2), 0.01),
            ]
            if tiled.onednn_available():
                forms.append(tiled.Job(w, tiled.HADAMARD_ONEDNN, (a1, b1.t().contiguous(), a2, b2.t().contiguous()), 0.01))
            if native.supports(dtype):
                forms.append(tiled.Job(w, tiled.HADAMARD_NATIVE, (a1, b1, a2, b2), 0.01))
            ts = [thread_med(lambda j=j: tiled.run_serial([j], tuning.CPU_TILE_ELEMS)) / w.numel() * 1e9 for j in forms]
            line.append(f"{r * r}: " + "/".join(f"{t:.2f}" for t in ts))
        print(f"  {str(dtype)[6:]} (KR/MKL/oneDNN/native): " + "  ".join(line))
    torch.set_num_threads(prev)

    # 2. Caller thread vs worker threads, by layer size (rank 16 fp32), wall clock.
    print("\ncaller thread vs worker threads (rank 16, fp32, ms):")
    n = torch.get_num_threads()
    for o, k in ((128, 128), (320, 320), (640, 640), (1280, 1280), (1280, 5120)):
        w = torch.randn(o, k)
        job = tiled.Job(w, tiled.HADAMARD, tuple(factors(o, k, 16, 16)), 0.01)
        ts = med(lambda: tiled.run_serial([job], tuning.CPU_TILE_ELEMS), 4 * reps)
        share = max(1, min(tuning.CPU_TILE_ELEMS, -(-o * k // n)))
        tp = med(lambda: tiled._get_pool(n).run(tiled.tiles([job], share)), 4 * reps)
        print(f"  {o}x{k} ({o * k:>8} elements): caller {ts * 1e3:.3f}  workers {tp * 1e3:.3f}")

    # 3. Tile size over a whole SD1.5 LoHa: wall and process CPU seconds.
    print("\ntile size, whole SD1.5 LoHa (wall s / process CPU s):")
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        shapes = [
            (m.weight.shape[0], m.weight[0].numel(), 8 if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) else 16)
            for m in UNet2DConditionModel(**SD15).modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        ]
    sizes = (1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21)
    for dtype in (torch.float32, torch.float16):
        items = [(torch.randn(o, k).to(dtype), *factors(o, k, r, r), 0.01) for o, k, r in shapes]
        jobs = [kernels._hadamard_job(*it) for it in items]
        res: dict = {te: [] for te in sizes}
        for rep in range(1 + (2 if args.quick else 4)):
            for te in sizes:  # interleaved
                t, c = time.perf_counter(), time.process_time()
                tiled.run_cpu(jobs, tile_elems=te)
                if rep:
                    res[te].append((time.perf_counter() - t, time.process_time() - c))
        line = [f"2^{te.bit_length() - 1}: {median([x[0] for x in v]):.3f}/{median([x[1] for x in v]):.3f}" for te, v in res.items()]
        print(f"  {str(dtype)[6:]}: " + "  ".join(line) + f"   (load {_load()})")
        del items, jobs


def tune_triton(args) -> None:
    """The Triton tile shapes over a whole SDXL-size LoHa, and where the Khatri–Rao GEMM wins,
    with the values they suggest for loha/kernels/tuning.py. On CUDA; with --tiny on CPU tensors
    under TRITON_INTERPRET=1 (small shapes, one tile shape: a check of this code, not a measurement)."""
    import triton
    from diffusers import UNet2DConditionModel

    from loha.kernels import triton_hadamard as T
    from loha.kernels import tuning

    dev = torch.device("cuda" if args.cuda else "cpu")
    if dev.type == "cpu" and not T._interpreting():
        raise SystemExit("--tune --triton without CUDA needs TRITON_INTERPRET=1")
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU tensors, Triton's interpreter"
    print(f"{where}; torch {torch.__version__}, triton {triton.__version__}")

    def med(fn, n=1 if args.tiny else 10):
        return kernel_median(fn, dev, n)

    if args.tiny:
        from tiny_models import SDXL_UNET as config
    else:
        config = SDXL
    with torch.device("meta"):
        mods = [m for m in UNet2DConditionModel(**config).modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    shapes = [(m.weight.shape[0], m.weight[0].numel(), 8 if getattr(m, "kernel_size", (1, 1)) != (1, 1) else 16) for m in mods]
    if args.tiny:
        shapes = shapes[:: max(1, len(shapes) // 12)]  # a dozen layers: the interpreter runs programs one by one
    bw = _cuda_floors()[0] if dev.type == "cuda" else max(stream_bandwidth(reps=2).values())
    configs = [(64, 64, 8), (32, 64, 4), (64, 128, 8), (128, 64, 8), (32, 128, 4), (64, 64, 4)]
    precisions = ["tf32x3", "ieee"]
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if args.tiny:
        configs, precisions, dtypes = [(16, 32, 1), (32, 32, 2)], ["ieee"], (torch.float16,)
    totals: dict = {}
    for dtype in dtypes:
        items = [
            (torch.randn(o, k, device=dev).to(dtype), *(torch.randn(*s, device=dev) * 0.1 for s in ((o, r), (r, k), (o, r), (r, k))), 0.1)
            for o, k, r in shapes
        ]
        nbytes = sum(2 * it[0].numel() * it[0].element_size() for it in items)
        print(f"\n{len(items)} layers, {str(dtype)[6:]}: {'HBM' if dev.type == 'cuda' else 'memory'} floor {nbytes / bw * 1e3:.2f} ms ({nbytes / 1e9:.2f} GB at "
              f"{bw / 1e9:.0f} GB/s)")
        for bm, bn, nw in configs:
            for prec in precisions:
                t = med(lambda: T.add_hadamard_many_(items, block_m=bm, block_n=bn, num_warps=nw, precision=prec))
                totals.setdefault((bm, bn, nw, prec), {})[dtype] = t
                print(f"  {bm}x{bn} warps {nw} {prec}: {t * 1e3:.2f} ms ({nbytes / t / 1e9:.0f} GB/s, "
                      f"{t * bw / nbytes:.2f}× the floor)")
        del items
    best = min(totals, key=lambda c: sum(totals[c].values()))
    now = (tuning.TRITON_BLOCK_M, tuning.TRITON_BLOCK_N, tuning.TRITON_NUM_WARPS, tuning.TRITON_PRECISION)
    same_prec = min((c for c in totals if c[3] == now[3]), key=lambda c: sum(totals[c].values()), default=best)

    o, k = (1280, 11520) if not args.tiny else (64, 576)
    print(f"\nKhatri-Rao addmm_ (our row tiles) vs Triton, W {o}x{k} (ms):")
    kr_max = {}
    for dtype in dtypes:
        w = torch.randn(o, k, device=dev).to(dtype)
        kr_max[dtype] = 0
        for r in (1, 2, 3, 4) if not args.tiny else (1, 2):
            f = [torch.randn(*s, device=dev) * 0.1 for s in ((o, r), (r, k), (o, r), (r, k))]
            pair = (D.khatri_rao(f[0], f[2]), D.face_split(f[1], f[3]))
            tk = med(lambda: kernels._run_jobs([tiled.Job(w, tiled.MATMUL, pair, 0.1)]))
            tt = med(lambda: T.add_hadamard_(w, *f, 0.1, block_m=same_prec[0], block_n=same_prec[1],
                                            num_warps=same_prec[2], precision=same_prec[3]))
            if tk < tt and kr_max[dtype] == (r - 1) ** 2:
                kr_max[dtype] = r * r
            print(f"  {str(dtype)[6:]} R1R2={r * r}: Khatri-Rao {tk * 1e3:.3f}  Triton {tt * 1e3:.3f}")

    def total(c):
        return " + ".join(f"{totals[c][d] * 1e3:.2f}" for d in dtypes) + " ms"

    print(f"\nsuggested for loha/kernels/tuning.py (sum over {', '.join(str(d)[6:] for d in dtypes)}):")
    print(f"  now:     {now[0]}x{now[1]} warps {now[2]} {now[3]}: {total(now) if now in totals else 'not timed'}")
    print(f"  fastest: {best[0]}x{best[1]} warps {best[2]} {best[3]}: {total(best)}")
    print(f"  fastest at {same_prec[3]}: {same_prec[0]}x{same_prec[1]} warps {same_prec[2]}: {total(same_prec)}")
    print(f"  TRITON_BLOCK_M = {same_prec[0]}\n  TRITON_BLOCK_N = {same_prec[1]}\n  TRITON_NUM_WARPS = {same_prec[2]}")
    print("  CUDA_KR_MAX_RANK_PRODUCT = {" + ", ".join(f"torch.{str(d)[6:]}: {kr_max[d]}" for d in dtypes) + "}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdxl", action="store_true", help="SDXL-size UNet instead of SD1.5")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--reps", type=int, default=0, help="repetitions of ours (anchors: up to 3)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default fp32,fp16; SDXL: fp16)")
    p.add_argument("--cuda", action="store_true", help="run on CUDA")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT")
    p.add_argument("--tune", action="store_true", help="measure the dispatch thresholds instead")
    p.add_argument("--tiny", action="store_true", help="SDXL's structure at tiny widths, few rounds: checks the bench")
    p.add_argument("--triton", action="store_true",
                   help="our Triton kernel on CPU tensors too (needs TRITON_INTERPRET=1); with --tune: the Triton tuning")
    p.add_argument("--family", metavar="NAME", help="a published diffusion transformer in its checkpoint layout "
                   "(flux-dev, sd3.5-large, sd3.5-medium, qwen-image), bf16 unless --dtypes says otherwise")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.family:
        run_family(args)
        return
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: this torch sees no CUDA device")
    if args.dtypes is None:
        args.dtypes = "fp16" if args.sdxl and not args.cuda else "fp32,fp16"
    if args.tune:
        tune_triton(args) if args.cuda or args.triton else tune(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
