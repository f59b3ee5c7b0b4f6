"""ComfyUI weight patches whose ΔW is computed by loha's kernels.

ComfyUI patches a model by cloning its ModelPatcher and adding, per weight key, a
list of patches. A patch that is a ``WeightAdapterBase`` is asked through
``calculate_weight``: `LohaPatch` is one (a `loha.keyed.KeyedPatch`), so ComfyUI's
memory management, unpatching, hooks and CheckpointSave keep working while
`loha.patch.apply_to_tensor` (and so `loha.kernels`) does the math.

Everything here works without ComfyUI too (the base class is then ``object``), so
the planning and the arithmetic are tested in CI on plain state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loha.files.network import Network
from loha.keyed import KeyedPatch, PatchSet, plan_keyed

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
