"""Whole Stable Diffusion models between the diffusers and the LDM checkpoint layouts.

ComfyUI and the WebUI load single-file LDM/CompVis checkpoints; diffusers and the
trainers hold ``UNet2DConditionModel`` / ``CLIPTextModel`` / ``AutoencoderKL``
modules.  Both directions go through one *plan*: for every tensor of the
checkpoint, which tensors of which diffusers part it is made of and how (copied,
q/k/v concatenated, transposed, reshaped to a 1×1 conv) — or that it is a constant
real checkpoints carry and diffusers does not (``position_ids``, OpenCLIP's
``logit_scale``, SD2's unused 24th text layer and ``text_projection``).  The plan
is built from shapes alone, so it also writes a checkpoint tensor by tensor
(:func:`save_checkpoint`, :func:`random_checkpoint`) and, inverted, loads one into
modules built on the meta device (:func:`diffusers_parts`).

UNet names come from :func:`loha.keys.unet_key_map` (the block tables the name map
uses); text encoders and the VAE from the tables below.

    sd = ldm_state_dict({"unet": unet, "text_encoder": te})       # SD1 checkpoint dict
    save_checkpoint("model.safetensors", pipe.components, dtype=torch.float16)
    parts = diffusers_parts(sd)                                   # {"unet": …, "text_encoder": …}
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import keys as K
from .errors import LohaError
from .stream import Entry, Writer, data_order, dtype_name

__all__ = [
    "ldm_state_dict", "save_checkpoint", "diffusers_parts", "random_checkpoint", "plan",
    "detect_checkpoint_family", "LAYOUTS", "PUBLISHED",
]


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Layout:
    """Where and how one diffusers part sits in a family's checkpoint."""

    prefix: str
    kind: str  # "unet", "clip" (HF CLIP names), "openclip" (resblocks, fused q/k/v), "vae"
    depth: int | None = None  # OpenCLIP layers the checkpoint holds when diffusers keeps one fewer


