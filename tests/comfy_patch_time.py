"""Time patching inside ComfyUI: the built-in LoRA loader's patches against ours, same file.

    LOHA_COMFYUI_PYTHON tests/comfy_patch_time.py COMFYUI_DIR CHECKPOINT LOHA [REPEATS]

Run with ComfyUI's interpreter. Loads the checkpoint once the way ComfyUI does, makes
a patched clone of MODEL and CLIP with ``comfy.sd.load_lora_for_models`` (what
LoraLoader calls) and one with our LoHa Loader's `apply_loha`, and times, for each:
the node (reading the file and building the patches), and ComfyUI's
``ModelPatcher.patch_model`` (every patched weight copied to fp32, ΔW added by the
patch objects, written back), with the share of it spent inside the patches'
``calculate_weight``. Each is unpatched after; the best of REPEATS runs is printed
as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_package(name: str, folder: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(comfy_dir: str, checkpoint: str, lora_path: str, repeats: int = 3) -> dict:
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import torch

    _load_package("loha", os.path.join(REPO, "loha"))
    _load_package("loha_nodes", os.path.join(REPO, "nodes"))
    loaders = sys.modules["loha_nodes.loaders"]

    inside = {"seconds": 0.0}
    calculate = comfy.lora.calculate_weight

    def timed_calculate(*a, **k):
        start = time.perf_counter()
        try:
            return calculate(*a, **k)
        finally:
            inside["seconds"] += time.perf_counter() - start

    comfy.lora.calculate_weight = timed_calculate  # the module attribute ModelPatcher calls
    model, clip, *_ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True)

    def builtin():
        lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
        return comfy.sd.load_lora_for_models(model, clip, lora, 0.8, 0.6)

    def ours():
        loaders._plans.clear()  # time a first load, not a re-run that reuses the plan
        return loaders.apply_loha(model, clip, lora_path, 0.8, 0.6)

    results = {}
    with torch.inference_mode():  # as ComfyUI runs nodes
        for _ in range(repeats):
            for name, make in (("LoraLoader", builtin), ("LohaLoader", ours)):
                start = time.perf_counter()
                patched_model, patched_clip = make()
                node = time.perf_counter() - start
                inside["seconds"] = 0.0
                start = time.perf_counter()
                for patcher in (patched_model, patched_clip.patcher):
                    patcher.patch_model()
                patch = time.perf_counter() - start
                keys = len(patched_model.patches) + len(patched_clip.patcher.patches)
                for patcher in (patched_model, patched_clip.patcher):
                    patcher.unpatch_model()
                run = {"node_s": node, "patch_s": patch, "calculate_s": inside["seconds"], "keys": keys}
                best = results.get(name)
                results[name] = run if best is None or run["patch_s"] < best["patch_s"] else best
    results["threads"] = torch.get_num_threads()
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5]))))
