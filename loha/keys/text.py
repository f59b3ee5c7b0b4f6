"""Text encoders: HF CLIP and T5 module paths, OpenCLIP's fused layout, where encoders sit in state dicts.

Files name CLIP modules by HF CLIP paths (``text_model.encoder.layers.N.…``, with or
without ``text_model.``) and T5 modules by HF T5 paths (``encoder.block.N.layer.0.
SelfAttention.q``). Checkpoints keep SD2's encoder and SDXL's second in OpenCLIP layout,
where q/k/v are the three row blocks of the fused ``attn.in_proj_weight``: a LoHa on one
of them lands on rows [0:d], [d:2d] or [2d:3d] (exact, since rows of ΔW depend only on
rows of ``w*_a``). SD3/3.5 and Flux checkpoints (and ComfyUI) keep CLIP-L, OpenCLIP-G
and T5-XXL under HF names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..families import CHECKPOINT_PARTS, PIPELINE_COMPONENTS, TEXT_MODEL_LEVEL

#: HF CLIP layer modules whose q/k/v thirds OpenCLIP fuses into ``attn.in_proj_*``, in order.
OPENCLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
#: The other HF CLIP layer modules -> OpenCLIP resblock modules (norms included).
OPENCLIP_MODULES = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
#: Patchable text-encoder modules (HF CLIP names, relative to an encoder layer) and
#: where each lives in an OpenCLIP layer: (parameter, index of the q/k/v third of the
#: fused in-projection or None).  Embeddings, norms and ``text_projection`` (stored
#: transposed by OpenCLIP, targeted by no trainer) are not patched.
TEXT_PARTS = {
    **{part: ("attn.in_proj_weight", third) for third, part in enumerate(OPENCLIP_QKV)},
    **{part: (OPENCLIP_MODULES[part] + ".weight", None) for part in ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")},
}
#: An HF CLIP path (without ``text_model.``) of a patchable module.
TEXT_PATH = re.compile(r"encoder\.layers\.(\d+)\.(" + "|".join(re.escape(p) for p in TEXT_PARTS) + r")")
_OPENCLIP_PARAM = re.compile(r"resblocks\.(\d+)\.(.+)")
#: A patchable T5 (and UMT5) module path: attention and feed-forward projections.
T5_PATH = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))")
#: Stands for the component of a T5 in `TEXT_STATE_SOURCES`: the position after the CLIPs.
T5_AFTER_CLIPS = "after the CLIP encoders"


def _checkpoint_sources() -> list[tuple[str, str, str]]:
    """(prefix, component, layout) of every family's checkpoint text encoders, in family order."""
    sources = []
    for parts in CHECKPOINT_PARTS.values():
        for attr, part in parts.items():
            if part.kind == "clip":
                source = (part.prefix, PIPELINE_COMPONENTS[attr], "hf")
            elif part.kind == "openclip":  # its resblocks sit under `transformer.`
                source = (part.prefix + "transformer.", PIPELINE_COMPONENTS[attr], "openclip")
            else:
                continue
            if source not in sources:
                sources.append(source)
    return sources


