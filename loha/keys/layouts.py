"""Checkpoint layouts that fuse weights diffusers keeps apart: Flux (BFL) and SD3/3.5 (MMDiT).

Black Forest Labs' Flux checkpoints and Stability's SD3/3.5 checkpoints (and so ComfyUI
and Forge, which keep them as they are) stack several diffusers weights in one tensor:
``double_blocks.N.img_attn.qkv`` is ``transformer_blocks.N.attn.to_q``, ``to_k`` and
``to_v`` one under the other, ``single_blocks.N.linear1`` is q, k, v and the MLP input,
and the final modulation holds its two row halves the other way round (shift, scale
against diffusers' scale, shift). Files name modules either way: kohya sd-scripts writes
the checkpoint's module (``lora_unet_double_blocks_0_img_attn_qkv``), SimpleTuner,
OneTrainer and ai-toolkit the diffusers module (``lycoris_transformer_blocks_0_attn_to_q``).

A `Fused` entry says which diffusers weights one checkpoint weight stacks, in row order.
`place` finds every entry in a model's module paths, on either side, and says which rows
of the fused weight each diffusers weight occupies (`Segment`): rows of a LoHa ΔW depend
only on the rows of ``w*_a``, so applying a diffusers-named module to its rows of a fused
weight, or a checkpoint-named module to the diffusers weights row block by row block, is
exact. diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers`` and ComfyUI's ``comfy/utils.py``
(``flux_to_diffusers``, ``mmdit_to_diffusers``) are the references for these tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Fused:
    """One checkpoint weight and the diffusers weights it stacks by rows.

    Paths hold a ``{d}``/``{s}``/``{j}`` block number. ``split`` says where parts end:
    "equal" row blocks, or "width": every part but the last has as many rows as the
    weight has columns (Flux's ``linear1``: q, k, v of the hidden width, then the MLP).
    ``swapped``: the only part's two row halves lie the other way round. ``last_block``:
    the entry holds for the last block only, in place of the general one.
    """

    checkpoint: str
    parts: tuple[str, ...]
    split: str = "equal"
    swapped: bool = False
    last_block: bool = False


@dataclass(frozen=True)
class Layout:
    """A family's checkpoint layout: its fused weights and how to recognise either side."""

    family: str
    blocks: Mapping[str, tuple[str, str]]  # placeholder -> (checkpoint, diffusers) block prefix
    fused: tuple[Fused, ...]
    checkpoint_sign: tuple[str, ...]  # module paths every checkpoint of the family has
    diffusers_sign: tuple[str, ...]  # ... and every diffusers model of it


def _renamed(checkpoint_prefix: str, diffusers_prefix: str, pairs, **flags) -> tuple[Fused, ...]:
    return tuple(Fused(checkpoint_prefix + c, (diffusers_prefix + d,), **flags) for c, d in pairs)


def _stacked(checkpoint: str, diffusers_prefix: str, parts, **flags) -> Fused:
    return Fused(checkpoint, tuple(diffusers_prefix + p for p in parts), **flags)


_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

_FLUX_DOUBLE, _FLUX_D = "double_blocks.{d}.", "transformer_blocks.{d}."
_FLUX_SINGLE, _FLUX_S = "single_blocks.{s}.", "single_transformer_blocks.{s}."
FLUX = Layout(
    family="flux",
    blocks={"d": ("double_blocks.", "transformer_blocks."), "s": ("single_blocks.", "single_transformer_blocks.")},
    fused=(
        _stacked(_FLUX_DOUBLE + "img_attn.qkv", _FLUX_D + "attn.", _QKV),
        _stacked(_FLUX_DOUBLE + "txt_attn.qkv", _FLUX_D + "attn.", _ADDED_QKV),
        *_renamed(_FLUX_DOUBLE, _FLUX_D, [
            ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
            ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
            ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
            ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
        ]),
        _stacked(_FLUX_SINGLE + "linear1", _FLUX_S, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), split="width"),
        *_renamed(_FLUX_SINGLE, _FLUX_S, [("linear2", "proj_out"), ("modulation.lin", "norm.linear")]),
        *_renamed("", "", [
            ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
            ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
            ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
            ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
            ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
            ("final_layer.linear", "proj_out"),
        ]),
        Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swapped=True),
    ),
    checkpoint_sign=("img_in", "txt_in", "double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin",
                     "single_blocks.0.linear1"),
    diffusers_sign=("x_embedder", "context_embedder", "transformer_blocks.0.attn.add_q_proj",
                    "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.proj_mlp"),
)

