"""Merge benchmark: our streaming merge against load-everything and LyCORIS's merge.

    python bench/merge.py [--dim 16 --conv-dim 8] [--keep DIR]
    python bench/merge.py --family sd3.5-medium     # a diffusion transformer's checkpoint
    python bench/merge.py --sdxl --only ours ours-cuda   # SDXL, merged on the CPU and with --device cuda

Makes, in a temporary folder, an SD1.5-size checkpoint in LDM layout (the real SD1.5
UNet, 860M parameters, CLIP-L text encoder, 123M, and VAE, 84M, with seeded random
weights, fp16 on disk like most shared checkpoints: 2.1 GB) and a full LoHa for it
(every Linear/Conv of the UNet and the text encoder, fp16, made here with LyCORIS's
names). Then runs, each in its own process, timed, with its peak RSS taken
from wait4():

  ours       loha.merge.merge: header, plan, then one tensor at a time in and out
  load-all   (a) load_file the checkpoint and the network, apply every module the way
             ComfyUI's LoHa adapter does (fp32 copy of the weight, two fp32 matmuls,
             product, scale, add, cast back), save_file
  lycoris    (b) LyCORIS's tools/merge.py path: the checkpoint loaded into diffusers /
             transformers modules (`loha.models.from_ldm.diffusers_parts`, no copy),
             `lycoris.utils.merge` (make_module + merge_to per module), converted back
             to LDM and saved with save_file

and prints a table with ratios, and how far apart the outputs are. (LyCORIS ≥3 applies
alpha/rank twice when merging LoHa, so its output differs wherever alpha ≠ rank;
only its time and memory are compared.) The target: peak RSS of ours at most a third
of load-all's, time no worse.

`--sdxl` makes an SDXL checkpoint instead (UNet, CLIP-L, OpenCLIP-bigG, VAE: 3.5B parameters,
7 GB in fp16); `ours-cuda` is our merge with `--device cuda` (each tensor's ΔW on the GPU),
compared tensor by tensor with the CPU's output when both ran. `--tiny` makes the same
structure at tiny widths: a check of this script (`bench/gpu.sh` without CUDA).

`--family NAME` (see bench/apply.py) makes the diffusion model of a published transformer
instead, bf16, in its checkpoint layout (fused q/k/v: SimpleTuner's diffusers-named modules
land on row slices), and a SimpleTuner-style LoHa for it (rank 16); LyCORIS's merge
path is SD-only and is left out.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # random_checkpoint, the tests' fixture

# --------------------------------------------------------------------------- making the files


MODELS = {"sd15": ("sd1", "SD1.5 UNet + CLIP-L + VAE"), "sdxl": ("sdxl", "SDXL UNet + CLIP-L + OpenCLIP-bigG + VAE"),
          "sdxl-tiny": ("sdxl", "SDXL's structure at tiny widths")}


def tiny_configs(family: str) -> dict:
    """A family's published configs at tiny widths (same blocks and names, few channels and layers)."""
    import copy

    from loha.models.configs import PUBLISHED

    configs = copy.deepcopy(PUBLISHED[family])
    configs["unet"] = dict(configs["unet"], block_out_channels=(32, 64, 64)[: len(configs["unet"]["block_out_channels"])],
                           norm_num_groups=8, transformer_layers_per_block=1, attention_head_dim=8)
    for part in ("text_encoder", "text_encoder_2"):
        if part in configs:
            configs[part] = dict(configs[part], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, projection_dim=64, vocab_size=1000)
    configs["vae"] = dict(configs["vae"], block_out_channels=(8, 16, 16, 16), norm_num_groups=4)
    return configs


