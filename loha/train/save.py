"""Write a trained network as LyCORIS/kohya write it: tensors plus ss_* metadata.

The names and metadata are what kohya's sd-scripts record when they train with
``--network_module lycoris.kohya --network_args algo=loha …`` (network args as
strings, ``ss_tag_frequency`` as JSON, times as Unix seconds), so every loader and
every metadata viewer reads our files like theirs. Files appear only when complete
(`safetensors_io.save`), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import torch

from ..families import BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE
from ..files.safetensors_io import model_hash, save


#: What a file says about itself -> where sd-scripts (`sai_model_spec.build_metadata`) writes it.
ABOUT_KEYS = {"title": "modelspec.title", "author": "modelspec.author", "description": "modelspec.description",
              "license": "modelspec.license", "tags": "modelspec.tags", "trigger_phrase": "modelspec.trigger_phrase",
              "prediction_type": "modelspec.prediction_type"}
#: modelspec's prediction-type spelling.
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}


def network_metadata(spec, family: str, *, name: str, started_at: float, steps: int, settings: Mapping,
                     tag_frequency: Mapping, dataset: Mapping, about: Mapping | None = None,
                     resolution: int | None = None) -> dict[str, str]:
    """The ss_* / modelspec.* metadata of a LoHa trained with `spec` on a `family` model.

    `about` holds title, author, description, license, tags, trigger_phrase and prediction_type
    (empty ones are left out), written as sd-scripts writes them, so the WebUI's metadata view
    and civitai show them."""
    args = {
        "algo": "loha",
        "preset": spec.preset,
        "conv_dim": str(spec.conv_rank),
        "conv_alpha": str(spec.conv_alpha),
        "use_tucker": str(spec.use_tucker),
    }
    args.update({k: str(getattr(spec, k)) for k in ("rank_dropout", "module_dropout") if getattr(spec, k)})
    args.update({k: "True" for k in ("dora_wd", "train_norm") if getattr(spec, k)})
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
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[family]}/lycoris",
        "modelspec.implementation": "https://github.com/KohakuBlueleaf/LyCORIS",
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
    }
    about = dict(about or {})
    if "prediction_type" in about:
        about["prediction_type"] = _MODELSPEC_PREDICTION.get(about["prediction_type"], about["prediction_type"])
    meta.update({ABOUT_KEYS[k]: str(v) for k, v in about.items() if v})
    if resolution:
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    meta.update({f"ss_{k}": str(v) for k, v in settings.items() if v is not None})
    return meta


def write_network(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> str:
    """Write with kohya's `sshs_model_hash` added (atomically); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(tensors, path, {**metadata, "sshs_model_hash": model_hash(tensors)})
    return path
