"""The bypass injection on ComfyUI's low-VRAM path: each layer cast at its forward, patches as weight functions.

    LOHA_COMFYUI_PYTHON tests/comfy_lowvram_bypass.py COMFYUI_DIR CHECKPOINT LOHA

Run with ComfyUI's interpreter. Loads the checkpoint the way ComfyUI does, makes a clone
with our LoHa Loader (bypass) and one with the built-in loader's patches, and runs the
diffusion model on fixed inputs with each clone loaded fully and "partially"
(``patch_model(lowvram_model_memory=1)``: every layer then casts its weight in its own
forward, and the built-in's patches become ``LowVramPatch`` weight functions, as on a
small GPU). Prints, as JSON, the largest differences between the runs.
"""

from __future__ import annotations

import json
import os
import sys

from comfy_patch_time import REPO, _load_package


def main(comfy_dir: str, checkpoint: str, lora_path: str) -> dict:
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import comfy.utils
    import torch

    _load_package("loha", os.path.join(REPO, "loha"))
    _load_package("loha_nodes", os.path.join(REPO, "nodes"))
    loaders = sys.modules["loha_nodes.loaders"]
    model, _, *_ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)
    bypassed = loaders.apply_loha(model, None, lora_path, 0.8, 0, bypass=True)[0]
    builtin = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(lora_path, safe_load=True), 0.8, 0)[0]
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)

    def run(patcher, lowvram: int):
        patcher.patch_model(lowvram_model_memory=lowvram)
        try:
            cast = sum(getattr(m, "comfy_cast_weights", False) for m in patcher.model.modules())
            with torch.inference_mode():
                return patcher.model.apply_model(x, t, c_crossattn=context).float(), cast
        finally:
            patcher.unpatch_model()

    base, _ = run(model, 0)
    full, _ = run(bypassed, 0)
    low, cast = run(bypassed, 1)
    reference, _ = run(builtin, 1)
    after, _ = run(model, 0)

    def largest(a, b):
        return float((a - b).abs().max())

    return {"layers_cast_in_forward": int(cast), "lora_change": largest(full, base),
            "bypass_low_vs_full": largest(low, full), "bypass_low_vs_builtin_low": largest(low, reference),
            "base_after_vs_base": largest(after, base), "scale": float(base.abs().max())}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