#: Where text encoders sit in an LDM state dict: (prefix, component, layout), layout
#: "hf" = HF CLIP names (with or without ``text_model.``), "openclip" = resblocks.
#: Checkpoints first, then live models: ComfyUI converts OpenCLIP to HF names on
#: load; the WebUI wraps each encoder in a module whose ``wrapped`` is the original.
TEXT_STATE_SOURCES = (
    *_checkpoint_sources(),
    ("clip_l.transformer.", "te1", "hf"),  # ComfyUI (SD1.x, SDXL)
    ("clip_h.transformer.", "te1", "hf"),  # ComfyUI (SD2.x)
    ("clip_g.transformer.", "te2", "hf"),  # ComfyUI (SDXL)
    ("cond_stage_model.wrapped.transformer.", "te1", "hf"),  # WebUI, hijacked SD1.x
    ("cond_stage_model.wrapped.model.transformer.", "te1", "openclip"),  # WebUI SD2.x
    ("conditioner.embedders.0.wrapped.transformer.", "te1", "hf"),  # WebUI SDXL
    ("conditioner.embedders.1.wrapped.model.transformer.", "te2", "openclip"),  # WebUI SDXL
    ("text_encoders.clip_l.transformer.", "te1", "hf"),  # SD3/3.5 and Flux checkpoints
    ("text_encoders.clip_g.transformer.", "te2", "hf"),
    ("text_encoders.t5xxl.transformer.", T5_AFTER_CLIPS, "t5"),
    ("t5xxl.transformer.", T5_AFTER_CLIPS, "t5"),  # ComfyUI (SD3, Flux, PixArt)
    ("umt5xxl.transformer.", T5_AFTER_CLIPS, "t5"),  # ComfyUI (Wan)
)
#: ComfyUI's generic text-encoder names: this + the state-dict key without ".weight".
COMFY_TEXT_PREFIX = "text_encoders."


def shape_of(value) -> tuple[int, ...]:
    """The shape of a tensor, of anything with ``.shape``, or of a shape tuple."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def weight_path(key: str, prefixes: Iterable[str]) -> str | None:
    """Module path of a ``….weight`` key under one of ``prefixes``, else None."""
    if not key.endswith(".weight"):
        return None
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) : -len(".weight")]
    return None


def state_text_weights(shapes: Mapping) -> list[tuple]:
    """(component, kind, HF path, key, rows, shape) of every patchable text-encoder weight of a
    state dict; kind is "clip" or "t5". A T5 comes after the CLIP encoders (te3 in SD3, te2 in Flux)."""
    found = []
    for prefix, component, layout in TEXT_STATE_SOURCES:
        keys = [key for key in shapes if key.startswith(prefix)]
        read = {"hf": _hf_text_weights, "openclip": _openclip_text_weights, "t5": _t5_text_weights}[layout]
        kind = "t5" if layout == "t5" else "clip"
        found += [(component, kind, *weight) for weight in read(prefix, keys, shapes)]
    clips = {component for component, kind, *_ in found if kind == "clip"}
    t5 = f"te{len(clips) + 1}"
    return [(t5 if component == T5_AFTER_CLIPS else component, *rest) for component, *rest in found]


def _t5_text_weights(prefix: str, keys: list[str], shapes: Mapping):
    """(path, key, rows, shape) of the patchable weights of a T5 encoder (HF names)."""
    for key in keys:
        path = weight_path(key, (prefix,))
        if path is not None and T5_PATH.fullmatch(path):
            yield path, key, None, shape_of(shapes[key])


def _hf_text_weights(prefix: str, keys: list[str], shapes: Mapping):
    """(path, key, rows, shape) of the patchable weights of an HF-layout encoder."""
    for key in keys:
        path = weight_path(key, (prefix + TEXT_MODEL_LEVEL, prefix))
        if path is not None and TEXT_PATH.fullmatch(path):
            yield path, key, None, shape_of(shapes[key])


def _openclip_text_weights(prefix: str, keys: list[str], shapes: Mapping):
    """(path, key, rows, shape) of the patchable weights of an OpenCLIP encoder.

    q/k/v are the three row blocks of the fused ``attn.in_proj_weight``.
    """
    for key in keys:
        match = _OPENCLIP_PARAM.fullmatch(key[len(prefix) :])
        if match is None:
            continue
        layer, param = match.groups()
        parts = [(part, third) for part, (p, third) in TEXT_PARTS.items() if p == param]
        if not parts:
            continue
        shape = shape_of(shapes[key])
        for part, third in parts:
            path = f"encoder.layers.{layer}.{part}"
            if third is None:
                yield path, key, None, shape
            else:
                width = shape[0] // 3
                rows = (third * width, (third + 1) * width)
                yield path, key, rows, (width, *shape[1:])
