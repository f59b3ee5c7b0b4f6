"""Training configs as files, with kohya sd-scripts' key names, and what differs between two.

A config file is TOML or JSON (by its extension), flat as sd-scripts' ``--output_config``
writes it (sections, as in its ``--config_file``, are read as if flat). Settings that
sd-scripts has keep its key (``network_dim``, ``learning_rate``, ``max_train_steps``,
``train_batch_size``, ``optimizer_type``, …); the LoHa layout goes into ``network_args``
as LyCORIS reads them (``algo=loha``, ``conv_dim=…``); the few settings of loha's own
keep their `TrainConfig` names. `CONFIG_PRESETS` ship with the package.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from ..errors import LohaError
from .loop import TrainConfig
from .modules import NetworkSpec
from .optim import parse_arguments

#: TrainConfig field -> sd-scripts key, where the two differ (the rest keep their names).
KOHYA_NAMES = {
    "model": "pretrained_model_name_or_path",
    "data": "train_data_dir",
    "bucket_step": "bucket_reso_steps",
    "batch_size": "train_batch_size",
    "steps": "max_train_steps",
    "epochs": "max_train_epochs",
    "optimizer": "optimizer_type",
    "warmup_steps": "lr_warmup_steps",
    "save_every": "save_every_n_steps",
    "sample_every": "sample_every_n_steps",
    "save_dtype": "save_precision",
    "title": "metadata_title",
    "author": "metadata_author",
    "description": "metadata_description",
    "license": "metadata_license",
    "tags": "metadata_tags",
    "trigger_words": "metadata_trigger_phrase",
    "comment": "training_comment",
}
#: Fields written another way: the output (output_dir + output_name), the network, v-prediction,
#: weight decay (an optimizer argument in sd-scripts).
_SPECIAL = ("output", "network", "prediction_type", "weight_decay", "optimizer_args", "resolution", "save_dtype")
#: NetworkSpec field -> (sd-scripts key or network_args name, type).
_NETWORK = {"rank": ("network_dim", int), "alpha": ("network_alpha", float), "preset": ("preset", str),
            "conv_rank": ("conv_dim", int), "conv_alpha": ("conv_alpha", float), "use_tucker": ("use_tucker", bool),
            "rank_dropout": ("rank_dropout", float), "module_dropout": ("module_dropout", float),
            "dora_wd": ("dora_wd", bool), "train_norm": ("train_norm", bool)}
#: sd-scripts' save_precision spelling of fp32.
_PRECISION = {"fp32": "float"}
CONFIG_PRESETS = {name: os.path.join(os.path.dirname(__file__), "presets", f"{name}.toml")
                  for name in ("demo", "sd15-loha", "sdxl-loha")}
CONFIG_EXTENSIONS = (".toml", ".json")


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def to_kohya(config: TrainConfig) -> dict:
    """The config as sd-scripts keys (None values left out: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _SPECIAL or value is None:
            continue
        out[KOHYA_NAMES.get(f.name, f.name)] = value
    out["output_dir"], name = os.path.split(os.path.abspath(config.output))
    out["output_name"] = name.removesuffix(".safetensors")
    out["resolution"] = f"{config.resolution},{config.resolution}"
    out["save_precision"] = _PRECISION.get(config.save_dtype, config.save_dtype)
    if config.prediction_type is not None:
        out["v_parameterization"] = config.prediction_type == "v_prediction"
    out["optimizer_args"] = [f"weight_decay={config.weight_decay}",
                             *(f"{k}={v}" for k, v in config.optimizer_args.items())]
    spec = config.network
    out["network_module"] = "lycoris.kohya"
    out["network_dim"], out["network_alpha"] = spec.rank, spec.alpha
    out["network_args"] = ["algo=loha"] + [f"{name}={getattr(spec, field)}" for field, (name, _) in _NETWORK.items()
                                           if field not in ("rank", "alpha")]
    out["network_train_unet_only"] = not spec.text_encoder
    return out


def from_kohya(values: dict, where: str = "config") -> dict:
    """TrainConfig keyword arguments from sd-scripts keys (what the file does not say is left out)."""
    values = _flat(values)
    renamed = {v: k for k, v in KOHYA_NAMES.items()}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out, unknown = {}, []
    network = {}
    args = {}
    for key, value in values.items():
        name = renamed.get(key, key)
        if key == "network_module":
            if value not in ("lycoris.kohya", "lycoris"):
                raise LohaError(f"{where}: network_module {value!r} is not LyCORIS's (lycoris.kohya)")
        elif key in ("network_dim", "network_alpha"):
            field = "rank" if key == "network_dim" else "alpha"
            network[field] = _NETWORK[field][1](value)
        elif key == "network_args":
            args = parse_arguments(value if not isinstance(value, str) else value.split())
        elif key == "network_train_unet_only":
            network["text_encoder"] = not _bool(value)
        elif key == "v_parameterization":
            out["prediction_type"] = "v_prediction" if _bool(value) else "epsilon"
        elif key in ("output_dir", "output_name"):
            continue
        elif key == "resolution":
            out["resolution"] = _resolution(value, where)
        elif key == "save_precision":
            out["save_dtype"] = {v: k for k, v in _PRECISION.items()}.get(value, value)
        elif key == "optimizer_args":
            opts = parse_arguments(value)
            if "weight_decay" in opts:
                out["weight_decay"] = float(opts.pop("weight_decay"))
            out["optimizer_args"] = opts
        elif name in fields and name not in _SPECIAL:
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise LohaError(f"{where}: settings loha does not know: {', '.join(sorted(unknown))}")
    algo = str(args.pop("algo", "loha")).lower()
    if algo != "loha":
        raise LohaError(f"{where}: network_args algo={algo}; loha trains LoHa (algo=loha)")
    for field, (name, kind) in _NETWORK.items():
        if name in args:
            network[field] = _bool(args.pop(name)) if kind is bool else kind(args.pop(name))
    if args:
        raise LohaError(f"{where}: network_args loha does not know: {', '.join(sorted(args))}")
    if network:
        out["network"] = network
    if "output_name" in values or "output_dir" in values:
        name = str(values.get("output_name") or "last")
        out["output"] = os.path.join(str(values.get("output_dir") or "."), name + ".safetensors")
    return out


def _flat(values: dict) -> dict:
    """Sections (sd-scripts' --config_file groups) read as one flat table."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("optimizer_args",):
            out.update(value)
        else:
            out[key] = value
    return out


def _resolution(value, where: str) -> int:
    sides = [int(v) for v in str(value).replace("x", ",").split(",") if str(v).strip()]
    if not sides or len(sides) > 2:
        raise LohaError(f"{where}: resolution {value!r} is not 'N' or 'W,H'")
    return sides[0] if len(sides) == 1 else int(math.sqrt(sides[0] * sides[1]))


def build_config(values: dict) -> TrainConfig:
    """A TrainConfig from keyword arguments whose `network` may be a dict."""
    values = dict(values)
    if isinstance(values.get("network"), dict):
        values["network"] = NetworkSpec(**values["network"])
    missing = [k for k in ("data", "output") if k not in values]
    if missing:
        raise LohaError(f"the config lacks {' and '.join(missing)}")
    return TrainConfig(**values)


def read_config(path: str) -> dict:
    """TrainConfig keyword arguments from a TOML/JSON file or a preset name."""
    path = CONFIG_PRESETS.get(path, path)
    if not os.path.isfile(path):
        raise LohaError(f"{path}: no such config file (or preset: {', '.join(CONFIG_PRESETS)})", option="config")
    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        else:
            with open(path, "rb") as f:
                values = _toml_reader().load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise LohaError(f"{path}: not a valid config file ({exc})", option="config") from None
    if not isinstance(values, dict):
        raise LohaError(f"{path}: a config file holds a table of settings", option="config")
    return from_kohya(values, path)


def write_config(config: TrainConfig, path: str) -> str:
    """Write `config` as sd-scripts keys (TOML unless the name ends in .json); returns the path."""
    values = to_kohya(config)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if path.lower().endswith(".json"):
        text = json.dumps(values, indent=2, ensure_ascii=False) + "\n"
    else:
        import tomli_w

        text = tomli_w.dumps(values)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _toml_reader():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli

    return tomli


#: Settings a resume cannot change: the factors' shapes and meaning, and the optimizer state's kind.
_FIXED = ("network", "optimizer")


def differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(what stops a resume, what merely changed) between two configs as `dataclasses.asdict` gives
    them; settings the saved one lacks (a state from an older version) count as unchanged, except
    network fields: a state without one trained with its default (no ``train_norm``, for instance)."""
    blocking, notes = [], []
    defaults = {f.name: f.default for f in dataclasses.fields(NetworkSpec)}
    for key in sorted(saved):  # settings newer than the state are not in it
        if key == "resume" or key not in current:  # a setting this version no longer has
            continue
        old, new = saved.get(key), current.get(key)
        if key == "network" and isinstance(old, dict) and isinstance(new, dict):
            for field in sorted(new):
                was = old.get(field, defaults.get(field))
                if was != new[field]:
                    blocking.append(f"network {field}: {was!r} in the state, {new[field]!r} now")
        elif old != new:
            line = f"{key}: {old!r} in the state, {new!r} now"
            (blocking if key in _FIXED else notes).append(line)
    return blocking, notes
