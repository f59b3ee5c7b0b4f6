"""Write a trained network as LyCORIS/kohya write it: tensors plus ss_* metadata.

The names and metadata are what kohya's sd-scripts record when they train with
``--network_module lycoris.kohya --network_args algo=loha …`` (network args as
strings, ``ss_tag_frequency`` as JSON, times as Unix seconds), so every loader and
every metadata viewer reads our files like theirs. Files are written to a temporary
name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping

import torch

from ..stream import save as save_tensors

#: Our family name -> kohya's ss_base_model_version and modelspec.architecture.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


def network_metadata(spec, family: str, *, name: str, started_at: float, steps: int, settings: Mapping,
                     tag_frequency: Mapping, dataset: Mapping) -> dict[str, str]:
    """The ss_* / modelspec.* metadata of a LoHa trained with `spec` on a `family` model."""
    args = {
        "algo": "loha",
        "preset": spec.preset,
        "conv_dim": str(spec.conv_rank),
        "conv_alpha": str(spec.conv_alpha),
        "use_tucker": str(spec.use_tucker),
    }
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps(args),
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(spec.alpha),
        "ss_network_train_unet_only": str(not spec.text_encoder),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": name,
        "ss_training_started_at": repr(float(started_at)),
        "ss_training_finished_at": repr(time.time()),
        "ss_steps": str(steps),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset, ensure_ascii=False),
        "ss_num_train_images": str(sum(d["img_count"] * d["n_repeats"] for d in dataset.values())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE[family]}/lycoris",
        "modelspec.implementation": "https://github.com/KohakuBlueleaf/LyCORIS",
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
    }
    meta.update({f"ss_{k}": str(v) for k, v in settings.items() if v is not None})
    return meta


def model_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """kohya's sshs_model_hash: sha256 of the file's data section (unchanged by metadata)."""
    from safetensors.torch import save

    blob = save(dict(tensors))
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def write_network(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> str:
    """Write atomically (temporary file, then rename); returns the path."""
    metadata = {**metadata, "sshs_model_hash": model_hash(tensors)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial"
    try:
        save_tensors(tensors, partial, metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path
