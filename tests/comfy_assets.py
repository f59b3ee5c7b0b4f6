"""Full-size SD1.5-architecture files for the real-host tests, from seeded random weights.

    python tests/comfy_assets.py OUT_DIR

writes ``OUT_DIR/sd15-random.safetensors`` (an fp16 checkpoint in the LDM layout
people download: UNet, CLIP-L text encoder, VAE; `random_checkpoint`),
``OUT_DIR/loha-sd15.safetensors`` (a LoHa made by lycoris-lora for that
architecture, at a low rank, covering attention, feed-forward, resnets, samplers and
the text encoder; lycoris-lora is given the layers on the meta device, since it only
needs their shapes), ``OUT_DIR/loha-sd15-norm.safetensors``, the same made with
lycoris' ``train_norm`` (w_norm/b_norm modules on every norm layer of those blocks),
``OUT_DIR/loha-sd15-dora.safetensors`` (the same modules with
DoRA, output axis, in LyCORIS's layout; lycoris-lora measures magnitudes from weights it
does not have here, so they are drawn around the row norms of the checkpoint's random
weights, √(1/3)) and ``OUT_DIR/sd15-random-fp8-values.safetensors`` (the UNet alone with
every tensor rounded through fp8_e4m3fn, as ComfyUI's "Load Diffusion Model" with
``weight_dtype fp8_e4m3fn`` holds it, stored in fp16, which holds those values exactly:
the same fp8 model for a loader that does not requantize what it patches). Nothing is
downloaded; only one tensor of the checkpoint (the UNet, for the last file) is in memory
at a time.

lycoris-lora on transformers 5 names text-encoder modules without ``text_model_``;
files in the wild (made under transformers 4) have it, and ComfyUI's built-in loader
only knows that spelling, so the file is written with it.
"""

from __future__ import annotations

import os
import re
import sys

import torch

CHECKPOINT = "sd15-random.safetensors"
LOHA = "loha-sd15.safetensors"
LOHA_NORM = "loha-sd15-norm.safetensors"
LOHA_DORA = "loha-sd15-dora.safetensors"
FP8_VALUES = "sd15-random-fp8-values.safetensors"
#: Bump when the files' content changes (cached copies are rebuilt).
VERSION = "5"
METADATA = {
    "ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1", "ss_network_dim": "4",
    "ss_network_alpha": "2.0", "ss_network_args": '{"algo": "loha", "conv_dim": "4", "conv_alpha": "2.0"}',
    "ss_tag_frequency": '{"1_random": {"random weights": 3, "test": 2, "loha": 1}}',
}


def build(out_dir: str, seed: int = 0) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loha.models.configs import PUBLISHED
    from random_checkpoint import random_checkpoint
    from loha.files.safetensors_io import save
    from tiny_models import lycoris_network

    os.makedirs(out_dir, exist_ok=True)
    _atomic(os.path.join(out_dir, CHECKPOINT), lambda path: random_checkpoint(path, "sd1", seed, torch.float16))
    with torch.device("meta"):  # lycoris-lora needs the layers' shapes only; its factors are real
        parts = {"unet": UNet2DConditionModel(**PUBLISHED["sd1"]["unet"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**PUBLISHED["sd1"]["text_encoder"]))}
    for name, extra in ((LOHA, {}), (LOHA_NORM, {"train_norm": True})):
        network = lycoris_network(parts, seed=seed, dim=4, alpha=2.0, conv_dim=4, conv_alpha=2.0, **extra)
        tensors = {_wild_text_name(k): v.detach().to(torch.float16).contiguous()
                   for k, v in network.state_dict().items()}
        _atomic(os.path.join(out_dir, name), lambda path: save(tensors, path, METADATA))
    generator = torch.Generator().manual_seed(seed + 1)  # the same modules, other factors, and DoRA magnitudes
    network = lycoris_network(parts, seed=seed + 1, dim=4, alpha=2.0, conv_dim=4, conv_alpha=2.0)
    tensors = {_wild_text_name(k): v.detach().to(torch.float16).contiguous() for k, v in network.state_dict().items()}
    for module in network.unet_loras + network.text_encoder_loras:  # LyCORIS's output-axis layout: (O, 1, …)
        weight = module.org_module[0].weight
        scale = 3 ** -0.5 * (1 + 0.1 * torch.randn(weight.shape[0], *[1] * (weight.dim() - 1), generator=generator))
        tensors[_wild_text_name(f"{module.lora_name}.dora_scale")] = scale.to(torch.float16)
    _atomic(os.path.join(out_dir, LOHA_DORA), lambda path: save(tensors, path, METADATA))
    _atomic(os.path.join(out_dir, FP8_VALUES), lambda path: _fp8_values(os.path.join(out_dir, CHECKPOINT), path))


def _fp8_values(checkpoint: str, path: str) -> None:
    """The checkpoint's UNet with every tensor rounded to fp8_e4m3fn (round to nearest), kept in fp16."""
    from loha.files.safetensors_io import Reader, save

    with Reader(checkpoint) as reader:
        unet = {key: reader.read(key).to(torch.float8_e4m3fn).to(torch.float16)
                for key in reader.keys() if key.startswith("model.diffusion_model.")}
    save(unet, path)


def _atomic(path: str, write) -> None:
    partial = path + ".partial"
    write(partial)
    os.replace(partial, path)


def _wild_text_name(key: str) -> str:
    return re.sub(r"^lora_te_encoder_", "lora_te_text_model_encoder_", key)


def ensure(out_dir: str) -> dict[str, str]:
    """Paths of the files in `out_dir` (checkpoint, loha, loha_dora, fp8_values), built there (in a child process) if missing."""
    import subprocess

    paths = {"checkpoint": os.path.join(out_dir, CHECKPOINT), "loha": os.path.join(out_dir, LOHA),
             "loha_norm": os.path.join(out_dir, LOHA_NORM), "loha_dora": os.path.join(out_dir, LOHA_DORA),
             "fp8_values": os.path.join(out_dir, FP8_VALUES)}
    stamp = os.path.join(out_dir, "VERSION")
    current = os.path.isfile(stamp) and open(stamp).read() == VERSION
    if not (current and all(os.path.isfile(p) for p in paths.values())):
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.abspath(__file__), out_dir], check=True, cwd=here,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))})
        with open(stamp, "w") as f:
            f.write(VERSION)
    return paths


if __name__ == "__main__":
    build(sys.argv[1])
