"""diffusers parts -> an LDM (CompVis) checkpoint, as ComfyUI and the WebUI load them.

diffusers and the trainers hold ``UNet2DConditionModel`` / ``CLIPTextModel`` /
``AutoencoderKL`` modules; single-file checkpoints hold one LDM state dict. Both
directions go through one *plan*: for every tensor of the checkpoint, which tensors of
which diffusers part it is made of and how (copied, q/k/v concatenated, transposed,
reshaped to a 1×1 conv) — or that it is a constant real checkpoints carry and
diffusers does not (``position_ids``, OpenCLIP's ``logit_scale``, SD2's unused 24th
text layer and ``text_projection``). The plan is built from shapes alone, so it also
writes a checkpoint tensor by tensor (:func:`save_checkpoint`) and, inverted, loads one
into modules built on the meta device (`from_ldm.diffusers_parts`).

UNet names come from `loha.keys.unet` (the block tables the name map uses), where each
part sits from `loha.families.CHECKPOINT_PARTS`; text encoders and the VAE from the
tables below.

    sd = ldm_state_dict({"unet": unet, "text_encoder": te})       # SD1 checkpoint dict
    save_checkpoint("model.safetensors", pipe.components, dtype=torch.float16)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import LohaError
from ..families import CHECKPOINT_PARTS, TEXT_MODEL_LEVEL, CheckpointPart, checkpoint_parts, family_of_parts
from ..files.safetensors_io import Entry, data_order, dtype_name, write_streamed
from ..keys.text import OPENCLIP_MODULES, OPENCLIP_QKV
from ..keys.unet import unet_key_map

__all__ = ["Source", "constant", "ldm_plan", "ldm_state_dict", "plan_part", "save_checkpoint", "source_dtype", "write_planned"]

#: HF CLIP (without ``text_model.``) -> OpenCLIP names outside the layers.
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
#: OpenCLIP's trained logit scale (ln 100); no text-to-image model reads it.
LOGIT_SCALE = math.log(100.0)

#: diffusers VAE module renames (inside any block) and mid-attention renames.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(\w+)\.(\d+)\.(.+)")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Source:
    """How one checkpoint tensor is made from the diffusers part ``part``.

    ``extra`` tensors exist only for the checkpoint's sake (constants, SD2's unused
    last text layer): they are written but never read back.
    """

    part: str
    keys: tuple[str, ...]  # the part's state-dict keys it is made of
    op: str  # a key of _OPS
    shape: tuple[int, ...]
    extra: bool = False


_OPS = {
    "copy": lambda ts, shape: ts[0],
    "cat": lambda ts, shape: torch.cat(ts),
    "t": lambda ts, shape: ts[0].t(),
    "conv": lambda ts, shape: ts[0].reshape(shape),
    "positions": lambda ts, shape: torch.arange(shape[-1], dtype=torch.int64).expand(shape),
    "logit_scale": lambda ts, shape: torch.tensor(LOGIT_SCALE),
    "eye": lambda ts, shape: torch.eye(shape[0]),
}
#: Integer constants keep their dtype whatever the checkpoint's float dtype.
_INT_OPS = {"positions"}


def _plan_unet(attr: str, shapes: Mapping, part: CheckpointPart) -> dict[str, Source]:
    mapping = unet_key_map(shapes, from_ldm=False)
    return {part.prefix + ldm: Source(attr, (key,), "copy", shapes[key]) for key, ldm in mapping.items()}


def _plan_clip(attr: str, shapes: Mapping, part: CheckpointPart) -> dict[str, Source]:
    plan = {}
    for key, shape in shapes.items():
        name = key.removeprefix(TEXT_MODEL_LEVEL)
        level = "" if name == "text_projection.weight" else TEXT_MODEL_LEVEL
        plan[part.prefix + level + name] = Source(attr, (key,), "copy", shape)
    positions = part.prefix + TEXT_MODEL_LEVEL + "embeddings.position_ids"
    if positions not in plan:  # a persistent buffer before transformers 4.31; SD checkpoints carry it
        count = _text_shape(shapes, "embeddings.position_embedding.weight")[0]
        plan[positions] = Source(attr, (), "positions", (1, count), extra=True)
    return plan


def _plan_openclip(attr: str, shapes: Mapping, part: CheckpointPart) -> dict[str, Source]:
    canonical = {key.removeprefix(TEXT_MODEL_LEVEL): key for key in shapes}
    plan, layers = {}, set()
    for name, key in canonical.items():
        shape = shapes[key]
        if name in OPENCLIP_TOP:
            plan[part.prefix + OPENCLIP_TOP[name]] = Source(attr, (key,), "copy", shape)
        elif name == "text_projection.weight":  # OpenCLIP multiplies x @ P: stored transposed
            plan[part.prefix + "text_projection"] = Source(attr, (key,), "t", shape[::-1])
        elif match := _LAYER.fullmatch(name):
            index, module, param = match.groups()
            layers.add(int(index))
            block = f"{part.prefix}transformer.resblocks.{index}."
            if module in OPENCLIP_QKV:
                if module == OPENCLIP_QKV[0]:
                    parts = tuple(canonical[f"encoder.layers.{index}.{m}.{param}"] for m in OPENCLIP_QKV)
                    fused = (sum(shapes[p][0] for p in parts), *shape[1:])
                    plan[f"{block}attn.in_proj_{param}"] = Source(attr, parts, "cat", fused)
            elif module in OPENCLIP_MODULES:
                plan[f"{block}{OPENCLIP_MODULES[module]}.{param}"] = Source(attr, (key,), "copy", shape)
            else:
                raise LohaError(f"text encoder '{attr}': no OpenCLIP name for '{key}' {tuple(shape)}")
        elif name != "embeddings.position_ids":
            raise LohaError(f"text encoder '{attr}': no OpenCLIP name for '{key}' {tuple(shape)}")
    width = _text_shape(shapes, "embeddings.token_embedding.weight")[1]
    if part.prefix + "text_projection" not in plan:  # SD2: its encoder has none, checkpoints do
        plan[part.prefix + "text_projection"] = Source(attr, (), "eye", (width, width), extra=True)
    plan[part.prefix + "logit_scale"] = Source(attr, (), "logit_scale", (), extra=True)
    if part.depth is not None and len(layers) == part.depth - 1:
        last = f"{part.prefix}transformer.resblocks.{part.depth - 2}."
        for ldm, source in list(plan.items()):
            if ldm.startswith(last):
                copy = ldm.replace(last, f"{part.prefix}transformer.resblocks.{part.depth - 1}.")
                plan[copy] = Source(attr, source.keys, source.op, source.shape, extra=True)
    return plan


def _vae_name(key: str, up_levels: int) -> tuple[str, bool]:
    """(LDM name, is a mid-attention projection stored as a 1×1 conv) of a diffusers VAE key."""
    module, _, param = key.rpartition(".")
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}", False
    match = _VAE_BLOCK.fullmatch(module)
    if match is None:
        return key, False  # conv_in, conv_out, quant_conv, post_quant_conv
    side, area, level, kind, index, inner = match.groups()
    if area == "mid_block" and kind == "attentions":
        inner = _VAE_ATTENTION.get(inner, inner)
        return f"{side}.mid.attn_1.{inner}.{param}", inner in ("q", "k", "v", "proj_out") and param == "weight"
    inner = _VAE_RESNET.get(inner, inner)
    if area == "mid_block":
        return f"{side}.mid.block_{int(index) + 1}.{inner}.{param}", False
    ldm_level = int(level) if area == "down_blocks" else up_levels - 1 - int(level)
    where = {"resnets": f"block.{index}", "downsamplers": "downsample", "upsamplers": "upsample"}[kind]
    return f"{side}.{area[:-len('_blocks')]}.{ldm_level}.{where}.{inner}.{param}", False


def _plan_vae(attr: str, shapes: Mapping, part: CheckpointPart) -> dict[str, Source]:
    up_levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up_blocks."))
    plan = {}
    for key, shape in shapes.items():
        name, conv = _vae_name(key, up_levels)
        source = Source(attr, (key,), "conv", (*shape, 1, 1)) if conv else Source(attr, (key,), "copy", shape)
        plan[part.prefix + name] = source
    return plan


_PLANNERS = {"unet": _plan_unet, "clip": _plan_clip, "openclip": _plan_openclip, "vae": _plan_vae}


def _text_shape(shapes: Mapping, name: str) -> tuple[int, ...]:
    for key in (name, TEXT_MODEL_LEVEL + name):
        if key in shapes:
            return tuple(shapes[key])
    raise LohaError(f"text encoder state dict has no '{name}'")


def plan_part(attr: str, shapes: Mapping, part: CheckpointPart) -> dict[str, Source]:
    """Checkpoint key -> Source for one part given as {state-dict key: shape}."""
    return _PLANNERS[part.kind](attr, {k: tuple(v) for k, v in shapes.items()}, part)


def ldm_plan(shapes: Mapping[str, Mapping], family: str) -> dict[str, Source]:
    """Checkpoint key -> Source, for parts given as {attr: {state-dict key: shape}}."""
    parts = checkpoint_parts(family)
    out = {}
    for attr, part_shapes in shapes.items():
        if attr not in parts:
            raise LohaError(f"a {family} checkpoint has no part '{attr}' (it has: {', '.join(parts)})")
        out.update(plan_part(attr, part_shapes, parts[attr]))
    return out


def constant(source: Source, dtype: torch.dtype) -> torch.Tensor:
    """A tensor made from no part (position ids, logit scale, identity projection)."""
    return _OPS[source.op]([], source.shape).to(source_dtype(source, dtype))


def source_dtype(source: Source, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype a planned tensor is written in: integer constants keep theirs."""
    return torch.int64 if source.op in _INT_OPS else float_dtype


