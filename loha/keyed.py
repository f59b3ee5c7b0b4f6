"""Per-weight patches for hosts that patch a model by state-dict key (ComfyUI, Forge).

Such a host keeps, for each weight key, a list of patches; when it loads the model it
copies the weight to fp32, asks every patch to add its change, rounds once and keeps
the original to unpatch. `plan_keyed` matches a network against the host's parts
(their state-dict shapes) once, and gives one `KeyedPatch` per changed tensor whose
`add_into` runs `loha.patch.apply_to_tensor` (and so `loha.kernels`) on that copy.
The hosts' own adapters (nodes/patches.py, the WebUI script on Forge) only wrap it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .errors import LohaError
from .families import component_of
from .files.network import Network
from .keys import bias_key, map_state_dict
from .keys import blocks as block_weights
from .patch import Use, apply_to_bias, apply_to_tensor, by_tensor, overflow_error, overflow_possible, overflowed, plan_modules

#: Host model part -> the file components (families.component_of) it holds.
PART_COMPONENTS = {"model": {"unet"}, "clip": {"te1", "te2"}}


class KeyedPatch:
    """The change one network makes to one tensor (weight, or bias for full-diff modules).

    The host passes the strength it was added with; block weights are already in the
    items' `Use`. Row slices of fused weights are the items' own business, so the host
    is given plain keys and no offsets.
    """

    def __init__(self, use: Use, items: list, bias: bool = False):
        self.use = use
        self.items = items
        self.bias = bias

    def add_into(self, weight: torch.Tensor, strength: float, key: str = "") -> torch.Tensor:
        """Add strength·ΔW into `weight` (the host's fp32 working copy) in place and return it.

        A result the working copy cannot hold (±Inf from finite inputs) is refused, naming
        the weight; `key` is how the host calls it.
        """
        use = Use(self.use.network, strength, strength, self.use.blocks)
        items = [replace(item, use=use) for item in self.items]
        risky = overflow_possible(items, weight.dtype)
        before = weight.clone() if risky else None
        with torch.no_grad():
            (apply_to_bias if self.bias else apply_to_tensor)(weight, items)
        if risky and overflowed(weight, before):
            raise overflow_error(key or items[0].target.key, items, weight.dtype)
        return weight


@dataclass
class PatchSet:
    """What one network adds to each host part, and the names that matched nothing."""

    network: Network
    family: str
    patches: dict[str, dict[str, KeyedPatch]] = field(default_factory=dict)  # part -> key -> patch
    unmatched: list[str] = field(default_factory=list)


def plan_keyed(network: Network, parts: Mapping[str, Mapping[str, tuple]], blocks: str = "",
               patch_type: type[KeyedPatch] = KeyedPatch) -> PatchSet:
    """Match `network` against a host's parts and prepare one patch per changed tensor.

    `parts` maps "model" and/or "clip" to the shapes of that part's state dict
    ({key: shape}). `blocks` is a block-weight preset or comma list (`loha.keys.blocks`). Names of
    a part that is not given (text encoders for a model-only loader) are not counted
    as unmatched. Raises `LohaError` for a file of another model family, and when
    nothing at all matches.
    """
    shapes = {key: shape for part in parts.values() for key, shape in part.items()}
    names = map_state_dict(shapes)
    use = Use(network, 1.0, 1.0, block_weights.parse(blocks, names.family))
    items, unmatched = plan_modules(names, [use], shape_of=shapes.get)
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
        part_patches[key] = patch_type(use, group)
        if any(item.bias is not None for item in group):
            part_patches[bias_key(key)] = patch_type(use, group, bias=True)
    return result
