"""PEFT LoHa adapters: read a folder as a Network, write a Network back as a folder.

PEFT (``peft.LoHaConfig``, as diffusers-based trainers use it) saves one adapter per
model part, ``unet/``, ``text_encoder/``, ``text_encoder_2/`` (or a single adapter in
the folder itself), each an ``adapter_config.json`` and an ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module path>.hada_w1_a`` … . The factors
are LyCORIS's, in the same orientation, Tucker included (PEFT's ``use_effective_conv2d``
is LyCORIS's ``use_tucker``: ``hada_w*_a`` (R, O), ``hada_w*_b`` (R, I), ``hada_t*``
(R, R, k, k)), and the scale is alpha/r as well. What differs is where alpha lives: not
in the tensors but in the config (``alpha``/``r``, overridden per module by the regular
expressions of ``alpha_pattern``/``rank_pattern``, first match wins, as PEFT's
``get_pattern_key`` does).

Reading renames every module to its kohya name (``lora_unet_<diffusers path>``,
``lora_te[1|2]_text_model_<path>``) and adds the ``alpha`` tensor, so the result is an
ordinary network for every layout the name map knows, ComfyUI's and the WebUI's too.
Writing needs the base model's module paths (modules planned against diffusers modules).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict

import torch

from ..errors import FormatError
from ..families import PIPELINE_COMPONENTS, TEXT_MODEL_LEVEL, kohya_prefix
from .network import Network, from_tensors
from .safetensors_io import read_all, save

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: Prefix PEFT puts before module paths in saved adapters.
PEFT_PREFIX = "base_model.model."
#: Adapter sub-folders are named by pipeline attribute (`families.PIPELINE_COMPONENTS`).
#: LoHaConfig's defaults, for configs that leave `r` or `alpha` out.
PEFT_DEFAULTS = {"r": 8, "alpha": 8}
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# Module paths that only a text encoder has (a folder holding one adapter says no part).
_TEXT_PATH = re.compile(r"(^|\.)encoder\.layers\.\d+\.")


def _adapter_dirs(folder: str) -> dict[str, str | None]:
    """{sub-folder path: part attribute or None (part to be guessed)} of the adapters in `folder`."""
    found = {os.path.join(folder, sub): sub for sub in PIPELINE_COMPONENTS
             if os.path.isfile(os.path.join(folder, sub, CONFIG_FILE))}
    if not found and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        found[folder] = None
    return found


def pattern_value(patterns: dict, path: str, default):
    """PEFT's per-module override: the first pattern matching the end of `path`, else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def read_adapter(folder: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {suffix: tensor}}) of one PEFT LoHa adapter folder."""
    config_path = os.path.join(folder, CONFIG_FILE)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{config_path}: unreadable adapter config ({exc})") from None
    if str(config.get("peft_type", "")).upper() != "LOHA":
        raise FormatError(f"{config_path}: a PEFT {config.get('peft_type')!r} adapter, not LOHA")
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
    """A PEFT LoHa folder as a Network with kohya names and alpha tensors."""
    folder = os.fspath(folder)
    adapters = _adapter_dirs(folder)
    if not adapters:
        raise FormatError(f"{folder}: a folder, but no PEFT adapter in it (no {CONFIG_FILE} here or in "
                          f"{', '.join(s + '/' for s in PIPELINE_COMPONENTS)})")
    single_text = not any(attr == "text_encoder_2" for attr in adapters.values())
    tensors, configs = {}, {}
    for sub, attr in adapters.items():
        config, modules = read_adapter(sub)
        attr = attr or _guess_part(modules)
        configs[attr] = config
        component = PIPELINE_COMPONENTS[attr]
        for path, factors in modules.items():
            name = kohya_name(component, path, single_text)
            rank = pattern_value(config.get("rank_pattern"), path, config.get("r", PEFT_DEFAULTS["r"]))
            if "hada_w1_b" not in factors or factors["hada_w1_b"].shape[0] != rank:
                shapes = {s: tuple(t.shape) for s, t in factors.items()}
                raise FormatError(f"{sub}: module '{path}': the config says rank {rank}, the factors are {shapes}")
            alpha = pattern_value(config.get("alpha_pattern"), path, config.get("alpha", PEFT_DEFAULTS["alpha"]))
            for suffix, tensor in factors.items():
                tensors[f"{name}.{suffix}"] = tensor
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return from_tensors(tensors, os.path.basename(os.path.normpath(folder)), _metadata(configs))


def kohya_name(component: str, path: str, single_text: bool = True) -> str:
    """The kohya module name of a PEFT module path (text encoders with ``text_model_``)."""
    if component != "unet":
        path = TEXT_MODEL_LEVEL + path.removeprefix(TEXT_MODEL_LEVEL)
    return kohya_prefix(component, single_text) + path.replace(".", "_")


def _guess_part(modules: dict) -> str:
    return "text_encoder" if any(_TEXT_PATH.search(path) for path in modules) else "unet"


def _metadata(configs: dict[str, dict]) -> dict[str, str]:
    """kohya-style metadata of the converted adapter (its rank, alpha and Tucker setting)."""
    main = configs.get("unet") or next(iter(configs.values()))
    args = {"algo": "loha", "use_tucker": bool(main.get("use_effective_conv2d")), "source": "peft"}
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(main.get("r")),
        "ss_network_alpha": str(main.get("alpha")),
        "ss_network_args": json.dumps(args),
    }


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
