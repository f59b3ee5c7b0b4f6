"""LoHa Merge and Save: bake the patched MODEL/CLIP (+ VAE) into a checkpoint file.

ComfyUI loads the patchers with every patch baked in (our LoHa patches and anyone
else's), hands back the LDM-layout state dict it would save itself, and
`loha.files.safetensors_io` writes it tensor by tensor, so the file is never held twice
in memory, and only under its name once complete.
The LoHa files found among the patches are recorded in the `loha_merged` metadata,
in the form `loha merge` writes.
"""

from __future__ import annotations

import json

from loha.files.safetensors_io import save
from loha.merge_records import MERGED_KEY, merge_record
from loha.patch import Use

from . import host
from .loaders import CATEGORY
from .patches import LohaPatch

EXTENSION = ".safetensors"


def merged_uses(model, clip) -> list[Use]:
    """One `Use` per LoHa file patched into `model`/`clip`, with the strengths it was added at."""
    found: dict[str, dict] = {}
    for part, patcher in (("unet", model), ("te", clip.patcher)):
        for entries in patcher.patches.values():
            for strength, patch, *_ in entries:
                if isinstance(patch, LohaPatch):
                    net = patch.use.network
                    record = found.setdefault(net.label, {"use": patch.use, "unet": 0.0, "te": 0.0})
                    record[part] = strength
    return [Use(r["use"].network, r["unet"], r["te"], r["use"].blocks) for r in found.values()]


def write_merged(path: str, tensors: dict, metadata: dict[str, str], bar) -> None:
    """Stream `tensors` into `path`, ticking ComfyUI's progress bar once per tensor."""
    save(tensors, path, metadata, written=lambda entry: bar.update(1))


class LohaMergeSave:
    DESCRIPTION = ("Saves the model and text encoder with every applied LoHa (and any other patch) "
                   "baked in, plus the VAE if given, as a checkpoint in the output folder.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The patched diffusion model to save."}),
                "clip": ("CLIP", {"tooltip": "The patched text encoder to save."}),
                "filename_prefix": ("STRING", {"default": "checkpoints/loha", "tooltip": (
                    "Where to save under the output folder; a number and .safetensors are appended.")}),
            },
            "optional": {"vae": ("VAE", {"tooltip": "A VAE to include, so the file is a full checkpoint."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, model, clip, filename_prefix, vae=None, prompt=None, extra_pnginfo=None):
        path = host.save_path(filename_prefix, EXTENSION)
        uses = merged_uses(model, clip)
        host.load_patched([model, clip.patcher])
        tensors = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd() if vae is not None else None)
        metadata = {MERGED_KEY: json.dumps([merge_record(use, len(use.network.modules)) for use in uses], ensure_ascii=False)}
        if host.metadata_enabled():
            metadata["prompt"] = json.dumps(prompt)
            metadata.update({k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()})
        write_merged(path, tensors, metadata, host.progress(len(tensors)))
        return {"ui": {"text": [path]}}


NODES = {"LohaMergeSave": (LohaMergeSave, "LoHa Merge and Save")}
