"""PEFT LoHa adapters: read a folder as a Network, write a Network back as a folder.

PEFT (``peft.LoHaConfig``, as diffusers-based trainers use it) saves one adapter per
model part, each an ``adapter_config.json`` and an ``adapter_model.safetensors`` whose
tensors are named ``base_model.model.<module path>.hada_w1_a`` … . Trainers put them
in sub-folders named after the part (`ADAPTER_FOLDERS`): PEFT's own dreambooth example
writes ``unet/`` and ``text_encoder/``, diffengine (the trainer of PEFT's LoHa
documentation) ``unet/``, ``text_encoder_one/`` and ``text_encoder_two/`` for SDXL; a
single adapter may sit in the folder itself. diffusers' ``save_lora_weights`` (its
training scripts) instead writes one ``pytorch_lora_weights.safetensors`` whose names
start with the part (``unet.<path>.hada_w1_a``, ``text_encoder_2.…``) and whose adapter
configs, when kept, are the ``lora_adapter_metadata`` JSON, keys prefixed the same way.

The factors are LyCORIS's, in the same orientation, Tucker included (PEFT's
``use_effective_conv2d`` is LyCORIS's ``use_tucker``: ``hada_w*_a`` (R, O), ``hada_w*_b``
(R, I), ``hada_t*`` (R, R, k, k)), and the scale is alpha/r as well. What differs is
where alpha lives: not in the tensors but in the config (``alpha``/``r``, overridden per
module by the regular expressions of ``alpha_pattern``/``rank_pattern``, first match
wins, as PEFT's ``get_pattern_key`` does). A file without a config keeps no alpha: its
scale is taken as 1 (alpha = r), as diffusers assumes for LoRA, and a warning says so.

Configs are untrusted like the tensors: every field is type-checked, and the patterns,
regular expressions from the file, run with a time limit (the ``regex`` engine's
timeout), so a catastrophically backtracking one is refused instead of hanging.

Reading renames every module to its kohya name (``lora_unet_<diffusers path>``,
``lora_te[1|2]_text_model_<path>``) and adds the ``alpha`` tensor, so the result is an
ordinary network for every layout the name map knows, ComfyUI's and the WebUI's too.
Writing needs the base model's module paths (modules planned against diffusers modules).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter, defaultdict

import regex
import torch

from ..errors import FormatError
from ..families import PIPELINE_COMPONENTS, TEXT_MODEL_LEVEL, kohya_prefix
from .network import Network, from_tensors
from .safetensors_io import read_all, save

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: diffusers' `save_lora_weights` output and the metadata key of its adapter configs.
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_CONFIG_KEY = "lora_adapter_metadata"
#: Prefix PEFT puts before module paths in saved adapters.
PEFT_PREFIX = "base_model.model."
#: Adapter sub-folder -> the pipeline attribute of the part it adapts (diffengine numbers SDXL's encoders).
ADAPTER_FOLDERS = {**{attr: attr for attr in PIPELINE_COMPONENTS},
                   "text_encoder_one": "text_encoder", "text_encoder_two": "text_encoder_2"}
#: LoHaConfig's defaults, for configs that leave `r` or `alpha` out.
PEFT_DEFAULTS = {"r": 8, "alpha": 8}
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
#: Longest a rank/alpha pattern may take to match one module path (seconds).
PATTERN_TIMEOUT = 0.25
# Module paths that only a text encoder has (a folder holding one adapter says no part).
_TEXT_PATH = re.compile(r"(^|\.)encoder\.layers\.\d+\.")


def _adapter_dirs(folder: str) -> dict[str, str | None]:
    """{sub-folder path: part attribute or None (part to be guessed)} of the adapters in `folder`."""
    found = {os.path.join(folder, sub): attr for sub, attr in ADAPTER_FOLDERS.items()
             if os.path.isfile(os.path.join(folder, sub, CONFIG_FILE))}
    if not found and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        found[folder] = None
    return found


def pattern_value(patterns, path: str, default, where: str = "adapter config"):
    """PEFT's per-module override: the first pattern matching the end of `path`, else `default`.

    Patterns come from files: each runs under `PATTERN_TIMEOUT`, and one that is not a
    valid expression or takes longer is a `FormatError` naming it and `where` it is.
    """
    for key, value in (patterns or {}).items():
        if not isinstance(key, str):
            raise FormatError(f"{where}: pattern {key!r} is not a string")
        try:
            found = regex.match(rf"(.*\.)?({key})$", path, timeout=PATTERN_TIMEOUT)
        except regex.error as exc:
            raise FormatError(f"{where}: pattern {key[:200]!r} is not a regular expression ({exc})") from None
        except TimeoutError:
            raise FormatError(f"{where}: pattern {key[:200]!r} takes more than {PATTERN_TIMEOUT} s to match "
                              f"'{path}' (catastrophic backtracking); refused") from None
        if found:
            return value
    return default


def _number(value, what: str, where: str, *, rank: bool = False):
    """A config number: a rank is a positive int, an alpha any finite number."""
    ok = (type(value) is int and value >= 1) if rank else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    if not ok:
        kind = "a positive integer" if rank else "a finite number"
        raise FormatError(f"{where}: {what} is {str(value)[:100]!r}; it must be {kind}")
    return value


def check_config(config, where: str) -> dict:
    """An adapter config's fields as loha uses them, each type-checked (untrusted JSON)."""
    if not isinstance(config, dict):
        raise FormatError(f"{where}: the adapter config is a {type(config).__name__}, not an object")
    peft_type = config.get("peft_type", "")
    if not isinstance(peft_type, str) or peft_type.upper() != "LOHA":
        raise FormatError(f"{where}: a PEFT {str(peft_type)[:50]!r} adapter, not LOHA")
    checked = dict(config)
    checked["where"] = where
    checked["r"] = _number(config.get("r", PEFT_DEFAULTS["r"]), "r", where, rank=True)
    checked["alpha"] = _number(config.get("alpha", PEFT_DEFAULTS["alpha"]), "alpha", where)
    for field, rank in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise FormatError(f"{where}: {field} is a {type(patterns).__name__}, not an object of patterns")
        for key, value in patterns.items():
            _number(value, f"{field}[{key[:100]!r}]", where, rank=rank)
            pattern_value({key: value}, "", None, where)  # a bad expression is refused before any module
        checked[field] = patterns
    return checked