def make_checkpoint(path: str, seed: int, model: str = "sd15") -> int:
    """A checkpoint of `model` (MODELS) with seeded random weights, fp16, written tensor by tensor."""
    from random_checkpoint import random_checkpoint

    from loha.files.checkpoint import checkpoint_shapes

    family, title = MODELS[model]
    configs = tiny_configs(family) if model.endswith("-tiny") else None
    random_checkpoint(path, family, seed=seed, dtype=torch.float16, vae=True, configs=configs,
                      metadata={"modelspec.title": f"random benchmark model: {title}"})
    return sum(math.prod(s) for s in checkpoint_shapes(path).values())


def make_family(name: str, ckpt: str, net: str, seed: str) -> None:
    """A published transformer's weights (bf16, checkpoint layout) and a SimpleTuner-style LoHa for it.

    Run in a process of its own (`--task family-files`): Linux carries a process's peak RSS
    over fork and exec, so a parent that held the model would inflate every measurement.
    """
    from apply import family_state

    from loha.files.safetensors_io import save

    state, tensors = family_state(name, torch.bfloat16, int(seed))
    state = {f"model.{k}": v for k, v in state.items()}  # as the published files hold it
    save(state, ckpt, {"modelspec.title": f"random {name}-size benchmark model"})
    save({k: v.to(torch.bfloat16) if v.dim() else v for k, v in tensors.items()}, net,
         {"ss_network_module": "lycoris.kohya"})


def make_network(ckpt: str, path: str, dim: int, alpha: float, conv_dim: int, conv_alpha: float, seed: int) -> int:
    """A full LoHa for every patchable weight of `ckpt`, named as LyCORIS names them."""
    from loha.files.checkpoint import checkpoint_shapes
    from loha.files.safetensors_io import save
    from loha.keys import map_state_dict

    names = map_state_dict(checkpoint_shapes(ckpt))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in names.targets:
        spellings = names.names(target)
        if target.component == "unet":
            name = spellings[0]  # lora_unet_ + diffusers path (kohya / LyCORIS for SD1.x)
        else:  # LyCORIS on transformers 5 names the text encoders without text_model_
            name = next(n for n in spellings if n.startswith("lora_te") and "text_model" not in n)
        conv = len(target.shape) > 2 and math.prod(target.shape[2:]) > 1
        r, a = (conv_dim, conv_alpha) if conv else (dim, alpha)
        o, k = target.shape[0], math.prod(target.shape[1:])
        tensors[f"{name}.hada_w1_a"] = (torch.randn(o, r, generator=g) * 0.05).half()
        tensors[f"{name}.hada_w1_b"] = (torch.randn(r, k, generator=g) / math.sqrt(k)).half()
        tensors[f"{name}.hada_w2_a"] = (torch.randn(o, r, generator=g) * 0.05).half()
        tensors[f"{name}.hada_w2_b"] = (torch.randn(r, k, generator=g) / math.sqrt(k)).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(a))
    save(tensors, path, {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim),
                         "ss_network_alpha": str(alpha)})
    return len(names.targets)


# --------------------------------------------------------------------------- the contenders


def task_ours(ckpt: str, net: str, out: str, device: str = "cpu") -> None:
    from loha.merge import merge

    merge(ckpt, [(net, 1.0)], out, overwrite=True, device=device)


def task_ours_cuda(ckpt: str, net: str, out: str) -> None:
    task_ours(ckpt, net, out, device="cuda")


def task_load_all(ckpt: str, net: str, out: str) -> None:
    """(a): everything in memory; per module the ComfyUI LoHa adapter's arithmetic (on its rows
    of a fused weight, as ComfyUI's offsets give them)."""
    from safetensors.torch import load_file, save_file

    from loha.files.network import load
    from loha.keys import map_state_dict
    from loha.patch import Use, plan_modules

    sd = load_file(ckpt)
    items, _ = plan_modules(map_state_dict(sd), [Use(load(net))])  # matching and reading: not measured apart
    with torch.no_grad():
        for item in items:
            weight, rows = sd[item.target.key], item.target.rows
            region = weight if rows is None else weight[rows[0]:rows[1]]
            w1a, w1b, w2a, w2b = item.factors
            temp = region.to(torch.float32, copy=True)  # ModelPatcher: fp32 copy of the weight
            m1 = torch.mm(w1a.float(), w1b.float())
            m2 = torch.mm(w2a.float(), w2b.float())
            lora_diff = (m1 * m2).reshape(region.shape)
            temp += (1.0 * item.scale) * lora_diff
            region.copy_(temp.to(weight.dtype))
    save_file(sd, out, metadata={"modelspec.title": "random benchmark model"})


