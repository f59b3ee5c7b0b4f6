"""Flux (BFL) and SD3 (MMDiT) checkpoint layouts for the tests, with diffusers' converters as the oracle.

`to_checkpoint` writes a diffusers transformer's state dict in its family's checkpoint
layout. It is the tests' own code, written from the original model definitions and
independent of loha.keys; diffusers' single-file converters check it: `to_diffusers`
runs them on the result, and `provenance` runs them on `Rows` stand-ins, which remember
which key and rows every diffusers weight came from (at full size, on no memory).

diffusers hard-codes Flux-dev's hidden width (3072) for splitting ``linear1``; for tiny
models `to_diffusers` runs its converter's own code with the width set to the model's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.loaders import single_file_utils as sfu

LAYOUT_FAMILIES = ("flux", "sd3")
#: Where each part sits: a checkpoint (SD3.5, Flux all-in-one files) and ComfyUI's live model.
PREFIXES = {
    "checkpoint": {"transformer": "model.diffusion_model.", "clip": "text_encoders.clip_l.transformer.",
                   "clip_g": "text_encoders.clip_g.transformer.", "t5": "text_encoders.t5xxl.transformer."},
    "comfyui": {"transformer": "diffusion_model.", "clip": "clip_l.transformer.", "clip_g": "clip_g.transformer.",
                "t5": "t5xxl.transformer."},
}


def _cat(*tensors):
    return torch.cat(tensors, dim=0)


def _shift_scale(weight):
    """diffusers' (scale, shift) rows as the checkpoint's (shift, scale), and back."""
    first, second = weight.chunk(2, dim=0)
    return _cat(second, first)


def to_checkpoint(family: str, state: dict) -> dict:
    """A diffusers Flux/SD3 transformer state dict in the BFL/MMDiT layout (no prefix)."""
    out = {}
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))

    def put(new, old, convert=None):
        for end in ("weight", "bias"):
            values = [state.pop(f"{o}.{end}") for o in ([old] if isinstance(old, str) else old)
                      if f"{o}.{end}" in state]
            if values:
                out[f"{new}.{end}"] = convert(values[0]) if convert else _cat(*values)

    if family == "flux":
        singles = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks."))
        for i in range(blocks):
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            put(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
            put(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
            for new, old in [("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                             ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                             ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                             ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")]:
                put(b + new, d + old)
            for new, old in [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                             ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                             ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                             ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight")]:
                out[b + new] = state.pop(d + old)
        for i in range(singles):
            s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            put(b + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"])
            put(b + "linear2", s + "proj_out")
            put(b + "modulation.lin", s + "norm.linear")
            out[b + "norm.query_norm.scale"] = state.pop(s + "attn.norm_q.weight")
            out[b + "norm.key_norm.scale"] = state.pop(s + "attn.norm_k.weight")
        for new, old in [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                         ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                         ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                         ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                         ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                         ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                         ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]:
            put(new, old)
        put("final_layer.adaLN_modulation.1", "norm_out.linear", _shift_scale)
    else:
        for i in range(blocks):
            d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
            last = i == blocks - 1
            put(x + "attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
            put(c + "attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
            put(x + "attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"])
            for new, old in [(x + "attn.proj", "attn.to_out.0"), (x + "attn2.proj", "attn2.to_out.0"),
                             (x + "mlp.fc1", "ff.net.0.proj"), (x + "mlp.fc2", "ff.net.2"),
                             (x + "adaLN_modulation.1", "norm1.linear"), (c + "attn.proj", "attn.to_add_out"),
                             (c + "mlp.fc1", "ff_context.net.0.proj"), (c + "mlp.fc2", "ff_context.net.2")]:
                put(new, d + old)
            put(c + "adaLN_modulation.1", d + "norm1_context.linear", _shift_scale if last else None)
            for side, norm in [(x + "attn.", "attn.norm_"), (c + "attn.", "attn.norm_added_"), (x + "attn2.", "attn2.norm_")]:
                for letter in "qk":
                    if f"{d}{norm}{letter}.weight" in state:
                        out[f"{side}ln_{letter}.weight"] = state.pop(f"{d}{norm}{letter}.weight")
        out["pos_embed"] = state.pop("pos_embed.pos_embed")
        for new, old in [("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
                         ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                         ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                         ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                         ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                         ("final_layer.linear", "proj_out")]:
            put(new, old)
        put("final_layer.adaLN_modulation.1", "norm_out.linear", _shift_scale)
    assert not state, f"left out of the {family} checkpoint: {sorted(state)}"
    return out


def _flux_converter(hidden: int):
    """diffusers' Flux converter, its own code, with the hidden width it hard-codes set to `hidden`."""
    source = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(sfu))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def to_diffusers(family: str, checkpoint: dict, hidden: int | None = None) -> dict:
    """diffusers' own converter on a checkpoint-layout dict (consumed; prefixes allowed)."""
    if family == "sd3":
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    if hidden is None:
        return sfu.convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    return _flux_converter(hidden)(checkpoint)


@dataclass(frozen=True)
class Rows:
    """Stands in for a checkpoint tensor in diffusers' converters: which rows of which keys it is.

    The converters only pop, chunk, split and concatenate along rows, so running them on
    these tells where each diffusers weight lives, at any size, with no memory.
    """

    shape: tuple
    segments: tuple  # ((key, start, stop), ...) in row order

    @classmethod
    def of(cls, key: str, shape) -> "Rows":
        return cls(tuple(shape), ((key, 0, shape[0]),))

    def _cut(self, start: int, stop: int) -> "Rows":
        segments, offset = [], 0
        for key, a, b in self.segments:
            lo, hi = max(start, offset), min(stop, offset + b - a)
            if lo < hi:
                segments.append((key, a + lo - offset, a + hi - offset))
            offset += b - a
        return Rows((stop - start, *self.shape[1:]), tuple(segments))

    def split(self, sizes, dim=0):
        assert dim == 0
        sizes = [sizes] * (self.shape[0] // sizes) if isinstance(sizes, int) else list(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(self._cut(s, s + n) for s, n in zip(starts, sizes))

    def chunk(self, chunks, dim=0):
        return self.split(self.shape[0] // chunks, dim)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.chunk, torch.Tensor.chunk):
            return args[0].chunk(*args[1:], **kwargs)
        if func in (torch.split, torch.Tensor.split):
            return args[0].split(*args[1:], **kwargs)
        if func is torch.cat:
            parts = list(args[0])
            assert kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0
            return Rows((sum(p.shape[0] for p in parts), *parts[0].shape[1:]),
                        tuple(s for p in parts for s in p.segments))
        return NotImplemented


def provenance(family: str, checkpoint_shapes: dict) -> dict:
    """{diffusers key: Rows} from diffusers' own converter run on stand-ins of the checkpoint's keys."""
    stand_ins = {key: Rows.of(key, shape) for key, shape in checkpoint_shapes.items()}
    converted = to_diffusers(family, stand_ins)
    assert not stand_ins, f"the converter left {sorted(stand_ins)}"
    return converted


def text_state(kind: str, model, prefix: str) -> dict:
    """A text encoder's weights under a checkpoint/host prefix (CLIP with its ``text_model.`` level)."""
    level = "text_model." if kind.startswith("clip") else ""
    return {prefix + level + k.removeprefix("text_model."): v for k, v in model.state_dict().items()
            if "position_ids" not in k}
