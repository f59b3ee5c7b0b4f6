"""Run inside a real Forge's Python: a small diffusion transformer through Forge's own loader and
patchers, one LoHa through the built-in Lora and through the extension, and the weights each
makes Forge patch.

    python forge_families.py SPEC.json OUT_DIR      (cwd: the Forge checkout)

SPEC: {"checkpoint": an all-in-one file (model.diffusion_model., text_encoders., vae.),
"lora": the LoHa, "strength", "unet_config": sizes, "configs": {component: config.json}}.

Forge's detection (huggingface_guess) knows only the published sizes, and its loader builds
the text encoders and the VAE from the configs it bundles for the published model; here
the detection's answer gets the small model's sizes and a copy of that bundle with the
small configs. All else is Forge's own: `forge_loader`, the engine and its patchers, the
built-in Lora's `load_lora_for_models`, the LoRA merging that runs when a patcher's model
is loaded (`refresh_loras`), and the extension script as the WebUI imports it (the weight
calculator it registers, Forge's key map it passes to the patches).

Writes OUT_DIR/{base,builtin,ours,again}.safetensors (every weight of the diffusion model
and the text encoders: before, with the built-in's patches, with ours, after ours left)
and OUT_DIR/report.json (the built-in's log lines, the names ours left unmatched).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC, OUT = sys.argv[1:3]
sys.argv = [sys.argv[0], "--always-cpu", "--skip-version-check", "--data-dir", os.path.join(OUT, "data")]
sys.path.insert(0, os.getcwd())

from modules_forge.initialization import initialize_forge  # noqa: E402

initialize_forge()
from modules import initialize  # noqa: E402

initialize.imports()
import huggingface_guess  # noqa: E402
import torch  # noqa: E402
from backend.loader import forge_loader  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(os.getcwd(), "extensions-builtin", "sd_forge_lora"))
import networks as builtin_lora  # noqa: E402  (the built-in Lora extension's module)

from loha.hosts.webui import parse_request  # noqa: E402


def extension_script():
    """scripts/loha_webui.py, imported as the WebUI imports an extension's script."""
    spec = importlib.util.spec_from_file_location("loha_webui", os.path.join(REPO, "scripts", "loha_webui.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_detection(unet_config: dict, configs: dict):
    """Forge's detection, answering with the small model's sizes and a bundle of small configs."""
    real_guess = huggingface_guess.guess

    def guess(state_dict):
        found = real_guess(state_dict)
        bundle = os.path.join(OUT, os.path.basename(found.huggingface_repo) + "-small")
        if not os.path.isdir(bundle):
            shutil.copytree(os.path.join(os.getcwd(), "backend", "huggingface", found.huggingface_repo), bundle)
            for component, config in configs.items():
                with open(os.path.join(bundle, component, "config.json"), "w") as f:
                    json.dump(config, f)
        found.unet_config.update(unet_config)
        found.huggingface_repo = bundle  # os.path.join(…, an absolute path) is that path
        return found

    huggingface_guess.guess = guess


def patched_weights(objects, dtypes: dict | None = None) -> dict:
    """Every weight of the diffusion model and the text encoders as Forge samples with `objects`
    (in fp32; `dtypes` gets the dtype Forge keeps each in)."""
    weights = {}
    for part, patcher in (("model", objects.unet), ("clip", objects.clip.patcher)):
        patcher.refresh_loras()  # what loading the patcher's model for sampling runs
        for key, value in patcher.model.state_dict().items():
            weights[f"{part}.{key}"] = value.detach().float().clone()
            if dtypes is not None:
                dtypes[f"{part}.{key}"] = str(value.dtype).removeprefix("torch.")
    return weights


def main() -> None:
    with open(SPEC) as f:
        spec = json.load(f)
    script = extension_script()
    small_detection(spec["unet_config"], spec["configs"])
    engine = forge_loader(spec["checkpoint"])
    original = engine.forge_objects_original
    strength, path = spec["strength"], spec["lora"]
    report = {"engine": type(engine).__name__, "dtypes": {}}
    saved = {"base": patched_weights(original, report["dtypes"])}

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        unet, clip = builtin_lora.load_lora_for_models(
            original.unet, original.clip, builtin_lora.load_lora_state_dict(path), strength, strength, filename=path)
    report["builtin_log"] = log.getvalue().splitlines()
    engine.forge_objects.unet, engine.forge_objects.clip = unet, clip
    saved["builtin"] = patched_weights(engine.forge_objects)

    # ours as the WebUI runs it: the built-in's objects (none of its networks now), then our patches on them
    engine.forge_objects = original.shallow_copy()
    engine.forge_objects_after_applying_lora = original.shallow_copy()
    name = os.path.splitext(os.path.basename(path))[0]
    script.forge_active.wanted = [(parse_request([name, str(strength)], {}, 1.0), path)]
    script.forge_active.apply(engine)
    report["unmatched"] = script.forge_active.unmatched
    saved["ours"] = patched_weights(engine.forge_objects)
    script.forge_active.clear(engine)
    saved["again"] = patched_weights(engine.forge_objects)

    for label, weights in saved.items():
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(OUT, f"{label}.safetensors"))
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
