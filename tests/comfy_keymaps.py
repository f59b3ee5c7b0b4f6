"""Run inside a real ComfyUI's Python: its LoRA key maps against the LoHa Loader's, on the meta device.

    python comfy_keymaps.py SPEC.json OUT.json      (cwd: the ComfyUI checkout)

SPEC holds diffusion-model state-dict shapes in diffusers format (built where diffusers
is installed; ComfyUI converts them with its own loader's code) and the names of models
to build from ComfyUI's own classes here. For each model ComfyUI's detection finds, its
``model_lora_keys_unet`` (or ``_clip``) map is compared with what the LoHa Loader
accepts on the same state dict: loha's own map alone (``map_state_dict``) and together
with ComfyUI's (``loha.keyed.host_targets``, as the loader plans). A region is the list
of (key, rows) a name's ΔW lands on, in ΔW's row order (rows None: the whole tensor).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC, OUT = sys.argv[1:3]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its own arguments on import
sys.path.insert(0, os.getcwd())
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.lora  # noqa: E402
import comfy.model_detection as detection  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402

sys.path.insert(0, REPO)
from loha.keyed import host_targets  # noqa: E402
from loha.keys import map_state_dict  # noqa: E402

META = torch.device("meta")
OPS = comfy.ops.disable_weight_init
#: Diffusion models built here from ComfyUI's own classes: published sizes, as ComfyUI's
#: detection (comfy/model_detection.py) describes them where the class has no defaults.
NATIVE = {
    "wan2.1-t2v-1.3b": ("comfy.ldm.wan.model", "WanModel",
                        dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960,
                             freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30)),
    "hunyuan-video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideo",
                      dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768,
                           context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=20,
                           depth_single_blocks=40, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                           qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False)),
    "hunyuan-dit": ("comfy.ldm.hydit.models", "HunYuanDiT", {}),
    "mochi": ("comfy.ldm.genmo.joint_model.asymm_models_joint", "AsymmDiTJoint",
              dict(depth=48, patch_size=2, num_heads=24, hidden_size_x=3072, hidden_size_y=1536, mlp_ratio_x=4.0,
                   mlp_ratio_y=4.0, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True,
                   patch_embed_bias=True, timestep_mlp_bias=True, use_t5=True, t5_feat_dim=4096,
                   t5_token_length=256)),
    "hidream": ("comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel",
                dict(attention_head_dim=128, axes_dims_rope=[64, 32, 32], caption_channels=[4096, 4096],
                     max_resolution=[128, 128], in_channels=16, llama_layers=list(range(32)) + [31] * 16,
                     num_attention_heads=20, num_routed_experts=4, num_activated_experts=2, num_layers=16,
                     num_single_layers=32, out_channels=16, patch_size=2, text_emb_dim=2048)),
    "ace-step": ("comfy.ldm.ace.model", "ACEStepTransformer2DModel", {}),
    "omnigen2": ("comfy.ldm.omnigen.omnigen2", "OmniGen2Transformer2DModel", {}),
    "stable-cascade-c": ("comfy.ldm.cascade.stage_c", "StageC", {}),
}
#: Text-encoder models: (module, class, kwargs).
CLIPS = {
    "sd1": ("comfy.sd1_clip", "SD1ClipModel", {}),
    "sd2": ("comfy.text_encoders.sd2_clip", "SD2ClipModel", {}),
    "sdxl": ("comfy.sdxl_clip", "SDXLClipModel", {}),
    "sd3": ("comfy.text_encoders.sd3_clip", "SD3ClipModel", {}),
    "flux": ("comfy.text_encoders.flux", "FluxClipModel", {}),
    "pixart": ("comfy.text_encoders.pixart_t5", "PixArtT5XXL", {}),
    "wan": ("comfy.text_encoders.wan", "WanT5Model", {}),
}


def _class(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def model_from_diffusers(shapes: dict):
    """ComfyUI's diffusion-model loader's steps (comfy.sd.load_diffusion_model_state_dict) on meta tensors."""
    sd = {k: torch.empty(v, device=META) for k, v in shapes.items()}
    # SD2's loader reads one norm's values to tell v-prediction: give it zeros (eps, as SD2-base)
    sd.update({k: torch.zeros(v.shape) for k, v in sd.items() if k.endswith("transformer_blocks.0.norm1.bias")})
    model_config = detection.model_config_from_unet(sd, "")
    if model_config is None:
        converted = detection.convert_diffusers_mmdit(dict(sd), "")
        if converted is not None:
            sd, model_config = converted, detection.model_config_from_unet(converted, "")
        else:
            model_config = detection.model_config_from_diffusers_unet(sd)
            keys = comfy.utils.unet_to_diffusers(model_config.unet_config)
            sd = {keys[k]: v for k, v in sd.items() if k in keys}
    return model_config.get_model(sd, "", device=META)


def model_native(module: str, cls: str, kwargs: dict):
    """One of ComfyUI's own diffusion-model classes on meta, then ComfyUI's detection on its weights."""
    net = _class(module, cls)(**kwargs, device=META, operations=OPS)
    sd = dict(net.state_dict())
    model_config = detection.model_config_from_unet(sd, "")
    if model_config is None:
        raise RuntimeError(f"ComfyUI's detection does not recognise its own {cls}")
    return model_config.get_model(sd, "", device=META)


def encode(value) -> list:
    """A key-map value as a region: [[key, rows or None], ...] (None: not a LoHa-able form)."""
    key, offset, function = (value, None, None) if isinstance(value, str) else (*value, None, None)[:3]
    if offset is not None and offset[0] != 0:
        return None
    rows = None if offset is None else [offset[1], offset[1] + offset[2]]
    if function is None:
        return [[key, rows]]
    if getattr(function, "__name__", "") != "swap_scale_shift":
        return None
    return [[key, "swapped", rows]]


def region(target) -> list:
    return [[p.key, list(p.rows) if p.rows else None] for p in (target.pieces or (target,))]


def canonical(expected: list, shapes: dict) -> list:
    """ComfyUI's region in loha's terms: whole-tensor rows as None, a swap as its two halves."""
    if expected[0][1] == "swapped":
        key, _, rows = expected[0]
        start, stop = rows or (0, shapes[key][0])
        half = (start + stop) // 2
        return [[key, [half, stop]], [key, [start, half]]]
    key, rows = expected[0]
    return [[key, None if rows is None or rows == [0, shapes[key][0]] else rows]]


def compare(model_keys: dict, shapes: dict) -> dict:
    """ComfyUI's (name -> region) for ≥2-D targets against loha's own map and the loader's union."""
    ours = map_state_dict(shapes)
    union = map_state_dict(shapes)
    union.extend(host_targets(model_keys, shapes, union))
    result = {"family": ours.family, "comfy": 0, "same": 0, "missing": [], "different": [], "union_wrong": [],
              "not_loha": []}
    for name, value in model_keys.items():
        expected = encode(value)
        key = expected[0][0] if expected else (value if isinstance(value, str) else value[0])
        if expected is None or len(shapes.get(key, ())) < 2:
            result["not_loha"].append(name)
            continue
        expected = canonical(expected, shapes)
        result["comfy"] += 1
        found = ours.lookup(name)
        if found is None:
            result["missing"].append(name)
        elif region(found) == expected:
            result["same"] += 1
        else:
            result["different"].append([name, expected, region(found)])
        in_union = union.lookup(name)
        if in_union is None or region(in_union) != expected:
            result["union_wrong"].append([name, expected, None if in_union is None else region(in_union)])
    return result


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    out = {}
    jobs = [(name, lambda s=shapes: model_from_diffusers(s)) for name, shapes in spec["diffusers"].items()]
    jobs += [(name, lambda n=name: model_native(*NATIVE[n])) for name in spec["native"]]
    for name, build in jobs:
        try:
            model = build()
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            key_map = comfy.lora.model_lora_keys_unet(model, {})
            out[name] = {"class": type(model).__name__, **compare(key_map, shapes)}
        except Exception:
            out[name] = {"error": traceback.format_exc(limit=4)}
    for name in spec["clip"]:
        try:
            module, cls, kwargs = CLIPS[name]
            model = _class(module, cls)(device=META, **kwargs)
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            key_map = comfy.lora.model_lora_keys_clip(model, {})
            out[f"clip:{name}"] = {"class": cls, **compare(key_map, shapes)}
        except Exception:
            out[f"clip:{name}"] = {"error": traceback.format_exc(limit=4)}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(SPEC, OUT)