# --------------------------------------------------------------------------- writing


def _state(part) -> Mapping[str, torch.Tensor]:
    return part.state_dict() if isinstance(part, torch.nn.Module) else part


#: Pipeline attributes that are checkpoint parts (``pipe.components`` holds others too).
_CHECKPOINT_ATTRIBUTES = {attr for parts in CHECKPOINT_PARTS.values() for attr in parts}


def _states(parts: Mapping) -> dict[str, Mapping[str, torch.Tensor]]:
    return {attr: _state(part) for attr, part in parts.items()
            if part is not None and attr in _CHECKPOINT_ATTRIBUTES}


def _plan_states(states: Mapping[str, Mapping], family: str | None) -> dict[str, Source]:
    shapes = {attr: {k: v.shape for k, v in state.items()} for attr, state in states.items()}
    return ldm_plan(shapes, family or family_of_parts(states))


def _build(source: Source, states: Mapping, dtype: torch.dtype | None) -> torch.Tensor:
    tensors = [states[source.part][key] for key in source.keys]
    out = _OPS[source.op](tensors, source.shape)
    if source.op in _INT_OPS:
        return out
    return out.to(dtype if dtype is not None else _float_dtype(states[source.part]))


def ldm_state_dict(parts: Mapping, family: str | None = None) -> dict[str, torch.Tensor]:
    """The complete LDM checkpoint state dict of diffusers parts.

    ``parts`` maps pipeline attributes (``unet``, ``text_encoder``, ``text_encoder_2``,
    ``vae``; others and None are ignored, so ``pipe.components`` works) to modules or
    their state dicts.  ``family`` ("sd1", "sd2", "sdxl") is detected when None.
    Copied tensors share storage with the parts; fused and transposed ones are new.
    """
    states = _states(parts)
    return {key: _build(source, states, None) for key, source in _plan_states(states, family).items()}


def save_checkpoint(path, parts: Mapping, dtype: torch.dtype | None = None, metadata: Mapping | None = None,
                    family: str | None = None) -> str:
    """Write :func:`ldm_state_dict` of ``parts`` as safetensors, one tensor at a time.

    ``dtype`` casts floating tensors (``position_ids`` stay int64).  Only one
    converted tensor is alive at a time, so memory stays at the parts' own size.
    """
    states = _states(parts)
    sources = _plan_states(states, family)

    def entry_dtype(source: Source) -> torch.dtype:
        return source_dtype(source, dtype if dtype is not None else _float_dtype(states[source.part]))

    write_planned(path, sources, entry_dtype, lambda key: _build(sources[key], states, dtype), metadata)
    return os.fspath(path)


def _float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def write_planned(path, sources: Mapping[str, Source], entry_dtype, tensor_of, metadata) -> None:
    """Stream ``tensor_of(key)`` for every planned key into a safetensors file (atomically),
    making the next tensor while the current one is written."""
    entries = data_order(Entry(key, dtype_name(entry_dtype(s)), s.shape) for key, s in sources.items())
    write_streamed(path, entries, metadata, tensor_of, prefetch=True)
