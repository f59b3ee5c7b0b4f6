"""An LDM (CompVis) checkpoint -> diffusers/transformers modules holding its weights.

The architecture is read off the weights' shapes (levels, widths, depths, layers); what
shapes cannot tell (attention heads, norm groups, activations) comes from the published
configs (`configs.PUBLISHED`) when a part is the published one, else from the caller's
``overrides``. The modules are built on the meta device and given the checkpoint's own
tensors, through the inverted `to_ldm` plan: every tensor of a part is used, and a key
the plan does not explain is an error.

    parts = diffusers_parts(state)                                # {"unet": …, "text_encoder": …}
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import LohaError
from ..families import PROJECTED_TEXT_ENCODERS, TEXT_MODEL_LEVEL, CheckpointPart, checkpoint_parts, family_of_checkpoint
from ..keys.unet import unet_key_map
from . import configs
from .structures import build_part
from .to_ldm import Source, plan_part

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
_TEXT_DEFAULTS = {"clip": dict(configs.SD_TEXT, hidden_act="quick_gelu"),
                  "openclip": dict(configs.SD_TEXT, hidden_act="gelu")}


def _part_keys(state: Mapping, part: CheckpointPart) -> dict[str, str]:
    """The part's keys in ``state``, as plan names (no prefix) -> actual keys.

    Some SD1 checkpoints keep CLIP without the ``text_model.`` level; both spellings load.
    """
    names = {}
    for key in state:
        if key.startswith(part.prefix):
            name = key[len(part.prefix):]
            if part.kind == "clip" and not name.startswith(TEXT_MODEL_LEVEL) and name != "text_projection.weight":
                name = TEXT_MODEL_LEVEL + name
            names[name] = key
    return names


def _count(shapes: Mapping, pattern: str) -> int:
    found = {m.group(1) for key in shapes if (m := re.match(pattern, key))}
    return len(found)


def _unet_config(shapes: Mapping) -> dict:
    """UNet2DConditionModel arguments that the LDM weights' shapes tell."""
    names = {d: shapes[ldm] for ldm, d in unet_key_map(shapes, from_ldm=True).items()}
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
    names = {k.removeprefix(TEXT_MODEL_LEVEL): v for k, v in shapes.items()}
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


