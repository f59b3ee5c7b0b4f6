"""The WebUI extension on Forge (2.x): LoHa as keyed patches on Forge's own patchers.

Forge keeps the loaded model's UNet and text encoders in ModelPatchers
(`sd_model.forge_objects`) and rebuilds their weights from its backups whenever the
set of patches changes, so weights patched in place (the AUTOMATIC1111 path) would
be overwritten. Here each LoHa becomes patches of a type Forge hands to a registered
calculator (`extra_weight_calculators`), which adds ΔW with loha's kernels into Forge's
fp32 working copy; Forge then rounds once, keeps its backups and unpatches.

Forge samples with `forge_objects_after_applying_lora`, which the built-in Lora
extension sets: our patches go on clones of its patchers once every extra network has
been activated, so `<lora:a> <loha:b>` in either order gives the base with both, and
without LoHa the patchers are the built-in's again.

Names are matched by loha's map, and where it has none by Forge's own LoRA key map
(`backend.patcher.lora.model_lora_keys_unet`/`_clip`, ComfyUI's format; the WebUI script
passes it in), so every model Forge patches with LoRA (Flux included) takes LoHa here too.
"""

from __future__ import annotations

from ..errors import LohaError
from ..keyed import PatchSet, plan_keyed
from .webui import NetworkFiles, file_stamp

#: The patch type name our patches carry in Forge's patch lists ("loha" is Forge's own).
PATCH_TYPE = "loha_fused"


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects_after_applying_lora")


def weight_calculator(weight, strength, patch):
    """What Forge's weight merging calls for a patch of type `PATCH_TYPE` (the WebUI script registers it)."""
    return patch.add_into(weight, strength)


def _shapes(module) -> dict[str, tuple]:
    return {key: tuple(t.shape) for key, t in module.state_dict().items()}


class ForgeActive:
    """The LoHa wanted now, the patchers we made for them, and plans cached per file and model."""

    def __init__(self, key_map=lambda unet, clip: {}):
        self.key_map = key_map  # (unet patcher, clip) -> Forge's own LoRA key map
        self.wanted: list = []  # (Request, path) pairs from the last activate
        self.unresolved: dict[str, str] = {}  # request name -> why it has no file (from the last activate)
        self.unmatched: dict[str, list[str]] = {}
        self.unknown_keys: dict[str, list[str]] = {}  # label -> keys of no kind loha applies
        self.failed: dict[str, str] = {}  # request name -> why it was left out
        self._key: tuple = ()
        self._base = None  # the built-in's (unet, clip) our patchers were cloned from
        self._ours = None  # (unet, clip) with our patches, as put into the engine
        self._plans: dict[tuple, PatchSet] = {}
        self._files = NetworkFiles()

    def apply(self, sd_model) -> bool:
        """Make the engine's patchers the built-in's plus the wanted LoHa (or the built-in's alone);
        returns whether the set (requests, file versions) changed since the last call.

        Forge copies `forge_objects_after_applying_lora` into `forge_objects` before it
        samples, and the built-in rebuilds that object only when its own networks
        change; when it still holds our patchers, the built-in's are the ones we kept.
        A LoHa that cannot be applied is left out, its reason in `failed`.
        """
        key = tuple((request, path, file_stamp(path)) for request, path in self.wanted)
        changed, self._key = key != self._key, key
        after = sd_model.forge_objects_after_applying_lora
        current = (after.unet, after.clip)
        ours_still_there = self._ours is not None and all(a is b for a, b in zip(current, self._ours))
        base = self._base if ours_still_there else current
        self.unmatched, self.unknown_keys, self.failed = {}, {}, {}
        if not self.wanted:
            ours = base
        else:
            ours = self._patched(*base)
        self._base, self._ours = base, (ours if self.wanted else None)
        after.unet, after.clip = ours
        sd_model.forge_objects.unet, sd_model.forge_objects.clip = ours
        return changed

    def clear(self, sd_model) -> None:
        """No LoHa: the engine gets the built-in's patchers back."""
        self.wanted, self.unresolved = [], {}
        self.apply(sd_model)

    def _patched(self, base_unet, base_clip):
        unet, clip = base_unet.clone(), base_clip.clone()
        parts = {"model": unet.model, "clip": clip.patcher.model}
        for request, path in self.wanted:
            try:
                planned = self._plan(request, path, parts, lambda: self.key_map(unet, clip))
            except LohaError as exc:
                self.failed[request.name] = str(exc)
                continue
            self.unmatched[planned.network.label] = planned.unmatched
            if planned.network.unknown_keys:
                self.unknown_keys[planned.network.label] = list(planned.network.unknown_keys)
            tag = f"{path}#loha:{request.lbw or ''}"
            for target, part, strength in ((unet, "model", request.unet), (clip, "clip", request.te)):
                patches = {key: (PATCH_TYPE, patch) for key, patch in planned.patches[part].items()}
                if patches:
                    target.add_patches(filename=tag, patches=patches, strength_patch=strength)
        return unet, clip

    def _plan(self, request, path: str, parts: dict, key_map) -> PatchSet:
        network = self._files.get(path)
        key = (id(network), request.lbw, *(id(module) for module in parts.values()))
        if key not in self._plans:
            shapes = {part: _shapes(module) for part, module in parts.items()}
            self._plans = {k: v for k, v in self._plans.items() if v.network.path != path}
            self._plans[key] = plan_keyed(network, shapes, request.lbw or "", key_map=key_map())
        return self._plans[key]
