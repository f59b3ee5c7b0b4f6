"""The WebUI extension's host-independent half: prompt arguments, files, the active set.

The WebUI (AUTOMATIC1111 1.8+) calls an extra network's `activate` before every batch
with the `<loha:…>` mentions of the prompt. `ActiveSet.update` patches the live model
through the core only when the set (files, strengths, block weights) changed, and
restores from the core's backups when LoHa leave the prompt.

The built-in Lora extension patches the same layers lazily at their next forward, from
a backup it takes the first time (`network_weights_backup`, `network_current_names`
on each layer). Before this module changes a layer it hands the layer back to its
base weights and clears that state, so the built-in backs up our result and re-adds
its own networks on top: `<lora:a> <loha:b>` then gives W0 + ΔA + ΔB, and with both
gone every weight is W0 again, bit for bit. Nothing here imports the WebUI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import LohaError
from ..families import FAMILY_NAMES
from ..files.network import Network, load
from ..keys import bias_key
from ..keys.blocks import parse as parse_blocks
from ..patch import ModelView, PatchHandle, Use, check_strength
from ..summary import summarize

#: File types listed as networks (the WebUI's Lora folder also holds .pt/.ckpt files).
NETWORK_EXTENSIONS = (".safetensors",)
#: Attributes the built-in Lora extension keeps on each layer it patches.
BUILTIN_WEIGHTS, BUILTIN_BIAS, BUILTIN_NAMES = "network_weights_backup", "network_bias_backup", "network_current_names"


# --------------------------------------------------------------------------- prompt arguments


@dataclass(frozen=True)
class Request:
    """One `<loha:name:…>` mention: which file and at what strengths."""

    name: str
    unet: float = 1.0
    te: float = 1.0
    lbw: str | None = None  # block weights as written (a preset name or a comma list)


def _strength(value, what: str, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LohaError(f"<loha:{name}:…>: {what} must be a number, got {value!r}") from None
    return check_strength(number, f"<loha:{name}:…>: {what}")


def parse_request(positional: list, named: Mapping[str, str], default: float = 1.0) -> Request:
    """`<loha:name[:te[:unet]]>` with named `te=`, `unet=`, `lbw=`, as the built-in Lora reads them.

    One number sets both strengths; a second one sets the UNet's; named values win.
    """
    if not positional or not str(positional[0]).strip():
        raise LohaError("<loha:…>: a network name is required, as in <loha:name:0.8>")
    name = str(positional[0]).strip()
    unknown = sorted(set(named) - {"te", "unet", "lbw"})
    if unknown or len(positional) > 3:
        extra = ", ".join([*(f"{k}=" for k in unknown), *map(repr, positional[3:])])
        raise LohaError(f"<loha:{name}:…>: unknown arguments {extra} (known: te, unet, lbw)")
    te = _strength(positional[1], "te strength", name) if len(positional) > 1 else default
    te = _strength(named["te"], "te=", name) if "te" in named else te
    unet = _strength(positional[2], "unet strength", name) if len(positional) > 2 else te
    unet = _strength(named["unet"], "unet=", name) if "unet" in named else unet
    lbw = named.get("lbw") or None
    return Request(name, unet=unet, te=te, lbw=lbw)


def block_weights(lbw: str | None, family: str) -> dict[str, float]:
    """Block id -> multiplier for an `lbw=` value (presets and lists of the block-weight extension)."""
    return parse_blocks(lbw, family) if lbw else {}


# --------------------------------------------------------------------------- files


def list_networks(folders) -> dict[str, str]:
    """Network name (file name without extension) -> path; the first folder wins a name."""
    found: dict[str, str] = {}
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs.sort()
            for file in sorted(files):
                stem, ext = os.path.splitext(file)
                if ext.lower() in NETWORK_EXTENSIONS:
                    found.setdefault(stem, os.path.join(root, file))
    return found


def sidecar(path: str) -> dict:
    """The WebUI's `name.json` user metadata (description, preferred weight, …), or {}."""
    import json

    try:
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def card_metadata(network: Network) -> dict:
    """What a card's metadata table shows: the file's shape (from `inspect`), tags, raw metadata."""
    s = summarize(network)
    shown = {
        "family": FAMILY_NAMES.get(s["family"], s["family"]),
        "modules": s["module_count"],
        "parts": ", ".join(f"{p} {n}" for p, n in s["modules_by_part"].items()),
        "rank": ", ".join(s["ranks"]),
        "alpha": ", ".join(s["alphas"]),
        "tucker modules": s["tucker"],
        "DoRA modules": s["dora"],
        "tags": ", ".join(f"{tag} ({count})" for tag, count in s["top_tags"]),
    }
    return {**shown, **{k: v for k, v in network.metadata.items() if k != "ss_tag_frequency"}}