_SD3_X, _SD3_C, _SD3_D = "joint_blocks.{j}.x_block.", "joint_blocks.{j}.context_block.", "transformer_blocks.{j}."
SD3 = Layout(
    family="sd3",
    blocks={"j": ("joint_blocks.", "transformer_blocks.")},
    fused=(
        _stacked(_SD3_X + "attn.qkv", _SD3_D + "attn.", _QKV),
        _stacked(_SD3_C + "attn.qkv", _SD3_D + "attn.", _ADDED_QKV),
        _stacked(_SD3_X + "attn2.qkv", _SD3_D + "attn2.", _QKV),  # SD3.5 medium's second attention
        *_renamed(_SD3_X, _SD3_D, [
            ("attn.proj", "attn.to_out.0"), ("attn2.proj", "attn2.to_out.0"),
            ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm1.linear"),
        ]),
        *_renamed(_SD3_C, _SD3_D, [
            ("attn.proj", "attn.to_add_out"), ("mlp.fc1", "ff_context.net.0.proj"), ("mlp.fc2", "ff_context.net.2"),
            ("adaLN_modulation.1", "norm1_context.linear"),
        ]),
        # The last block's context side only conditions: its modulation is shift/scale too.
        Fused(_SD3_C + "adaLN_modulation.1", (_SD3_D + "norm1_context.linear",), swapped=True, last_block=True),
        *_renamed("", "", [
            ("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
            ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
            ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
            ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
            ("final_layer.linear", "proj_out"),
        ]),
        Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swapped=True),
    ),
    checkpoint_sign=("x_embedder.proj", "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv"),
    diffusers_sign=("pos_embed.proj", "context_embedder", "transformer_blocks.0.attn.add_q_proj",
                    "transformer_blocks.0.norm1_context.linear"),
)

LAYOUTS = (FLUX, SD3)


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a fused weight are rows `part_rows` of the diffusers weight `part`."""

    start: int
    stop: int
    part: str
    part_rows: tuple[int, int]


@dataclass(frozen=True)
class Placed:
    """One fused checkpoint weight found in a model: its path, its rows, and where its parts lie."""

    checkpoint: str
    rows: int
    segments: tuple[Segment, ...]


def find_layout(paths, side: str) -> Layout | None:
    """The layout whose `side` ("checkpoint" or "diffusers") signature `paths` hold, else None."""
    present = set(paths)
    for layout in LAYOUTS:
        if set(getattr(layout, f"{side}_sign")) <= present:
            return layout
    return None


def _block_counts(layout: Layout, paths, side: str) -> dict[str, int]:
    at = 0 if side == "checkpoint" else 1
    counts = {}
    for key, prefixes in layout.blocks.items():
        number = re.compile(re.escape(prefixes[at]) + r"(\d+)\.")
        counts[key] = 1 + max((int(m[1]) for p in paths if (m := number.match(p))), default=-1)
    return counts


def _instances(layout: Layout, counts: Mapping[str, int]) -> Iterator[tuple[Fused, dict[str, int]]]:
    """Every entry with its block number filled in; last-block entries replace the general one."""
    specific = {(f.checkpoint, key) for f in layout.fused if f.last_block for key in counts if "{%s}" % key in f.checkpoint}
    for fused in layout.fused:
        keys = [key for key in counts if "{%s}" % key in fused.checkpoint]
        if not keys:
            yield fused, {}
            continue
        key = keys[0]
        last = counts[key] - 1
        for number in ([last] if fused.last_block else range(counts[key])):
            if not fused.last_block and number == last and (fused.checkpoint, key) in specific:
                continue
            yield fused, {key: number}


def _segments(fused: Fused, rows: int, columns: int, part_rows: list[int] | None) -> tuple[Segment, ...] | None:
    """Where each part lies in a fused weight of `rows` rows, or None if the shapes do not fit.

    `part_rows`, when the parts are known (diffusers side), must agree.
    """
    parts = fused.parts
    if fused.swapped:
        half = rows // 2
        if rows % 2:
            return None
        return (Segment(0, half, parts[0], (half, rows)), Segment(half, rows, parts[0], (0, half)))
    if fused.split == "width":
        sizes = [columns] * (len(parts) - 1) + [rows - columns * (len(parts) - 1)]
    else:
        sizes = [rows // len(parts)] * len(parts)
    if min(sizes) <= 0 or sum(sizes) != rows or (part_rows is not None and part_rows != sizes):
        return None
    starts = [sum(sizes[:i]) for i in range(len(parts))]
    return tuple(Segment(start, start + size, part, (0, size)) for start, size, part in zip(starts, sizes, parts))


def place(layout: Layout, shapes: Mapping[str, tuple[int, ...]], side: str) -> list[Placed]:
    """Every fused weight of `layout` in a model whose module paths map to weight shapes.

    On the checkpoint side a fused weight is there when its path is; on the diffusers
    side when every part is (its rows are then the parts' rows together).
    """
    counts = _block_counts(layout, shapes, side)
    placed = []
    for fused, numbers in _instances(layout, counts):
        checkpoint = fused.checkpoint.format(**numbers)
        parts = tuple(part.format(**numbers) for part in fused.parts)
        concrete = Fused(checkpoint, parts, fused.split, fused.swapped)
        if side == "checkpoint":
            if checkpoint not in shapes:
                continue
            rows, columns, part_rows = shapes[checkpoint][0], shapes[checkpoint][1], None
        else:
            if not all(part in shapes for part in parts):
                continue
            part_shapes = [shapes[part] for part in parts]
            if len({shape[1:] for shape in part_shapes}) != 1:
                continue
            part_rows = [shape[0] for shape in part_shapes]
            rows, columns = sum(part_rows), part_shapes[0][1]
        segments = _segments(concrete, rows, columns, part_rows)
        if segments is not None:
            placed.append(Placed(checkpoint, rows, segments))
    return placed
