"""LoHa Loader (also model only, and bypass) and LoHa Stack: drop-ins for ComfyUI's LoraLoader.

Each clones the MODEL/CLIP patchers it is given and adds `LohaPatch`es at the
strengths asked for, exactly where the built-in loader adds its own patches; the
original patchers are untouched, so removing the node restores the base model. In
bypass mode the clone gets a patcher injection instead, which applies the network in
the forward pass while ComfyUI has that clone loaded: the weights are never written
(for GGUF/fp8/quantized models, low-VRAM offloading, and models several graphs share).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict

import loha

from . import host
from .patches import PatchSet, bypass_injection, plan_patches

CATEGORY = "loaders/loha"
LOG = logging.getLogger("loha")
STACK_SLOTS = 4
NONE = "None"
#: Planned files kept for re-runs that only change strengths (the patches take the
#: strength when ComfyUI applies them, so a plan serves every strength).
PLAN_CACHE_SIZE = 8
_plans: OrderedDict = OrderedDict()

MODEL_IN = ("MODEL", {"tooltip": "The diffusion model to apply the LoHa to."})
CLIP_IN = ("CLIP", {"tooltip": "The text encoder(s) to apply the LoHa to."})
#: ComfyUI passes the node's id, so what is not applied can be shown on that node.
NODE_ID = {"unique_id": "UNIQUE_ID"}
BLOCKS_IN = ("LOHA_BLOCKS", {"tooltip": "Per-block strengths from a LoHa Block Weights node; "
                                        "without it every block gets the full strength."})
BYPASS_IN = ("BOOLEAN", {"default": False, "label_on": "bypass", "label_off": "patch",
                         "tooltip": "Apply the networks in the forward pass instead of patching the weights: for "
                                    "GGUF/fp8/quantized models, low-VRAM offloading and shared models. Same image; "
                                    "each step costs a little more, nothing is patched or backed up."})
#: Patcher injection keys start with this (one key per applied file, so loaders chain).
INJECTION_PREFIX = "loha_bypass"


def strength_in(part: str, default: float = 1.0):
    return ("FLOAT", {"default": default, "min": -100.0, "max": 100.0, "step": 0.01,
                      "tooltip": f"How strongly to change the {part}; 0 leaves it as it is, "
                                 "negative values invert the effect."})


def lora_in(extra=()):
    return (list(extra) + host.lora_names(),
            {"tooltip": "A LoHa file (LoRA and LoKr modules in it work too) from the loras folders."})


def shapes_of(module) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def planned(path: str, parts: dict[str, dict[str, tuple]], blocks: str, kinds: tuple = (),
            key_map=lambda: None) -> PatchSet:
    """`plan_patches` for the file at `path`, reused while the file and the model stay.

    `kinds` names the model classes (ComfyUI's key map depends on them and the shapes);
    `key_map()` gives ComfyUI's key map, asked for only when a plan is made.
    """
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, blocks, kinds,
           tuple((part, tuple(shapes.items())) for part, shapes in sorted(parts.items())))
    if key in _plans:
        _plans.move_to_end(key)
    else:
        _plans[key] = plan_patches(loha.load(path), parts, blocks, key_map())
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return _plans[key]


def not_applied(result: PatchSet) -> list[str]:
    """What of the file this model does not get: names that match no weight, keys of no known kind."""
    lines = []
    if result.unmatched:
        lines.append(f"{len(result.unmatched)} names match no weight of this {result.family or 'unknown'} model: "
                     + ", ".join(result.unmatched))
    unknown = result.network.unknown_keys
    if unknown:
        lines.append(f"{len(unknown)} keys are of no kind loha applies: " + ", ".join(unknown))
    return lines


def apply_loha(model, clip, path: str, strength_model: float, strength_clip: float, blocks: str = "",
               node_id=None, bypass: bool = False):
    """Clones of `model`/`clip` (either may be None) with the network at `path` added (or bypassed).

    What the file holds but this model does not get is logged and shown on the node `node_id`.
    """
    parts, used = {}, {"model": None, "clip": None}
    if model is not None and strength_model != 0:
        parts["model"], used["model"] = shapes_of(model.model), model
    if clip is not None and strength_clip != 0:
        parts["clip"], used["clip"] = shapes_of(clip.patcher.model), clip
    if not parts:
        return model, clip
    kinds = tuple(type(part.model if name == "model" else part.patcher.model).__name__
                  for name, part in used.items() if part is not None)
    result = planned(path, parts, blocks, kinds, lambda: host.lora_key_map(used["model"], used["clip"]))
    lines = not_applied(result)
    for line in lines:
        LOG.warning("loha: %s: %s", path, line)
    if lines:
        host.notify_node(node_id, f"{os.path.basename(path)}: not applied: " + "; ".join(lines))
    strengths = {"model": strength_model, "clip": strength_clip}
    patched = {"model": model, "clip": clip}
    for part, patches in result.patches.items():
        clone = patched[part].clone()
        if bypass:
            patcher = clone.patcher if part == "clip" else clone
            injection = bypass_injection(result.network, patches, strengths[part])
            injection.check(patcher.model)  # a key no layer answers to fails here, not mid-sampling
            patcher.set_injections(f"{INJECTION_PREFIX}_{uuid.uuid4().hex}", [injection])
        else:
            added = set(clone.add_patches(patches, strengths[part]))
            missed = [key for key in patches if key not in added]
            if missed:
                LOG.warning("loha: %s: %s has no tensors %s", path, part, ", ".join(missed))
        patched[part] = clone
    return patched["model"], patched["clip"]


class LohaLoader:
    DESCRIPTION = ("Applies a LoHa to the model and text encoder, like Load LoRA but computed by "
                   "loha's kernels, with correct DoRA and optional per-block strengths.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with the LoHa applied.", "The text encoder with the LoHa applied.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN,
                "clip": CLIP_IN,
                "lora_name": lora_in(),
                "strength_model": strength_in("diffusion model"),
                "strength_clip": strength_in("text encoder"),
            },
            "optional": {"blocks": BLOCKS_IN},
            "hidden": NODE_ID,
        }

    def load(self, model, clip, lora_name, strength_model, strength_clip, blocks="", unique_id=None):
        return apply_loha(model, clip, host.lora_path(lora_name), strength_model, strength_clip, blocks, unique_id)


class LohaLoaderModelOnly:
    DESCRIPTION = "Applies a LoHa to the diffusion model only (its text-encoder modules are skipped)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the LoHa applied.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": MODEL_IN, "lora_name": lora_in(), "strength_model": strength_in("diffusion model")},
            "optional": {"blocks": BLOCKS_IN},
            "hidden": NODE_ID,
        }

    def load(self, model, lora_name, strength_model, blocks="", unique_id=None):
        return apply_loha(model, None, host.lora_path(lora_name), strength_model, 0, blocks, unique_id)[:1]


class LohaLoaderBypass:
    DESCRIPTION = ("Applies a LoHa in the forward pass of the model and text encoder instead of patching their "
                   "weights: the same image as LoHa Loader, for GGUF, fp8 or quantized models, low-VRAM offloading "
                   "and models shared by several graphs. Each step costs a little more; nothing is backed up.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model running the LoHa in its forward pass.",
                       "The text encoder running the LoHa in its forward pass.")

    @classmethod
    def INPUT_TYPES(cls):
        return LohaLoader.INPUT_TYPES()

    def load(self, model, clip, lora_name, strength_model, strength_clip, blocks="", unique_id=None):
        return apply_loha(model, clip, host.lora_path(lora_name), strength_model, strength_clip, blocks, unique_id,
                          bypass=True)


class LohaStack:
    DESCRIPTION = (f"Applies up to {STACK_SLOTS} LoHa files in order, each with its own strengths; "
                   f"slots set to {NONE} are skipped.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with every LoHa applied.", "The text encoder with every LoHa applied.")

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": MODEL_IN, "clip": CLIP_IN}
        for i in range(1, STACK_SLOTS + 1):
            required[f"lora_{i}"] = lora_in([NONE])
            required[f"strength_model_{i}"] = strength_in("diffusion model")
            required[f"strength_clip_{i}"] = strength_in("text encoder")
        return {"required": required, "optional": {"blocks": BLOCKS_IN, "bypass": BYPASS_IN}, "hidden": NODE_ID}

    def load(self, model, clip, blocks="", bypass=False, unique_id=None, **slots):
        chosen = [i for i in range(1, STACK_SLOTS + 1) if slots[f"lora_{i}"] != NONE]
        bar = host.progress(len(chosen))
        for i in chosen:
            model, clip = apply_loha(model, clip, host.lora_path(slots[f"lora_{i}"]),
                                     slots[f"strength_model_{i}"], slots[f"strength_clip_{i}"], blocks, unique_id,
                                     bypass)
            bar.update(1)
        return model, clip


NODES = {
    "LohaLoader": (LohaLoader, "LoHa Loader"),
    "LohaLoaderModelOnly": (LohaLoaderModelOnly, "LoHa Loader (model only)"),
    "LohaLoaderBypass": (LohaLoaderBypass, "LoHa Loader (bypass)"),
    "LohaStack": (LohaStack, "LoHa Stack"),
}