def _openclip_config(shapes: Mapping, part: CheckpointPart) -> dict:
    layers = _count(shapes, r"transformer\.resblocks\.(\d+)\.")
    if part.depth is not None and layers == part.depth:
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
    parts = checkpoint_parts(family)
    te2 = parts.get("text_encoder_2")
    label = parts["unet"].prefix + "label_emb.0.0.weight"
    if te2 is None or label not in state or te2.prefix + "text_projection" not in state:
        return {}
    pooled = tuple(state[te2.prefix + "text_projection"].shape)[1]
    return {"unet": {"addition_time_embed_dim": (tuple(state[label].shape)[1] - pooled) // 6}}


def _config(attr: str, part: CheckpointPart, shapes: Mapping, family: str, overrides: Mapping, hints: Mapping) -> dict:
    """Read from shapes, completed from PUBLISHED when the part is the published one, then `overrides`."""
    read = {"unet": _unet_config, "clip": _clip_config, "vae": _vae_config}.get(part.kind)
    config = read(shapes) if read else _openclip_config(shapes, part)
    config.update(hints.get(attr, {}))
    if attr not in PROJECTED_TEXT_ENCODERS:
        config.pop("projection_dim", None)
    known = next((whole[attr] for whole in configs.KNOWN[family] if attr in whole and all(
        tuple(_as_tuple(whole[attr].get(k))) == tuple(_as_tuple(config.get(k))) for k in _IDENTITY[part.kind])), None)
    if known is not None:
        config = {**known, **config}
    elif part.kind in _TEXT_DEFAULTS:
        config = {**_TEXT_DEFAULTS[part.kind], **config}
    config.update(overrides.get(attr, {}))
    needed = UNREADABLE[part.kind] + (("addition_time_embed_dim",) if "addition_embed_type" in config else ())
    missing = [k for k in needed if k not in config]
    if missing:
        raise LohaError(
            f"checkpoint part '{attr}' is not the published {family} one and weights cannot tell "
            f"{', '.join(missing)}: pass overrides={{'{attr}': {{{', '.join(repr(m) + ': …' for m in missing)}}}}}"
        )
    return config


def _as_tuple(value):
    return value if isinstance(value, (tuple, list)) else (value,)


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
    heads, norm groups, activation) comes from `configs.PUBLISHED` for full-size
    models, else from ``overrides`` ({attr: {config key: value}}), which also win over
    everything else.  Every tensor of a part is used: a checkpoint key of a part that
    the plan does not explain, or a missing one, raises.  Tensors keep their dtype.
    """
    family = family or family_of_checkpoint(state)
    overrides = overrides or {}
    hints = _hints(state, family)
    parts = {}
    for attr, part in checkpoint_parts(family).items():
        names = _part_keys(state, part)
        if not names:
            continue
        shapes = {name: tuple(state[key].shape) for name, key in names.items()}
        config = _config(attr, part, shapes, family, overrides, hints)
        parts[attr] = _load_part(state, attr, part, names, config, device)
    if not parts:
        prefixes = sorted({part.prefix for part in checkpoint_parts(family).values()})
        raise LohaError(f"no {family} model parts in the state dict (expected keys under {', '.join(prefixes)})")
    return parts


def _load_part(state: Mapping, attr: str, part: CheckpointPart, names: dict[str, str], config: dict,
               device) -> torch.nn.Module:
    """The module of one part, built on the meta device, given the checkpoint's tensors."""
    with torch.device("meta"):
        module = build_part(attr, config)
    target = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sources = plan_part(attr, target, part)
    unexplained = sorted(names[n] for n in names if part.prefix + n not in sources)
    if unexplained:
        raise LohaError(f"checkpoint part '{attr}': {len(unexplained)} keys have no diffusers counterpart "
                        f"(first: '{unexplained[0]}' {tuple(state[unexplained[0]].shape)})")
    loaded = {}
    for ldm_key, source in sources.items():
        if source.extra:
            continue
        key = names.get(ldm_key[len(part.prefix):])
        if key is None:
            raise LohaError(f"checkpoint part '{attr}': missing '{ldm_key}' (expected shape {source.shape})")
        if tuple(state[key].shape) != source.shape:
            raise LohaError(f"checkpoint '{key}' has shape {tuple(state[key].shape)}, "
                            f"the {attr} read off the checkpoint needs {source.shape}")
        loaded.update(_invert(source, state[key].to(device), target))
    module.load_state_dict(loaded, strict=True, assign=True)
    _materialize_buffers(module, device)
    return module.eval()


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


#: Where a checkpoint says it predicts v (ComfyUI's `supported_models` reads the same): SDXL
#: v-prediction files carry a ``v_pred`` key; SD2's 768-v differs from its 512 base (epsilon)
#: in weights only, and ComfyUI tells them apart by the spread of this bias (v above 0.09).
V_PREDICTION_KEY = "v_pred"
SD2_V_PROBE = ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias", 0.09)


def prediction_type(state: Mapping, family: str) -> str:
    """"v_prediction" or "epsilon", as ComfyUI decides it for a checkpoint's state dict."""
    if V_PREDICTION_KEY in state:
        return "v_prediction"
    key, threshold = SD2_V_PROBE
    probe = state.get(key)
    unet_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if family == "sd2" and probe is not None and not probe.is_meta and (unet_in is None or unet_in.shape[1] == 4):
        if torch.std(probe.float(), unbiased=False) > threshold:  # SD2 inpainting (9 channels) is epsilon
            return "v_prediction"
    return "epsilon"