def preferred_weight(path: str, default: float) -> float:
    """The sidecar's "preferred weight" when it is a non-zero number, else `default`."""
    try:
        weight = float(sidecar(path).get("preferred weight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    return weight or default


# --------------------------------------------------------------------------- the live model


class LiveParameters(Mapping):
    """A module's parameters by state-dict key, each looked up when asked for.

    The WebUI's low-VRAM modes move parts between devices (new tensors behind the same
    parameters), so a patch must never hold on to a tensor taken earlier.
    """

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._keys = [k for k, _ in model.named_parameters()]

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._model.get_parameter(key).data
        except AttributeError:
            raise KeyError(key) from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def release_builtin(model: torch.nn.Module, keys) -> int:
    """Hand the layers owning `keys` back from the built-in Lora extension; returns how many.

    Each layer gets its backed-up base weights back and forgets the backup and the
    networks it had applied, as the built-in's own restore does; at its next forward
    the built-in backs the layer up again and re-applies its networks on top.
    """
    modules = dict(model.named_modules())
    owners = {}
    for key in keys:
        path = key.rpartition(".")[0]
        while path:  # the layer, or the attention module holding its fused in/out projection
            module = modules.get(path)
            if module is not None and hasattr(module, BUILTIN_NAMES):
                owners[path] = module
            path = path.rpartition(".")[0]
    with torch.no_grad():
        for module in owners.values():
            _restore_builtin_backup(module)
            setattr(module, BUILTIN_WEIGHTS, None)
            setattr(module, BUILTIN_BIAS, None)
            setattr(module, BUILTIN_NAMES, ())
    return len(owners)


def _restore_builtin_backup(module: torch.nn.Module) -> None:
    weights = getattr(module, BUILTIN_WEIGHTS, None)
    bias = getattr(module, BUILTIN_BIAS, None)
    attention = isinstance(module, torch.nn.MultiheadAttention)
    if weights is not None:
        if attention:
            module.in_proj_weight.copy_(weights[0])
            module.out_proj.weight.copy_(weights[1])
        else:
            module.weight.copy_(weights)
    if bias is not None:
        (module.out_proj if attention else module).bias.copy_(bias)


def file_stamp(path: str) -> tuple | None:
    """What changes when a file is rewritten or replaced (mtime, size, inode); None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class NetworkFiles:
    """Networks read once per file and read again when the file changes on disk."""

    def __init__(self):
        self._networks: dict[tuple, Network] = {}

    def get(self, path: str) -> Network:
        stamp = (path, file_stamp(path))
        network = self._networks.get(stamp)
        if network is None:
            self._networks = {k: v for k, v in self._networks.items() if k[0] != path}
            network = load(path)
            self._networks[stamp] = network
        return network

    def read(self, path: str) -> tuple[Network | None, str | None]:
        """(network, None), or (None, why it cannot be read)."""
        try:
            return self.get(path), None
        except LohaError as exc:
            return None, str(exc)


def card_files(own_folders, lora_folders, networks: NetworkFiles) -> dict[str, tuple[str, str | None]]:
    """Name -> (path, why it cannot be read or None) of the files the LoHa cards page lists.

    Everything in the page's own folders; from the Lora folder, which the built-in Lora
    page lists too, only files that hold LoHa modules, and files that cannot be read
    (so the user sees why a name fails).
    """
    own = list_networks(own_folders)
    listed = {name: (path, networks.read(path)[1]) for name, path in own.items()}
    for name, path in list_networks(lora_folders).items():
        if name in listed:
            continue
        network, error = networks.read(path)
        if error is not None or any(m.kind == "loha" for m in network.modules.values()):
            listed[name] = (path, error)
    return dict(sorted(listed.items()))


def not_applied_text(problems: dict[str, str], paths: dict[str, str]) -> str:
    """One line naming each LoHa not applied and why, files named as in the prompt (no folders)."""
    shown = []
    for name, why in problems.items():
        path = paths.get(name)
        if path:
            why = why.removeprefix(f"{path}: ").replace(path, name)
        shown.append(f"{name}: {why}")
    return "; ".join(shown)


@dataclass
class ActiveSet:
    """The LoHa on the model now, the handle that undoes them, and cached file readers."""

    handle: PatchHandle | None = None
    key: tuple = ()
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request name -> why it was not applied
    _files: "NetworkFiles" = field(default_factory=lambda: NetworkFiles())
    _views: dict[int, ModelView] = field(default_factory=dict)

    def update(self, model: torch.nn.Module, wanted: list[tuple[Request, str]], keep_going: bool = False) -> bool:
        """Make `wanted` ((request, path) pairs) the active set; False when it already was.

        A file changed on disk counts as a change. With `keep_going`, a LoHa that cannot be
        applied (unreadable, another family, bad block weights, …) is left out and its
        reason kept in `failed`, and the others are applied; without it, it raises.
        """
        key = (id(model), *((r, path, file_stamp(path)) for r, path in wanted))
        if key == self.key or (not wanted and self.handle is None and not self.failed):
            return False
        self.clear(model)
        if not wanted:
            return True
        view = self._view(model)
        uses, names = [], {}
        for request, path in wanted:
            try:
                use = self._use(request, path, view.names.family)
            except LohaError as exc:
                if not keep_going:
                    raise
                self.failed[request.name] = str(exc)
                continue
            uses.append(use)
            names[use.network.label] = request.name
        touched = {t.key for u in uses for name in u.network.modules if (t := view.names.lookup(name))}
        release_builtin(model, touched | {bias_key(k) for k in touched})
        with torch.no_grad(), _no_autocast(model):
            self.handle = PatchHandle(view, uses, skip_failed=keep_going)
        self.failed.update({names[label]: why for label, why in self.handle.failed.items()})
        self.key, self.unmatched = key, self.handle.unmatched
        return True

    def clear(self, model: torch.nn.Module | None) -> None:
        """Restore every weight this set changed (handing them back from the built-in first)."""
        if self.handle is not None:
            if model is not None:
                keys = self.handle.patched_keys
                release_builtin(model, keys)
            self.handle.restore()
        self.handle, self.key, self.unmatched, self.failed = None, (), {}, {}

    def forget(self) -> None:
        """Drop the state without writing: the host loaded new weights over the patched ones."""
        self.handle, self.key, self.unmatched, self.failed = None, (), {}, {}
        self._views.clear()

    def _view(self, model: torch.nn.Module) -> ModelView:
        view = self._views.get(id(model))
        if view is None:
            self._views.clear()
            view = self._views[id(model)] = ModelView(LiveParameters(model))
        return view

    def _use(self, request: Request, path: str, family: str) -> Use:
        return Use(self._files.get(path), request.unet, request.te, block_weights(request.lbw, family))


def _no_autocast(model: torch.nn.Module):
    """Patch in full precision even inside the WebUI's autocast (it wraps `activate`)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, enabled=False)
