"""Full-size SD1.5 files with seeded random weights, for tests against a real WebUI.

`build_checkpoint` writes an LDM-layout checkpoint by instantiating the WebUI's own
SD1.5 config in the WebUI's Python (so the layout is exactly what it loads); weights
are re-drawn with std 1/sqrt(fan_in), so no layer is zero (LDM zero-initialises its
output convolutions, which would hide a network's effect on them).
`build_networks` makes LoHa (plain and Tucker) and LoRA files with lycoris-lora on a
full-size diffusers UNet and CLIP text encoder, with kohya's text-encoder names.

    python tests/webui_assets.py checkpoint WEBUI_DIR WEBUI_PYTHON OUT
    python tests/webui_assets.py networks FOLDER
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

#: CLIP ViT-L/14 text encoder as SD1.x uses it.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=49407, pad_token_id=1)
TAGS = {"5_sample": {"red fox": 12, "forest": 7, "snow": 3}}

_CHECKPOINT_SCRIPT = r"""
import math, sys, torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
webui, out, clip_config = sys.argv[1], sys.argv[2], eval(sys.argv[3])
sys.path.insert(0, webui + "/repositories/stable-diffusion-stability-ai")
from ldm.util import instantiate_from_config
from transformers import CLIPTextConfig, CLIPTextModel
params = OmegaConf.load(webui + "/configs/v1-inference.yaml").model.params
parts = {
    "model.diffusion_model.": instantiate_from_config(params.unet_config),
    "first_stage_model.": instantiate_from_config(params.first_stage_config),
    "cond_stage_model.transformer.": CLIPTextModel(CLIPTextConfig(**clip_config)),
}
g = torch.Generator().manual_seed(1234)
state = {}
for prefix, module in parts.items():
    for key, t in module.state_dict().items():
        if t.is_floating_point() and t.dim() >= 2:
            t = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        elif t.is_floating_point() and key.endswith("bias"):
            t = torch.randn(t.shape, generator=g) * 0.01
        state[prefix + key] = t.to(torch.float16) if t.is_floating_point() else t
    del module
save_file({k: v.contiguous() for k, v in state.items()}, out)
"""


def build_checkpoint(webui_dir: str, webui_python: str, out: str) -> str:
    """A random-weight SD1.5 checkpoint (fp16, LDM layout) made in the WebUI's own Python."""
    subprocess.run([webui_python, "-c", _CHECKPOINT_SCRIPT, webui_dir, out, repr(CLIP_L)], check=True)
    return out


def _full_size_parts(seed: int = 0) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loha.models.configs import PUBLISHED

    torch.manual_seed(seed)
    return {"unet": UNet2DConditionModel(**PUBLISHED["sd1"]["unet"]).eval(),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()}


def _kohya_text_names(path: str) -> None:
    """Write text-encoder names as kohya does (transformers 5 dropped `text_model`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata)


#: lycoris-lora's "full" preset (every kind of layer: attention, feed-forward, 3×3 and 1×1
#: convolutions, down-sampler, conv_in/out, time embedding, text encoder) on the 320-channel
#: levels only, which keeps the WebUI's weight backups, and so its memory, small.
E2E_PRESET = """
enable_conv = true
use_fnmatch = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
exclude_name = ["down_blocks.[123]*", "mid_block*", "up_blocks.[012]*"]
"""
#: file name -> (algo, seed, extra lycoris-lora arguments), all at rank 4, alpha 2.
NETWORKS = {
    "test": ("loha", 1, {}),
    "tucker": ("loha", 2, {"use_tucker": True}),
    "a": ("lora", 3, {}),
}


def build_networks(folder: str) -> dict[str, str]:
    """LoHa/LoRA files for SD1.5 made by lycoris-lora, plus the WebUI sidecars for "test".

    lycoris-lora keeps a preset in class attributes, so call this in a process of its own.
    """
    os.makedirs(folder, exist_ok=True)
    parts = _full_size_parts()
    preset = os.path.join(folder, "e2e-preset.toml")
    with open(preset, "w") as f:
        f.write(E2E_PRESET)
    paths = {}
    for name, (algo, seed, kwargs) in NETWORKS.items():
        net = _lycoris(parts, algo, seed, preset, **kwargs)
        path = os.path.join(folder, f"{name}.safetensors")
        metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo}),
                    "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1",
                    "ss_tag_frequency": json.dumps(TAGS), "ss_output_name": name}
        net.save_weights(path, torch.float32, metadata)
        _kohya_text_names(path)
        paths[name] = path
        for module in net.unet_loras + net.text_encoder_loras:
            module.restore()
        del net
    os.remove(preset)
    with open(os.path.join(folder, "test.json"), "w", encoding="utf-8") as f:
        json.dump({"description": "A plain LoHa made by lycoris-lora", "preferred weight": 0.8}, f)
    _preview(os.path.join(folder, "test.preview.png"))
    return paths


def _lycoris(parts: dict, algo: str, seed: int, preset: str, **kwargs):
    """A lycoris-lora network on `parts` whose zero-initialised factor is randomised (ΔW ≠ 0)."""
    import logging

    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    te, unet = parts["text_encoder"], parts["unet"]
    net = create_network(1.0, 4, 2.0, None, te, unet, algo=algo, conv_dim=4, conv_alpha=2.0, preset=preset, **kwargs)
    net.apply_to(te, unet, True, True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in net.unet_loras + net.text_encoder_loras:
            (module.hada_w2_a if algo == "loha" else module.lora_up.weight).normal_(std=0.1)
    return net


def _preview(path: str) -> None:
    """A small gradient picture as the card's preview."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:128, 0:128]
    rgb = np.stack([x * 2, y * 2, 255 - x - y // 2], axis=-1).clip(0, 255).astype("uint8")
    Image.fromarray(rgb).save(path)


if __name__ == "__main__":
    if sys.argv[1] == "checkpoint":
        build_checkpoint(*sys.argv[2:5])
    else:
        print(build_networks(sys.argv[2]))
