"""ComfyUI weight patches whose ΔW is computed by loha's kernels.

ComfyUI patches a model by cloning its ModelPatcher and adding, per weight key, a
list of patches. When it loads the model (fully, in low-VRAM mode, or to save a
checkpoint) it copies each patched weight to fp32, lets every patch add its change,
rounds once and keeps the original to unpatch. A patch that is a
``WeightAdapterBase`` is asked through ``calculate_weight``: `LohaPatch` is one, so
ComfyUI's memory management, unpatching, hooks and CheckpointSave keep working
while `loha.patch.apply_to_tensor` (and so `loha.kernels`) does the math.

Everything here works without ComfyUI too (the base class is then ``object``), so
the planning and the arithmetic are tested in CI on plain state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from loha import blocks as block_weights
from loha.errors import LohaError
from loha.format import Network, component_of
from loha.keys import map_state_dict
from loha.patch import Use, apply_to_bias, apply_to_tensor, by_tensor, plan

try:
    from comfy.weight_adapter.base import WeightAdapterBase
except ImportError:  # outside ComfyUI
    WeightAdapterBase = object

#: ComfyUI model part -> the file components (format.component_of) it holds.
PART_COMPONENTS = {"model": {"unet"}, "clip": {"te1", "te2"}}


class LohaPatch(WeightAdapterBase):
    """The change one network makes to one tensor (weight, or bias for full-diff modules).

    ComfyUI passes the strength it was added with (and any hook strength) to
    `calculate_weight`; block weights are already in the items' `Use`.
    """

    name = "loha"

    def __init__(self, use: Use, items: list, bias: bool = False):
        self.use = use
        self.items = items
        self.bias = bias
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []  # ComfyUI's adapters list tensors here; ours are in items

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Add strength·ΔW into `weight` (ComfyUI's fp32 working copy) in place and return it.

        Our patches are added under plain keys, so ComfyUI passes no offset and an
        identity `function`; row slices of fused weights are the items' own business.
        """
        use = Use(self.use.network, strength, strength, self.use.blocks)
        items = [replace(item, use=use) for item in self.items]
        with torch.no_grad():
            (apply_to_bias if self.bias else apply_to_tensor)(weight, items)
        return weight


@dataclass
class PatchSet:
    """What one network adds to each ComfyUI part, and the names that matched nothing."""

    network: Network
    family: str
    patches: dict[str, dict[str, LohaPatch]] = field(default_factory=dict)  # part -> key -> patch
    unmatched: list[str] = field(default_factory=list)


def plan_patches(network: Network, parts: Mapping[str, Mapping[str, tuple]], blocks: str = "") -> PatchSet:
    """Match `network` against ComfyUI parts and prepare one patch per changed tensor.

    `parts` maps "model" and/or "clip" to the shapes of that patcher's state dict
    ({key: shape}). `blocks` is a block-weight preset or comma list (`loha.blocks`). Names of
    a part that is not given (text encoders for a model-only loader) are not counted
    as unmatched. Raises `LohaError` for a file of another model family, and when
    nothing at all matches.
    """
    names = map_state_dict({key: shape for part in parts.values() for key, shape in part.items()})
    if network.family not in (None, names.family):
        raise LohaError(f"{network.label}: the file is for {network.family} models, this model is {names.family}")
    use = Use(network, 1.0, 1.0, block_weights.parse(blocks, names.family))
    items, unmatched = plan(names, [use])
    wanted = set().union(*(PART_COMPONENTS[part] for part in parts))
    relevant = [name for name in network.modules if component_of(name) in wanted | {None}]
    result = PatchSet(network, names.family, {part: {} for part in parts})
    result.unmatched = [name for name in unmatched.get(network.label, []) if name in set(relevant)]
    if relevant and len(result.unmatched) == len(relevant):
        raise LohaError(
            f"{network.label}: none of its {len(relevant)} modules matches this {names.family} model "
            f"(the file looks like {network.family or 'an unknown family'}; first name: '{relevant[0]}')"
        )
    owner = {key: part for part, state in parts.items() for key in state}
    for key, group in by_tensor(items).items():
        part_patches = result.patches[owner[key]]
        part_patches[key] = LohaPatch(use, group)
        if any(item.bias is not None for item in group):
            part_patches[key[: -len("weight")] + "bias"] = LohaPatch(use, group, bias=True)
    return result
