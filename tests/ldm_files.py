"""LDM-layout checkpoint state dicts of the tiny test models (what people download).

SD1: UNet under model.diffusion_model., CLIP-L under cond_stage_model.transformer.
SDXL: CLIP-L under conditioner.embedders.0.transformer., the second encoder in
OpenCLIP layout under conditioner.embedders.1.model. (q/k/v fused into in_proj).
"""

from __future__ import annotations

import torch

from loha.demo import UNET_PREFIX, to_ldm, unet_key_map


def sd1_state(parts: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in to_ldm(parts["unet"].state_dict(), parts["text_encoder"].state_dict()).items()}


def _openclip(text_sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text model's weights in OpenCLIP layout (fused q/k/v), under `prefix`."""
    sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for n in layers:
        hf, oc = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            out[oc + f"attn.in_proj_{param}"] = torch.cat(
                [sd[hf + f"self_attn.{p}_proj.{param}"] for p in ("q", "k", "v")])
            out[oc + f"attn.out_proj.{param}"] = sd[hf + f"self_attn.out_proj.{param}"]
            out[oc + f"ln_1.{param}"] = sd[hf + f"layer_norm1.{param}"]
            out[oc + f"ln_2.{param}"] = sd[hf + f"layer_norm2.{param}"]
            out[oc + f"mlp.c_fc.{param}"] = sd[hf + f"mlp.fc1.{param}"]
            out[oc + f"mlp.c_proj.{param}"] = sd[hf + f"mlp.fc2.{param}"]
    out[prefix + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd["final_layer_norm.bias"]
    if "text_projection.weight" in text_sd:
        out[prefix + "text_projection"] = text_sd["text_projection.weight"].t()
    return out


def sdxl_state(parts: dict) -> dict[str, torch.Tensor]:
    unet_sd = parts["unet"].state_dict()
    out = {UNET_PREFIX + ldm: unet_sd[k] for k, ldm in unet_key_map(unet_sd).items()}
    te1 = parts["text_encoder"].state_dict()
    out.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                for k, v in te1.items()})
    out.update(_openclip(parts["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