_UNET = Layout(K.UNET_STATE_PREFIXES[0], "unet")
_VAE = Layout("first_stage_model.", "vae")
#: family -> pipeline attribute -> layout.
LAYOUTS = {
    "sd1": {"unet": _UNET, "text_encoder": Layout("cond_stage_model.transformer.", "clip"), "vae": _VAE},
    # SD2 runs OpenCLIP-H to its penultimate layer; diffusers drops the 24th, checkpoints keep it.
    "sd2": {"unet": _UNET, "text_encoder": Layout("cond_stage_model.model.", "openclip", depth=24), "vae": _VAE},
    "sdxl": {
        "unet": _UNET,
        "text_encoder": Layout("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": Layout("conditioner.embedders.1.model.", "openclip"),
        "vae": _VAE,
    },
}

_SD_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32,
)
_SD_TEXT = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408, max_position_embeddings=77)
_CLIP_L = dict(_SD_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
#: The published diffusers configs per family and part (what weights cannot tell —
#: attention heads, norm groups, activations — comes from here for full-size models).
PUBLISHED = {
    "sd1": {
        "unet": dict(_SD_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "text_encoder": _CLIP_L,
        "vae": _SD_VAE,
    },
    "sd2": {
        "unet": dict(_SD_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                     use_linear_projection=True),
        "text_encoder": dict(_SD_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=512),
        "vae": _SD_VAE,
    },
    "sdxl": {
        "unet": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        ),
        "text_encoder": _CLIP_L,
        "text_encoder_2": dict(_SD_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
        "vae": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
    },
}
#: Config entries no weight shape tells, per part kind: a non-standard model needs them in `overrides`.
UNREADABLE = {
    "unet": ("attention_head_dim", "norm_num_groups"),
    "clip": ("num_attention_heads",),
    "openclip": ("num_attention_heads",),
    "vae": ("norm_num_groups",),
}
#: The shape facts that make a part "the published one" (so PUBLISHED may fill the rest).
_IDENTITY = {
    "unet": ("block_out_channels", "cross_attention_dim"),
    "clip": ("hidden_size",),
    "openclip": ("hidden_size",),
    "vae": ("block_out_channels",),
}
#: Defaults for text encoders whose size is not published (OpenCLIP's MLP uses exact GELU).
_TEXT_DEFAULTS = {"clip": dict(_SD_TEXT, hidden_act="quick_gelu"), "openclip": dict(_SD_TEXT, hidden_act="gelu")}

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

#: The text encoders diffusers builds with a projection (SD2's has none, though its checkpoint does).
_PROJECTED = ("text_encoder_2",)


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


def _plan_unet(attr: str, shapes: Mapping, layout: Layout) -> dict[str, Source]:
    mapping = K.unet_key_map(shapes, from_ldm=False)
    return {layout.prefix + ldm: Source(attr, (key,), "copy", shapes[key]) for key, ldm in mapping.items()}


def _plan_clip(attr: str, shapes: Mapping, layout: Layout) -> dict[str, Source]:
    plan = {}
    for key, shape in shapes.items():
        name = key.removeprefix(K.TEXT_MODEL_LEVEL)
        level = "" if name == "text_projection.weight" else K.TEXT_MODEL_LEVEL
        plan[layout.prefix + level + name] = Source(attr, (key,), "copy", shape)
    positions = layout.prefix + K.TEXT_MODEL_LEVEL + "embeddings.position_ids"
    if positions not in plan:  # a persistent buffer before transformers 4.31; SD checkpoints carry it
        count = _text_shape(shapes, "embeddings.position_embedding.weight")[0]
        plan[positions] = Source(attr, (), "positions", (1, count), extra=True)
    return plan


def _plan_openclip(attr: str, shapes: Mapping, layout: Layout) -> dict[str, Source]:
    canonical = {key.removeprefix(K.TEXT_MODEL_LEVEL): key for key in shapes}
    plan, layers = {}, set()
    for name, key in canonical.items():
        shape = shapes[key]
        if name in OPENCLIP_TOP:
            plan[layout.prefix + OPENCLIP_TOP[name]] = Source(attr, (key,), "copy", shape)
        elif name == "text_projection.weight":  # OpenCLIP multiplies x @ P: stored transposed
            plan[layout.prefix + "text_projection"] = Source(attr, (key,), "t", shape[::-1])
        elif match := _LAYER.fullmatch(name):
            index, module, param = match.groups()
            layers.add(int(index))
            block = f"{layout.prefix}transformer.resblocks.{index}."
            if module in K.OPENCLIP_QKV:
                if module == K.OPENCLIP_QKV[0]:
                    parts = tuple(canonical[f"encoder.layers.{index}.{m}.{param}"] for m in K.OPENCLIP_QKV)
                    fused = (sum(shapes[p][0] for p in parts), *shape[1:])
                    plan[f"{block}attn.in_proj_{param}"] = Source(attr, parts, "cat", fused)
            elif module in K.OPENCLIP_MODULES:
                plan[f"{block}{K.OPENCLIP_MODULES[module]}.{param}"] = Source(attr, (key,), "copy", shape)
            else:
                raise LohaError(f"text encoder '{attr}': no OpenCLIP name for '{key}' {tuple(shape)}")
        elif name != "embeddings.position_ids":
            raise LohaError(f"text encoder '{attr}': no OpenCLIP name for '{key}' {tuple(shape)}")
    width = _text_shape(shapes, "embeddings.token_embedding.weight")[1]
    if layout.prefix + "text_projection" not in plan:  # SD2: its encoder has none, checkpoints do
        plan[layout.prefix + "text_projection"] = Source(attr, (), "eye", (width, width), extra=True)
    plan[layout.prefix + "logit_scale"] = Source(attr, (), "logit_scale", (), extra=True)
    if layout.depth is not None and len(layers) == layout.depth - 1:
        last = f"{layout.prefix}transformer.resblocks.{layout.depth - 2}."
        for ldm, source in list(plan.items()):
            if ldm.startswith(last):
                copy = ldm.replace(last, f"{layout.prefix}transformer.resblocks.{layout.depth - 1}.")
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


def _plan_vae(attr: str, shapes: Mapping, layout: Layout) -> dict[str, Source]:
    up_levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up_blocks."))
    plan = {}
    for key, shape in shapes.items():
        name, conv = _vae_name(key, up_levels)
        source = Source(attr, (key,), "conv", (*shape, 1, 1)) if conv else Source(attr, (key,), "copy", shape)
        plan[layout.prefix + name] = source
    return plan


_PLANNERS = {"unet": _plan_unet, "clip": _plan_clip, "openclip": _plan_openclip, "vae": _plan_vae}


def _text_shape(shapes: Mapping, name: str) -> tuple[int, ...]:
    for key in (name, K.TEXT_MODEL_LEVEL + name):
        if key in shapes:
            return tuple(shapes[key])
    raise LohaError(f"text encoder state dict has no '{name}'")


def plan(shapes: Mapping[str, Mapping], family: str) -> dict[str, Source]:
    """Checkpoint key -> Source, for parts given as {attr: {state-dict key: shape}}."""
    layouts = _layouts(family)
    out = {}
    for attr, part_shapes in shapes.items():
        if attr not in layouts:
            raise LohaError(f"a {family} checkpoint has no part '{attr}' (it has: {', '.join(layouts)})")
        layout = layouts[attr]
        part_shapes = {k: tuple(v) for k, v in part_shapes.items()}
        out.update(_PLANNERS[layout.kind](attr, part_shapes, layout))
    return out


def _layouts(family: str) -> dict[str, Layout]:
    if family not in LAYOUTS:
        raise LohaError(f"unknown model family {family!r} (known: {', '.join(LAYOUTS)})")
    return LAYOUTS[family]


# --------------------------------------------------------------------------- diffusers -> LDM


#: Pipeline attributes that are checkpoint parts (``pipe.components`` holds others too).
_KNOWN_PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _state(part) -> Mapping[str, torch.Tensor]:
    return part.state_dict() if isinstance(part, torch.nn.Module) else part


def _states(parts: Mapping) -> dict[str, Mapping[str, torch.Tensor]]:
    return {attr: _state(part) for attr, part in parts.items() if part is not None and attr in _KNOWN_PARTS}


def _family_of(states: Mapping[str, Mapping]) -> str:
    unet = states.get("unet", {})
    context = next((tuple(v.shape)[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")), None)
    widths = {}
    for attr, component in (("text_encoder", "te1"), ("text_encoder_2", "te2")):
        if attr in states:
            widths[component] = _text_shape({k: v.shape for k, v in states[attr].items()},
                                             "embeddings.token_embedding.weight")[1]
    return K.detect_family(context, widths)


def _build(source: Source, states: Mapping, dtype: torch.dtype | None) -> torch.Tensor:
    tensors = [states[source.part][key] for key in source.keys]
    out = _OPS[source.op](tensors, source.shape)
    if source.op in _INT_OPS:
        return out
    if dtype is None:
        dtype = next((v.dtype for v in states[source.part].values() if v.is_floating_point()), torch.float32)
    return out.to(dtype)


def ldm_state_dict(parts: Mapping, family: str | None = None) -> dict[str, torch.Tensor]:
    """The complete LDM checkpoint state dict of diffusers parts.

    ``parts`` maps pipeline attributes (``unet``, ``text_encoder``, ``text_encoder_2``,
    ``vae``; others and None are ignored, so ``pipe.components`` works) to modules or
    their state dicts.  ``family`` ("sd1", "sd2", "sdxl") is detected when None.
    Copied tensors share storage with the parts; fused and transposed ones are new.
    """
    states = _states(parts)
    family = family or _family_of(states)
    sources = plan({attr: {k: v.shape for k, v in s.items()} for attr, s in states.items()}, family)
    return {key: _build(source, states, None) for key, source in sources.items()}


def save_checkpoint(path, parts: Mapping, dtype: torch.dtype | None = None, metadata: Mapping | None = None,
                    family: str | None = None) -> str:
    """Write :func:`ldm_state_dict` of ``parts`` as safetensors, one tensor at a time.

    ``dtype`` casts floating tensors (``position_ids`` stay int64).  Only one
    converted tensor is alive at a time, so memory stays at the parts' own size.
    """
    states = _states(parts)
    family = family or _family_of(states)
    sources = plan({attr: {k: v.shape for k, v in s.items()} for attr, s in states.items()}, family)

    def tensor(key: str) -> torch.Tensor:
        return _build(sources[key], states, dtype)

    def entry_dtype(source: Source) -> torch.dtype:
        if source.op in _INT_OPS:
            return torch.int64
        if dtype is not None:
            return dtype
        return next((v.dtype for v in states[source.part].values() if v.is_floating_point()), torch.float32)

    _write(path, sources, entry_dtype, tensor, metadata)
    return os.fspath(path)


def _write(path, sources: Mapping[str, Source], entry_dtype, tensor, metadata) -> None:
    """Stream ``tensor(key)`` for every planned key into a safetensors file (atomically).

    The next tensor is made on a worker thread while the current one is written:
    both release the GIL, so making and writing overlap; two tensors at most are alive.
    """
    entries = data_order(Entry(key, dtype_name(entry_dtype(s)), s.shape) for key, s in sources.items())
    temp = f"{os.fspath(path)}.partial"
    try:
        with open(temp, "wb") as f, ThreadPoolExecutor(1) as worker:
            writer = Writer(f, entries, metadata)
            pending = [worker.submit(tensor, entry.key) for entry in entries[:1]]
            for index, entry in enumerate(entries):
                current = pending.pop().result()
                if index + 1 < len(entries):
                    pending.append(worker.submit(tensor, entries[index + 1].key))
                writer.write(entry.key, current)
                del current
            writer.close()
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


# --------------------------------------------------------------------------- LDM -> diffusers


def detect_checkpoint_family(state: Mapping) -> str:
    """The family of an LDM state dict, from where its text encoders sit (else its UNet)."""
    for family in ("sdxl", "sd2", "sd1"):
        text = [layout.prefix for attr, layout in LAYOUTS[family].items() if attr.startswith("text_encoder")]
        if all(any(key.startswith(prefix) for key in state) for prefix in text):
            return family
    unet = {k: v for k, v in state.items() if k.startswith(_UNET.prefix)}
    context = next((tuple(v.shape)[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")), None)
    return K.detect_family(context, {})


def _part_keys(state: Mapping, layout: Layout) -> dict[str, str]:
    """The part's keys in ``state``, as plan names (no prefix) -> actual keys.

    Some SD1 checkpoints keep CLIP without the ``text_model.`` level; both spellings load.
    """
    names = {}
    for key in state:
        if key.startswith(layout.prefix):
            name = key[len(layout.prefix):]
            if layout.kind == "clip" and not name.startswith(K.TEXT_MODEL_LEVEL) and name != "text_projection.weight":
                name = K.TEXT_MODEL_LEVEL + name
            names[name] = key
    return names


def _count(shapes: Mapping, pattern: str) -> int:
    found = {m.group(1) for key in shapes if (m := re.match(pattern, key))}
    return len(found)


def _unet_config(shapes: Mapping) -> dict:
    """UNet2DConditionModel arguments that the LDM weights' shapes tell."""
    names = {d: shapes[ldm] for ldm, d in K.unet_key_map(shapes, from_ldm=True).items()}
    down = _count(names, r"down_blocks\.(\d+)\.")
    up = _count(names, r"up_blocks\.(\d+)\.")
    resnets = [_count(names, rf"down_blocks\.{x}\.resnets\.(\d+)\.") for x in range(down)]
    attention = [_count(names, rf"down_blocks\.{x}\.attentions\.(\d+)\.") > 0 for x in range(down)]
    up_attention = [_count(names, rf"up_blocks\.{x}\.attentions\.(\d+)\.") > 0 for x in range(up)]
    depth = [max(1, _count(names, rf"down_blocks\.{x}\.attentions\.0\.transformer_blocks\.(\d+)\."))
             for x in range(down)]
    up_depth = [max(1, _count(names, rf"up_blocks\.{x}\.attentions\.0\.transformer_blocks\.(\d+)\."))
                for x in range(up)]
    channels = tuple(names[f"down_blocks.{x}.resnets.0.conv2.weight"][0] for x in range(down))
    to_k = next(shape for key, shape in names.items() if key.endswith("attn2.to_k.weight"))
    proj_in = next(shape for key, shape in names.items() if key.endswith("proj_in.weight"))
    config = dict(
        in_channels=names["conv_in.weight"][1],
        out_channels=names["conv_out.weight"][0],
        block_out_channels=channels,
        layers_per_block=resnets[0] if len(set(resnets)) == 1 else tuple(resnets),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else tuple(depth),
        cross_attention_dim=to_k[1],
        use_linear_projection=len(proj_in) == 2,
    )
    if up_depth != depth[::-1]:
        config["reverse_transformer_layers_per_block"] = tuple(up_depth)
    if names["time_embedding.linear_1.weight"][0] != 4 * channels[0]:
        config["time_embedding_dim"] = names["time_embedding.linear_1.weight"][0]
    if "add_embedding.linear_1.weight" in names:
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=names["add_embedding.linear_1.weight"][1])
    return config


def _clip_config(shapes: Mapping) -> dict:
    names = {k.removeprefix(K.TEXT_MODEL_LEVEL): v for k, v in shapes.items()}
    config = dict(
        vocab_size=names["embeddings.token_embedding.weight"][0],
        hidden_size=names["embeddings.token_embedding.weight"][1],
        max_position_embeddings=names["embeddings.position_embedding.weight"][0],
        intermediate_size=names["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(names, r"encoder\.layers\.(\d+)\."),
    )
    if "text_projection.weight" in shapes:
        config["projection_dim"] = shapes["text_projection.weight"][0]
    return config


def _openclip_config(shapes: Mapping, layout: Layout) -> dict:
    layers = _count(shapes, r"transformer\.resblocks\.(\d+)\.")
    if layout.depth is not None and layers == layout.depth:
        layers -= 1  # the unused last layer
    config = dict(
        vocab_size=shapes["token_embedding.weight"][0],
        hidden_size=shapes["token_embedding.weight"][1],
        max_position_embeddings=shapes["positional_embedding"][0],
        intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
        num_hidden_layers=layers,
    )
    if "text_projection" in shapes:
        config["projection_dim"] = shapes["text_projection"][1]
    return config


def _vae_config(shapes: Mapping) -> dict:
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    return dict(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1],
        block_out_channels=tuple(shapes[f"encoder.down.{x}.block.0.conv2.weight"][0] for x in range(levels)),
        layers_per_block=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )


def _hints(state: Mapping, family: str) -> dict[str, dict]:
    """Config entries one part's shapes tell about another: SDXL's time-id embedding width
    is what its label embedding takes beyond the pooled text (te2's projection), over 6 ids."""
    te2 = _layouts(family).get("text_encoder_2")
    label = _UNET.prefix + "label_emb.0.0.weight"
    if te2 is None or label not in state or te2.prefix + "text_projection" not in state:
        return {}
    pooled = tuple(state[te2.prefix + "text_projection"].shape)[1]
    return {"unet": {"addition_time_embed_dim": (tuple(state[label].shape)[1] - pooled) // 6}}


def _config(attr: str, layout: Layout, shapes: Mapping, family: str, overrides: Mapping, hints: Mapping) -> dict:
    """Read from shapes, completed from PUBLISHED when the part is the published one, then `overrides`."""
    read = {"unet": _unet_config, "clip": _clip_config, "vae": _vae_config}.get(layout.kind)
    config = read(shapes) if read else _openclip_config(shapes, layout)
    config.update(hints.get(attr, {}))
    if attr not in _PROJECTED:
        config.pop("projection_dim", None)
    published = PUBLISHED[family].get(attr, {})
    if all(tuple(_as_tuple(published.get(k))) == tuple(_as_tuple(config.get(k))) for k in _IDENTITY[layout.kind]):
        config = {**published, **config}
    elif layout.kind in _TEXT_DEFAULTS:
        config = {**_TEXT_DEFAULTS[layout.kind], **config}
    config.update(overrides.get(attr, {}))
    needed = UNREADABLE[layout.kind] + (("addition_time_embed_dim",) if "addition_embed_type" in config else ())
    missing = [k for k in needed if k not in config]
    if missing:
        raise LohaError(
            f"checkpoint part '{attr}' is not the published {family} one and weights cannot tell "
            f"{', '.join(missing)}: pass overrides={{'{attr}': {{{', '.join(repr(m) + ': …' for m in missing)}}}}}"
        )
    return config


def _as_tuple(value):
    return value if isinstance(value, (tuple, list)) else (value,)


def _meta_module(attr: str, layout: Layout, config: dict) -> torch.nn.Module:
    with torch.device("meta"):
        if layout.kind == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**config)
        if layout.kind == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if attr in _PROJECTED else CLIPTextModel
        return cls(CLIPTextConfig(**config))


def _invert(source: Source, tensor: torch.Tensor, shapes: Mapping) -> dict[str, torch.Tensor]:
    """The part's tensors a checkpoint tensor was made of."""
    if source.op == "cat":
        return dict(zip(source.keys, torch.split(tensor, [shapes[k][0] for k in source.keys])))
    if source.op == "t":
        return {source.keys[0]: tensor.t()}
    return {source.keys[0]: tensor.reshape(shapes[source.keys[0]])}


def diffusers_parts(state: Mapping, family: str | None = None, device="cpu",
                    overrides: Mapping[str, Mapping] | None = None) -> dict[str, torch.nn.Module]:
    """diffusers/transformers modules holding an LDM checkpoint state dict's weights.

    Architectures are read off the weights' shapes; what shapes cannot tell (attention
    heads, norm groups, activation) comes from :data:`PUBLISHED` for full-size
    models, else from ``overrides`` ({attr: {config key: value}}), which also win over
    everything else.  Every tensor of a part is used: a checkpoint key of a part that
    the plan does not explain, or a missing one, raises.  Tensors keep their dtype.
    """
    family = family or detect_checkpoint_family(state)
    overrides = overrides or {}
    hints = _hints(state, family)
    parts = {}
    for attr, layout in _layouts(family).items():
        names = _part_keys(state, layout)
        if not names:
            continue
        shapes = {name: tuple(state[key].shape) for name, key in names.items()}
        module = _meta_module(attr, layout, _config(attr, layout, shapes, family, overrides, hints))
        target = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        sources = _PLANNERS[layout.kind](attr, target, layout)
        unexplained = sorted(names[n] for n in names if layout.prefix + n not in sources)
        if unexplained:
            raise LohaError(f"checkpoint part '{attr}': {len(unexplained)} keys have no diffusers counterpart "
                            f"(first: '{unexplained[0]}' {tuple(state[unexplained[0]].shape)})")
        loaded = {}
        for ldm_key, source in sources.items():
            if source.extra:
                continue
            key = names.get(ldm_key[len(layout.prefix):])
            if key is None:
                raise LohaError(f"checkpoint part '{attr}': missing '{ldm_key}' (expected shape {source.shape})")
            if tuple(state[key].shape) != source.shape:
                raise LohaError(f"checkpoint '{key}' has shape {tuple(state[key].shape)}, "
                                f"the {attr} read off the checkpoint needs {source.shape}")
            loaded.update(_invert(source, state[key].to(device), target))
        module.load_state_dict(loaded, strict=True, assign=True)
        _materialize_buffers(module, device)
        parts[attr] = module.eval()
    if not parts:
        raise LohaError(f"no {family} model parts in the state dict (expected keys under "
                        f"{', '.join(sorted({layout.prefix for layout in _layouts(family).values()}))})")
    return parts


def _materialize_buffers(module: torch.nn.Module, device) -> None:
    """Non-persistent buffers (CLIP's position_ids) were left on the meta device; rebuild them."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        owner, _, attr = name.rpartition(".")
        if attr != "position_ids":
            raise LohaError(f"cannot rebuild buffer '{name}' of {type(module).__name__}")
        ids = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
        module.get_submodule(owner).register_buffer(attr, ids, persistent=False)


# --------------------------------------------------------------------------- random checkpoints


def random_checkpoint(path, family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float16,
                      vae: bool = True, metadata: Mapping | None = None) -> str:
    """A full-size checkpoint of ``family`` with seeded random weights, written tensor by tensor.

    Initialised like fresh modules (norms 1/0, embeddings N(0, 0.02), linear and
    conv weights and biases U(±1/√fan_in)) so activations stay finite in fp16.
    Nothing but the tensor being written is held in memory.
    """
    layouts = _layouts(family)
    modules = {attr: _meta_module(attr, layout, PUBLISHED[family][attr])
               for attr, layout in layouts.items() if vae or layout.kind != "vae"}
    sources = plan({attr: {k: v.shape for k, v in m.state_dict().items()} for attr, m in modules.items()}, family)
    generator = torch.Generator().manual_seed(seed)

    def tensor(key: str) -> torch.Tensor:
        source = sources[key]
        if source.op in _INT_OPS or not source.keys:
            return _OPS[source.op]([], source.shape).to(torch.int64 if source.op in _INT_OPS else dtype)
        module = modules[source.part].get_submodule(source.keys[0].rpartition(".")[0])
        return _random_like(module, source.keys[0].rpartition(".")[2], source.shape, dtype, generator)

    def entry_dtype(source: Source) -> torch.dtype:
        return torch.int64 if source.op in _INT_OPS else dtype

    _write(path, sources, entry_dtype, tensor, metadata)
    return os.fspath(path)


def _random_like(module: torch.nn.Module, param: str, shape: tuple, dtype, generator) -> torch.Tensor:
    """Drawn directly in ``dtype`` (twice as fast as float32 and a cast, for fp16)."""
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
        return (torch.ones if param == "weight" else torch.zeros)(shape, dtype=dtype)
    if isinstance(module, torch.nn.Embedding):
        return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)
    weight = module.weight  # Linear / Conv: fan_in from the module's own weight
    bound = 1.0 / math.sqrt(max(1, math.prod(weight.shape[1:])))
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)
