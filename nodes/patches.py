"""ComfyUI weight patches whose ΔW is computed by loha's kernels, and the bypass injection.

ComfyUI patches a model by cloning its ModelPatcher and adding, per weight key, a
list of patches. A patch that is a ``WeightAdapterBase`` is asked through
``calculate_weight``: `LohaPatch` is one (a `loha.keyed.KeyedPatch`), so ComfyUI's
memory management, unpatching, hooks and CheckpointSave keep working while
`loha.patch.apply_to_tensor` (and so `loha.kernels`) does the math.

In bypass mode the clone gets a patcher injection instead (`bypass_injection`): ComfyUI
injects it when it loads that clone and ejects it when it unloads it, so the weights
are never written and clones of one model stay independent. `comfy_layer_weights` reads
a layer's weight the way its own forward does (cast, dequantized by ComfyUI-GGUF's
layers, low-VRAM patches applied).

Everything here works without ComfyUI too (the base class is then ``object``), so
the planning and the arithmetic are tested in CI on plain state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loha.bypassing import torch_layer_weights
from loha.files.network import Network
from loha.keyed import KeyedBypass, KeyedPatch, PatchSet, plan_keyed

try:
    from comfy.weight_adapter.base import WeightAdapterBase
except ImportError:  # outside ComfyUI
    WeightAdapterBase = object


class LohaPatch(KeyedPatch, WeightAdapterBase):
    """A `KeyedPatch` in ComfyUI's weight-adapter shape.

    ComfyUI passes the strength it was added with (and any hook strength) to
    `calculate_weight`; our patches are added under plain keys, so it passes no offset
    and an identity `function`.
    """

    name = "loha"

    def __init__(self, use, items: list, bias: bool = False):
        super().__init__(use, items, bias)
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []  # ComfyUI's adapters list tensors here; ours are in items

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        return self.add_into(weight, strength, key)


def plan_patches(network: Network, parts: Mapping[str, Mapping[str, tuple]], blocks: str = "",
                 key_map: Mapping[str, object] | None = None) -> PatchSet:
    """`loha.keyed.plan_keyed` with ComfyUI's `LohaPatch`es (parts "model" and "clip").

    `key_map` is ComfyUI's own (`comfy.lora.model_lora_keys_unet`/`_clip`): names it
    knows and loha does not are taken from it, so every file Load LoRA loads loads here.
    """
    return plan_keyed(network, parts, blocks, LohaPatch, key_map)


def comfy_layer_weights(module: torch.nn.Module, x: torch.Tensor | None):
    """(weight, bias) as a ComfyUI layer multiplies x by them; for x None, fp32 on the weight's device."""
    if not hasattr(module, "comfy_cast_weights"):
        return torch_layer_weights(module, x)
    import comfy.ops

    cast = getattr(module, "cast_bias_weight", None)  # ComfyUI-GGUF's layers dequantize in their own
    if x is None:
        options = {"dtype": torch.float32, "device": module.weight.device}
        return cast(**options) if cast is not None else comfy.ops.cast_bias_weight(module, **options)
    getattr(comfy.ops, "run_every_op", lambda: None)()  # what the layer's forward checks first (interrupts)
    return cast(x) if cast is not None else comfy.ops.cast_bias_weight(module, x)


def bypass_injection(network: Network, patches: Mapping, strength: float) -> KeyedBypass:
    """A patcher injection applying `patches` (one part's, from `plan_patches`) in the forward pass."""
    return KeyedBypass(network, patches, strength, comfy_layer_weights)