def task_lycoris(ckpt: str, net: str, out: str) -> None:
    """(b): LyCORIS's tools/merge.py path on diffusers modules, then back to LDM."""
    import logging

    from lycoris.utils import merge as lycoris_merge
    from safetensors.torch import load_file, save_file

    from loha.models.from_ldm import diffusers_parts
    from loha.models.to_ldm import ldm_state_dict

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    sd = load_file(ckpt)
    parts = diffusers_parts(sd)  # the tensors themselves, in diffusers / transformers modules
    del sd
    lycoris_merge((parts["text_encoder"],), parts["unet"], load_file(net), 1.0, "cpu")
    save_file(ldm_state_dict(parts), out, metadata={"modelspec.title": "random SD1.5-size benchmark model"})


TASKS = {"ours": task_ours, "ours-cuda": task_ours_cuda, "load-all": task_load_all, "lycoris": task_lycoris}
LABELS = {
    "ours": "ours: streaming loha merge",
    "ours-cuda": "ours, --device cuda",
    "load-all": "(a) load all + ComfyUI-style + save_file",
    "lycoris": "(b) LyCORIS utils.merge (tools/merge.py)",
}


def measure(task: str, ckpt: str, net: str, out: str) -> tuple[float, float, float]:
    """Run one task in a fresh process: (wall seconds, CPU seconds, peak RSS in bytes) of it.

    CPU time (user + system) is printed too: on a shared machine it is the steadier number.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--task", task, ckpt, net, out]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{task} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # Linux reports KiB


def compare(a: str, b: str) -> tuple[int, int, float]:
    """(identical tensors, tensors, max |difference|) between two checkpoints, one tensor at a time."""
    from loha.files.safetensors_io import Reader

    same, worst = 0, 0.0
    with Reader(a) as ra, Reader(b) as rb:
        keys = ra.keys()
        assert set(keys) == set(rb.keys()), "different keys"
        for k in keys:
            x, y = ra.read(k), rb.read(k)
            if torch.equal(x, y):
                same += 1
            else:
                worst = max(worst, (x.float() - y.float()).abs().max().item())
    return same, len(keys), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--conv-dim", type=int, default=8)
    parser.add_argument("--conv-alpha", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(TASKS), default=["ours", "load-all", "lycoris"])
    parser.add_argument("--sdxl", action="store_true", help="an SDXL checkpoint instead of SD1.5")
    parser.add_argument("--tiny", action="store_true", help="SDXL's structure at tiny widths: checks this script")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files (default: a temp folder)")
    parser.add_argument("--family", metavar="NAME", help="a published transformer (bench/apply.py --family)")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        {**TASKS, "family-files": make_family}[args.task](*args.paths)
        return

    folder = args.keep or tempfile.mkdtemp(prefix="loha-bench-merge-")
    os.makedirs(folder, exist_ok=True)
    model = args.family or ("sdxl-tiny" if args.tiny else "sdxl" if args.sdxl else "sd15")
    ckpt, net = os.path.join(folder, f"{model}-random.safetensors"), os.path.join(folder, f"{model}-loha.safetensors")
    if args.family and "lycoris" in args.only:
        args.only.remove("lycoris")
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, files in {folder}")
        t = time.perf_counter()
        if args.family and not os.path.exists(ckpt):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--task", "family-files", args.family, ckpt,
                            net, str(args.seed)], check=True)
            from loha.files.checkpoint import checkpoint_shapes
            from loha.files.network import load

            params = sum(math.prod(s) for s in checkpoint_shapes(ckpt).values())
            print(f"checkpoint: {args.family} diffusion model, {params / 1e9:.2f}B parameters, bf16, checkpoint "
                  f"layout, {os.path.getsize(ckpt) / 1e9:.2f} GB; network: SimpleTuner-style LoHa of "
                  f"{len(load(net).modules)} modules, rank 16, bf16, {os.path.getsize(net) / 1e6:.0f} MB "
                  f"({time.perf_counter() - t:.0f} s)")
        if not os.path.exists(ckpt):
            params = make_checkpoint(ckpt, args.seed, model)
            print(f"checkpoint: {MODELS[model][1]}, {params / 1e6:.0f}M parameters, fp16, LDM layout, "
                  f"{os.path.getsize(ckpt) / 1e9:.2f} GB ({time.perf_counter() - t:.0f} s)")
        t = time.perf_counter()
        if not os.path.exists(net):
            modules = make_network(ckpt, net, args.dim, args.alpha, args.conv_dim, args.conv_alpha, args.seed)
            print(f"network: LoHa on all {modules} Linear/Conv weights, dim {args.dim}/alpha {args.alpha:g}, "
                  f"conv dim {args.conv_dim}/alpha {args.conv_alpha:g}, fp16, "
                  f"{os.path.getsize(net) / 1e6:.0f} MB ({time.perf_counter() - t:.0f} s)")
        rows = {}
        for task in args.only:
            out = os.path.join(folder, f"out-{task}.safetensors")
            rows[task] = measure(task, ckpt, net, out)
            wall, cpu, rss = rows[task]
            print(f"  {LABELS[task]:<44} {wall:7.1f} s wall {cpu:7.1f} s CPU {rss / 2**30:6.2f} GiB peak RSS", flush=True)

        print()
        base = rows.get("load-all")
        print(f"{'':<44} {'wall':>7} {'CPU':>7} {'peak RSS':>10}   ours / that: {'wall':>5} {'CPU':>5} {'RSS':>5}")
        for task, (wall, cpu, rss) in rows.items():
            ratio = ""
            if "ours" in rows and task != "ours":
                o = rows["ours"]
                ratio = f"{'':13} {o[0] / wall:5.2f} {o[1] / cpu:5.2f} {o[2] / rss:5.2f}"
            print(f"{LABELS[task]:<44} {wall:6.1f}s {cpu:6.1f}s {rss / 2**30:6.2f} GiB {ratio}")
        if base and "ours" in rows:
            ours = rows["ours"]
            print(f"\ntarget: peak RSS ≤ 1/3 of load-all: {'yes' if ours[2] * 3 <= base[2] else 'NO'} "
                  f"({ours[2] / base[2]:.2f}); time no worse: wall {'yes' if ours[0] <= base[0] else 'NO'} "
                  f"({ours[0] / base[0]:.2f}), CPU {'yes' if ours[1] <= base[1] else 'NO'} ({ours[1] / base[1]:.2f})")
            same, total, worst = compare(os.path.join(folder, "out-ours.safetensors"),
                                         os.path.join(folder, "out-load-all.safetensors"))
            print(f"ours vs load-all outputs: {same}/{total} tensors identical, max |difference| {worst:.3g}")
        if "ours" in rows and "ours-cuda" in rows:
            print(f"\n--device cuda: {rows['ours'][0] / rows['ours-cuda'][0]:.2f}× the CPU merge's speed (wall)")
            same, total, worst = compare(os.path.join(folder, "out-ours.safetensors"),
                                         os.path.join(folder, "out-ours-cuda.safetensors"))
            print(f"ours on the CPU vs --device cuda outputs: {same}/{total} tensors identical, "
                  f"max |difference| {worst:.3g}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