def read_adapter(folder: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {suffix: tensor}}) of one PEFT LoHa adapter folder."""
    config_path = os.path.join(folder, CONFIG_FILE)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise FormatError(f"{config_path}: unreadable adapter config ({str(exc)[:200]})") from None
    config = check_config(config, config_path)
    if not os.path.isfile(weights_path):
        raise FormatError(f"{folder}: no {WEIGHTS_FILE} (pickled adapter_model.bin files are never loaded)")
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in read_all(weights_path)[0].items():
        path, _, suffix = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if suffix not in LOHA_SUFFIXES:
            raise FormatError(f"{weights_path}: '{key}' is not a LoHa factor (modules_to_save are not supported)")
        modules[path][suffix] = tensor
    return config, dict(modules)


def load_folder(folder: str | os.PathLike) -> Network:
    """A PEFT LoHa folder (or diffusers' LoRA-weights file in it) as a Network with kohya names and alphas."""
    folder = os.fspath(folder)
    adapters = _adapter_dirs(folder)
    if not adapters:
        if os.path.isfile(os.path.join(folder, DIFFUSERS_WEIGHTS_FILE)):
            from .network import load

            return load(os.path.join(folder, DIFFUSERS_WEIGHTS_FILE))
        raise FormatError(f"{folder}: a folder, but no PEFT adapter in it (no {CONFIG_FILE} here or in "
                          f"{', '.join(s + '/' for s in ADAPTER_FOLDERS)}, no {DIFFUSERS_WEIGHTS_FILE})")
    parts: dict[str, tuple[dict, dict]] = {}
    for sub, attr in adapters.items():
        config, modules = read_adapter(sub)
        attr = attr or _guess_part(modules)
        if attr in parts:
            raise FormatError(f"{folder}: two adapters for {attr} ({', '.join(s for s, a in adapters.items() if a == attr)})")
        parts[attr] = (config, modules)
    return _network(parts, os.path.basename(os.path.normpath(folder)), folder)


def is_diffusers_file(network: Network) -> bool:
    """Whether a file's names are diffusers' `save_lora_weights` ones (``unet.<path>.hada_w1_a`` …)."""
    return bool(network.modules) and all(
        name.partition(".")[0] in PIPELINE_COMPONENTS and module.kind == "loha" for name, module in network.modules.items())


def from_diffusers_file(network: Network) -> Network:
    """A diffusers LoRA-weights file holding PEFT LoHa factors, as a Network like a PEFT folder's."""
    configs = _diffusers_configs(network)
    parts: dict[str, tuple[dict, dict]] = {}
    for name, module in network.modules.items():
        attr, _, path = name.partition(".")
        if attr not in parts:
            parts[attr] = (configs.get(attr), {})
        parts[attr][1][path] = {s: t for s, t in network.tensors(module).items() if s in LOHA_SUFFIXES}
    missing = [attr for attr, (config, _) in parts.items() if config is None]
    if missing:
        warnings.warn(f"{network.label}: no adapter config for {', '.join(missing)} ({DIFFUSERS_CONFIG_KEY} "
                      "metadata); alpha is taken equal to each module's rank (scale 1)", stacklevel=3)
    return _network(parts, network.name, network.label)


def _diffusers_configs(network: Network) -> dict[str, dict]:
    """{part: checked config} from the `lora_adapter_metadata` JSON (keys "unet.r", …)."""
    text = network.metadata.get(DIFFUSERS_CONFIG_KEY)
    if text is None:
        return {}
    try:
        packed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{network.label}: {DIFFUSERS_CONFIG_KEY} is not JSON ({str(exc)[:200]})") from None
    if not isinstance(packed, dict):
        raise FormatError(f"{network.label}: {DIFFUSERS_CONFIG_KEY} is not a JSON object")
    configs = {}
    for attr in PIPELINE_COMPONENTS:
        fields = {k[len(attr) + 1:]: v for k, v in packed.items() if k.startswith(attr + ".")}
        if fields:
            configs[attr] = check_config(fields, f"{network.label} ({DIFFUSERS_CONFIG_KEY} of {attr})")
    return configs


def _network(parts: dict[str, tuple[dict | None, dict]], name: str, where: str) -> Network:
    """kohya-named tensors with alpha for {part attribute: (checked config or None, modules)}."""
    single_text = "text_encoder_2" not in parts
    tensors, configs = {}, {}
    for attr, (config, modules) in parts.items():
        component = PIPELINE_COMPONENTS[attr]
        if config is not None:
            configs[attr] = config
        for path, factors in modules.items():
            name_ = kohya_name(component, path, single_text)
            w1b = factors.get("hada_w1_b")
            if w1b is None or w1b.dim() < 2:
                shapes = {s: tuple(t.shape) for s, t in factors.items()}
                raise FormatError(f"{where}: {attr} module '{path}' has no 2-D hada_w1_b ({shapes})")
            if config is None:
                rank = alpha = w1b.shape[0]
            else:
                rank = pattern_value(config["rank_pattern"], path, config["r"], config["where"])
                alpha = pattern_value(config["alpha_pattern"], path, config["alpha"], config["where"])
            if w1b.shape[0] != rank:
                shapes = {s: tuple(t.shape) for s, t in factors.items()}
                raise FormatError(f"{where}: {attr} module '{path}': the config says rank {rank}, the factors "
                                  f"are {shapes}")
            for suffix, tensor in factors.items():
                tensors[f"{name_}.{suffix}"] = tensor
            tensors[f"{name_}.alpha"] = torch.tensor(float(alpha))
    return from_tensors(tensors, name, _metadata(configs))


def kohya_name(component: str, path: str, single_text: bool = True) -> str:
    """The kohya module name of a PEFT module path (text encoders with ``text_model_``)."""
    if component != "unet":
        path = TEXT_MODEL_LEVEL + path.removeprefix(TEXT_MODEL_LEVEL)
    return kohya_prefix(component, single_text) + path.replace(".", "_")


def _guess_part(modules: dict) -> str:
    return "text_encoder" if any(_TEXT_PATH.search(path) for path in modules) else "unet"


def _metadata(configs: dict[str, dict]) -> dict[str, str]:
    """kohya-style metadata of the converted adapter (its rank, alpha and Tucker setting)."""
    main = configs.get("unet") or next(iter(configs.values()), {})
    args = {"algo": "loha", "use_tucker": bool(main.get("use_effective_conv2d")), "source": "peft"}
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
    if main:
        metadata.update(ss_network_dim=str(main["r"]), ss_network_alpha=str(main["alpha"]))
    return metadata


# --------------------------------------------------------------------------- writing


def save_folder(network: Network, folder: str | os.PathLike, items: list) -> list[str]:
    """Write `network` as a PEFT LoHa folder (one adapter per model part); returns the adapter folders.

    `items` are the network's modules planned against diffusers modules
    (`convert.matched` over `keys.map_modules`): their target keys give PEFT's module
    paths. Every module must be a LoHa without DoRA (PEFT's LoHa has neither LoRA
    modules nor DoRA), and Tucker must be on for all k×k convolutions or for none
    (PEFT's ``use_effective_conv2d`` is one switch).
    """
    folder = os.fspath(folder)
    parts: dict[str, dict[str, tuple]] = defaultdict(dict)  # attr -> path -> (module, target, tensors)
    for item in items:
        module = item.module
        if module.kind != "loha" or module.dora:
            what = "DoRA" if module.dora else f"a {module.kind} module"
            raise FormatError(f"{network.label}: module '{module.name}' is {what}; PEFT's LoHa cannot hold it")
        attr, _, path = item.target.key.removesuffix(".weight").partition(".")
        parts[attr][path] = (module, item.target, network.tensors(module))
    written = []
    for attr, modules in parts.items():
        out = os.path.join(folder, attr)
        os.makedirs(out, exist_ok=True)
        tensors = {}
        for path, (module, target, factors) in modules.items():
            for suffix, tensor in factors.items():
                if suffix == "alpha":
                    continue
                if suffix.startswith("hada_w") and suffix.endswith("_b") and not module.tucker:
                    tensor = tensor.reshape(tensor.shape[0], -1)  # PEFT's flattened conv factor
                tensors[f"{PEFT_PREFIX}{path}.{suffix}"] = tensor.contiguous()
        save(tensors, os.path.join(out, WEIGHTS_FILE), {"format": "pt"})
        with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(adapter_config(network.label, {p: (m, t) for p, (m, t, _) in modules.items()}), f, indent=2)
        written.append(out)
    return written


def adapter_config(label: str, modules: dict) -> dict:
    """PEFT LoHa config for {module path: (Module, Target)}: the commonest rank and alpha,
    exact-path patterns for the others, and the exact paths as targets."""
    ranks = {path: m.rank for path, (m, _) in modules.items()}
    alphas = {path: _as_config_number(m.alpha if m.alpha is not None else m.rank) for path, (m, _) in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    kernel_convs = {path: m.tucker for path, (m, t) in modules.items() if len(t.shape) > 2 and any(k > 1 for k in t.shape[2:])}
    tucker = set(kernel_convs.values())
    if len(tucker) > 1:
        mixed = sorted(p for p, on in kernel_convs.items() if on)
        raise FormatError(f"{label}: Tucker is on for some k×k convolutions ({', '.join(mixed[:3])}, …) and off for "
                          "others; PEFT's use_effective_conv2d is one switch for all")
    return {
        "peft_type": "LOHA",
        "r": r,
        "alpha": alpha,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(modules),
        "use_effective_conv2d": tucker == {True},
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "task_type": None,
    }


def _as_config_number(value: float):
    """An int where the value is integral, so configs read as PEFT writes them."""
    return int(value) if float(value).is_integer() else float(value)
