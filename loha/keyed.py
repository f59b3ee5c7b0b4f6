"""Per-weight patches for hosts that patch a model by state-dict key (ComfyUI, Forge).

Such a host keeps, for each weight key, a list of patches; when it loads the model it
copies the weight to fp32, asks every patch to add its change, rounds once and keeps
the original to unpatch. `plan_keyed` matches a network against the host's parts
(their state-dict shapes) once, and gives one `KeyedPatch` per changed tensor whose
`add_into` runs `loha.patch.apply_to_tensor` (and so `loha.kernels`) on that copy.
The hosts' own adapters (nodes/patches.py, the WebUI script on Forge) only wrap it.

For a model loha has no layout for, the host's own key map is the knowledge: ComfyUI's
``comfy.lora.model_lora_keys_unet``/``_clip`` (and Forge's copies of them) say, per file
name, a key, a key and a row slice, or a key and a function on ΔW. `host_targets` turns
such a map into targets, so every name the host's own LoRA loader accepts, ours accepts,
and our kernels still do the math (on the slice).

`KeyedBypass` applies the same plan in the forward pass instead (`loha.bypassing`): an
object with inject(owner)/eject(owner), the shape of ComfyUI's patcher injections, that
the host calls when it loads and unloads the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .bypassing import BypassHandle, LayerWeights, layer_module
from .errors import LohaError
from .families import component_of
from .files.network import Network
from .keys import NameMap, Target, bias_key, map_state_dict
from .keys import blocks as block_weights
from .keys.namemap import pieces_target
from .patch import (Use, apply_to_bias, apply_to_tensor, by_tensor, overflow_error, overflow_possible, overflowed,
                    plan_modules)

#: Host model part -> the file components (families.component_of) it holds.
PART_COMPONENTS = {"model": {"unet"}, "clip": {"te1", "te2", "te3"}}


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
    family: str | None
    patches: dict[str, dict[str, KeyedPatch]] = field(default_factory=dict)  # part -> key -> patch
    unmatched: list[str] = field(default_factory=list)


def host_targets(key_map: Mapping[str, object], shapes: Mapping[str, tuple], names: NameMap) -> dict[str, Target]:
    """A host's key map ({file name: key | (key, offset) | (key, offset, function)}) as targets.

    ``offset`` is ComfyUI's ``(dim, start, length)``; only row slices (dim 0) occur in
    its maps. The only ``function`` its maps use swaps ΔW's two row halves (Flux's and
    SD3's final modulation, diffusers' scale/shift against the checkpoint's shift/scale):
    it becomes a target over the two halves. Where `names` already has a target for the
    same rows, that one is used (so block ids stay); a new one takes the host's name as
    its path. Names for tensors no LoHa can change (1-D: biases, norms) and forms not
    described here are left out.
    """
    own = {_region(target): target for target in names.targets}
    found = {}
    for name, value in key_map.items():
        key, offset, function = (value, None, None) if isinstance(value, str) else (*value, None, None)[:3]
        shape = shapes.get(key)
        if shape is None or len(shape) < 2 or (offset is not None and offset[0] != 0):
            continue
        start, stop = (0, shape[0]) if offset is None else (offset[1], offset[1] + offset[2])
        region = [(key, None if (start, stop) == (0, shape[0]) else (start, stop))]
        if function is not None:
            if getattr(function, "__name__", "") != "swap_scale_shift" or (stop - start) % 2:
                continue
            half = (start + stop) // 2
            region = [(key, (half, stop)), (key, (start, half))]
        target = own.get(tuple(region))
        if target is None:
            component = "unet" if key.startswith("diffusion_model.") else "te1"
            pieces = [Target(component, name, k, r, (r[1] - r[0] if r else shape[0], *shape[1:]), "")
                      for k, r in region]
            target = pieces_target(component, name, pieces)
            own[tuple(region)] = target
        found[name] = target
    return found


def _region(target: Target) -> tuple:
    return tuple((piece.key, piece.rows) for piece in (target.pieces or (target,)))


def plan_keyed(network: Network, parts: Mapping[str, Mapping[str, tuple]], blocks: str = "",
               patch_type: type[KeyedPatch] = KeyedPatch, key_map: Mapping[str, object] | None = None) -> PatchSet:
    """Match `network` against a host's parts and prepare one patch per changed tensor.

    `parts` maps "model" and/or "clip" to the shapes of that part's state dict
    ({key: shape}). `blocks` is a block-weight preset or comma list (`loha.keys.blocks`).
    `key_map` is the host's own key map (`host_targets`): its names count where ours
    have none. Names of a part that is not given (text encoders for a model-only loader)
    are not counted as unmatched. Raises `LohaError` for a file of another SD family,
    and when nothing at all matches.
    """
    shapes = {key: shape for part in parts.values() for key, shape in part.items()}
    names = map_state_dict(shapes)
    if key_map:
        names.extend(host_targets(key_map, shapes, names))
    model = f"{names.family} model" if names.family else "model"
    use = Use(network, 1.0, 1.0, block_weights.parse(blocks, names.family))
    items, unmatched = plan_modules(names, [use], shape_of=shapes.get)  # refuses a file of another SD family
    wanted = set().union(*(PART_COMPONENTS[part] for part in parts))
    relevant = [name for name in network.modules if component_of(name) in wanted | {None}]
    result = PatchSet(network, names.family, {part: {} for part in parts})
    result.unmatched = [name for name in unmatched.get(network.label, []) if name in set(relevant)]
    if relevant and len(result.unmatched) == len(relevant):
        raise LohaError(
            f"{network.label}: none of its {len(relevant)} modules matches this {model} "
            f"(the file looks like {network.family or 'an unknown family'}; first name: '{relevant[0]}')"
        )
    owner = {key: part for part, state in parts.items() for key in state}
    for key, group in by_tensor(items).items():
        part_patches = result.patches[owner[key]]
        part_patches[key] = patch_type(use, group)
        if any(item.bias is not None for item in group):
            part_patches[bias_key(key)] = patch_type(use, group, bias=True)
    return result


class KeyedBypass:
    """One network's plan for one host part, applied in the forward pass while the host says so.

    The host calls `inject(owner)` when it loads the model `root(owner)` (a module tree
    whose state-dict keys are the plan's keys) and `eject(owner)` when it unloads it;
    each owner (a clone of the host's patcher) gets its own `BypassHandle`, so clones
    sharing one model never see each other's networks. `layer_weights` tells how the
    host's layers read their weight (see `loha.bypassing.LayerWeights`).
    """

    def __init__(self, network: Network, patches: Mapping[str, KeyedPatch], strength: float,
                 layer_weights: LayerWeights | None = None, root=lambda owner: owner.model):
        weights = [patch for patch in patches.values() if not patch.bias]  # diff_b rides on its weight's items
        blocks = weights[0].use.blocks if weights else {}
        self.use = Use(network, strength, strength, blocks)
        self.items = {key: [replace(item, use=self.use) for item in patch.items]
                      for key, patch in patches.items() if not patch.bias}
        self.layer_weights = layer_weights
        self.root = root
        self._handles: dict[int, BypassHandle] = {}

    def check(self, model: torch.nn.Module) -> None:
        """Raise a `LohaError` now if a key names no Linear or convolution layer of `model`."""
        self._layers(model)

    def inject(self, owner) -> None:
        if id(owner) not in self._handles:
            self._handles[id(owner)] = BypassHandle([self.use], self._layers(self.root(owner)),
                                                    layer_weights=self.layer_weights)

    def eject(self, owner) -> None:
        handle = self._handles.pop(id(owner), None)
        if handle is not None:
            handle.remove()

    def _layers(self, model: torch.nn.Module) -> dict:
        layers = {}
        for key, items in self.items.items():
            path, _, attr = key.rpartition(".")
            try:
                found = (model.get_submodule(path), attr)
            except AttributeError:
                raise LohaError(f"{self.use.network.label}: the model has no layer '{path}' for '{key}'") from None
            layers[key] = (layer_module(found, key, items), items)
        return layers
