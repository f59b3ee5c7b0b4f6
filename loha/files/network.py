"""Read network files lazily, recognise each module's kind, validate its shapes.

A file is a flat safetensors dict "{module}.{suffix}" plus string metadata. Modules
are grouped by the longest known suffix; tensors stay in the memory-mapped file
until a patch asks for them. Names are kept exactly as written: matching them to a
model is `keys`' job, and every key we do not understand is reported, not dropped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import FormatError
from ..families import component_of, family_of_network
from .safetensors_io import FLOAT_DTYPES, Reader, dtype_name
# suffix -> kind; a module's kind is the kind of its factor suffixes.
_KIND_OF_SUFFIX = {
    **dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "loha"),
    **dict.fromkeys(("lora_up.weight", "lora_down.weight", "lora_mid.weight"), "lora"),
    **dict.fromkeys(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "lokr"),
    **dict.fromkeys(("diff", "diff_b"), "full"),
    **dict.fromkeys(("w_norm", "b_norm"), "norm"),  # lycoris train_norm: norm layers' weight and bias
}
_SHARED_SUFFIXES = ("alpha", "dora_scale")
_REQUIRED = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lora": ("lora_up.weight", "lora_down.weight"),
    "lokr": (),
    "full": ("diff",),
    "norm": ("w_norm",),
}
# Longest first, so "lora_up.weight" wins over a shorter match.
_SUFFIXES = sorted((*_KIND_OF_SUFFIX, *_SHARED_SUFFIXES), key=len, reverse=True)

@dataclass
class Module:
    """One network module: its kind, the file keys of its tensors, their shapes, alpha."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)  # suffix -> key in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kind: str = ""
    alpha: float | None = None

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.keys or "lora_mid.weight" in self.keys or "lokr_t2" in self.keys

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.keys

    @property
    def rank(self) -> int | None:
        """R as the scale alpha/R means it: the first dimension of the down factor."""
        down = {"loha": "hada_w1_b", "lora": "lora_down.weight"}.get(self.kind)
        if down is not None:
            return self.shapes[down][0]
        if self.kind == "lokr":
            for suffix in ("lokr_w2_b", "lokr_w1_b"):
                if suffix in self.shapes:
                    return self.shapes[suffix][0]
        return None

    @property
    def out_features(self) -> int:
        """O, the number of output rows ΔW has (for the kinds that say it cheaply)."""
        s = self.shapes
        if self.kind == "loha":
            return s["hada_w1_a"][1] if self.tucker else s["hada_w1_a"][0]
        if self.kind == "lora":
            return s["lora_up.weight"][0]
        if self.kind == "full":
            return s["diff"][0]
        if self.kind == "norm":
            return s["w_norm"][0]
        if self.kind == "lokr":
            return self._lokr_shapes()[0][0] * self._lokr_shapes()[1][0]
        raise NotImplementedError(self.kind)

    def _lokr_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(rows, columns) of LoKr's w1 and of w2 flattened to two axes, from the factor shapes."""
        s = self.shapes
        w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_t2" in s:
            w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1] * math.prod(s["lokr_t2"][2:]))
        elif "lokr_w2" in s:
            w2 = (s["lokr_w2"][0], math.prod(s["lokr_w2"][1:]))
        else:
            w2 = (s["lokr_w2_a"][0], math.prod(s["lokr_w2_b"][1:]))
        return (w1[0], math.prod(w1[1:])), w2

    @property
    def delta_numel(self) -> int:
        """Number of elements of ΔW, for checking it against the target weight."""
        s = self.shapes
        if self.kind == "loha":
            if self.tucker:
                return s["hada_w1_a"][1] * s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:])
            return s["hada_w1_a"][0] * math.prod(s["hada_w1_b"][1:])
        if self.kind == "lora":
            up, down = s["lora_up.weight"], s["lora_down.weight"]
            k = math.prod(s["lora_mid.weight"][2:]) if "lora_mid.weight" in s else math.prod(down[2:])
            return up[0] * down[1] * k
        if self.kind == "full":
            return math.prod(s["diff"])
        if self.kind == "norm":
            return s["w_norm"][0]
        if self.kind == "lokr":
            w1, w2 = self._lokr_shapes()
            return math.prod(w1) * math.prod(w2)
        raise NotImplementedError(self.kind)


class _Source:
    """Where tensors come from: a safetensors file (its checked header, tensors read on
    request, nothing kept open or mapped between reads) or an in-memory dict."""

    def __init__(self, path: str | None = None, tensors: Mapping[str, torch.Tensor] | None = None):
        self.path = path
        self._tensors = tensors
        self._file = Reader(path, keep_open=False) if tensors is None else None

    def keys(self) -> list[str]:
        return list(self._tensors.keys() if self._tensors is not None else self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return self._file.entries[key].shape

    def dtype(self, key: str) -> str:
        if self._tensors is not None:
            dtype = self._tensors[key].dtype
            try:
                return dtype_name(dtype)
            except FormatError:
                return str(dtype)
        return self._file.entries[key].dtype

    def get_many(self, keys) -> list[torch.Tensor]:
        """Tensors for `keys`, read from the file in one opening (a file changed on disk since
        it was loaded is refused, naming it)."""
        if self._tensors is not None:
            return [self._tensors[key] for key in keys]
        with self._file.opened():
            return [self._file.read(key) for key in keys]

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[0]

    def metadata(self) -> dict[str, str]:
        if self._tensors is not None:
            return {}
        return dict(self._file.metadata)


class Network:
    """A network file (or dict of tensors): modules by name, metadata, family, unknowns."""

    def __init__(self, source: _Source, name: str, metadata: dict[str, str] | None = None):
        self._source = source
        self.path = source.path
        self.name = name
        self.metadata = metadata if metadata is not None else source.metadata()
        self.modules: dict[str, Module] = {}
        self.unknown_keys: list[str] = []
        self._group()
        self.family = family_of_network(self.modules, self.metadata)

    @property
    def label(self) -> str:
        """How errors name this network: its file path, or its name for in-memory ones."""
        return self.path or self.name

    @property
    def components(self) -> set[str]:
        """Model parts this network touches ("unet", "te1", "te2")."""
        return {c for c in map(component_of, self.modules) if c is not None}

    @property
    def text_encoders(self) -> set[str]:
        return self.components - {"unet"}

    def tensor(self, module: Module, suffix: str) -> torch.Tensor:
        """Load one tensor of a module from the file (mmap; nothing else is read)."""
        return self._source.get(module.keys[suffix])

    def tensors(self, module: Module) -> dict[str, torch.Tensor]:
        return dict(zip(module.keys, self._source.get_many(module.keys.values())))

    def dtypes(self) -> set[str]:
        return {self._source.dtype(k) for m in self.modules.values() for s, k in m.keys.items() if s != "alpha"}

    def _check_dtypes(self, module: Module) -> None:
        for suffix, key in module.keys.items():
            dtype = self._source.dtype(key)
            allowed = _ALPHA_DTYPES if suffix == "alpha" else FLOAT_DTYPES
            if dtype not in allowed:
                raise FormatError(f"{self.label}: '{key}' has dtype {dtype}; expected one of {sorted(allowed)}")

    def _group(self) -> None:
        for key in self._source.keys():
            suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
            if suffix is None:
                self.unknown_keys.append(key)
                continue
            name = key[: -len(suffix) - 1]
            module = self.modules.setdefault(name, Module(name))
            module.keys[suffix] = key
            module.shapes[suffix] = self._source.shape(key)
        for name in list(self.modules):
            module = self.modules[name]
            kinds = {_KIND_OF_SUFFIX[s] for s in module.keys if s in _KIND_OF_SUFFIX}
            if len(kinds) != 1:
                # Only alpha/dora_scale, or factors of two kinds under one name.
                what = "no factors" if not kinds else f"factors of several kinds {sorted(kinds)}"
                raise FormatError(f"{self.label}: module '{name}' has {what} (keys {sorted(module.keys.values())})")
            module.kind = kinds.pop()
            _validate(self.label, module)
            self._check_dtypes(module)
        with_alpha = [m for m in self.modules.values() if "alpha" in m.keys]
        alphas = self._source.get_many([m.keys["alpha"] for m in with_alpha])  # one opening of the file
        for module, alpha in zip(with_alpha, alphas):
            module.alpha = _read_alpha(self.label, module, alpha)


_ALPHA_DTYPES = FLOAT_DTYPES | {"I8", "I16", "I32", "I64", "U8"}


def _read_alpha(label: str, module: Module, alpha: torch.Tensor) -> float:
    if alpha.numel() != 1:
        raise FormatError(f"{label}: '{module.keys['alpha']}' must be a scalar, has shape {tuple(alpha.shape)}")
    value = float(alpha.float().item())
    if not math.isfinite(value):
        raise FormatError(f"{label}: '{module.keys['alpha']}' is {value}")
    return value


def _validate(label: str, m: Module) -> None:
    """Check a module's factors agree with each other (the target is checked in patch)."""
    missing = [s for s in _REQUIRED[m.kind] if s not in m.keys]
    if missing:
        raise FormatError(f"{label}: module '{m.name}' ({m.kind}) lacks {missing}; has {sorted(m.keys)}")
    s = m.shapes

    def fail(why: str) -> None:
        shapes = ", ".join(f"{k}={v}" for k, v in sorted(s.items()))
        raise FormatError(f"{label}: module '{m.name}': {why} ({shapes})")

    if m.kind == "loha":
        if ("hada_t1" in s) != ("hada_t2" in s):
            fail("has one Tucker core but not the other")
        for i in ("1", "2"):
            a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
            if len(a) != 2 or len(b) < 2:
                fail(f"hada_w{i}_a must be 2-D and hada_w{i}_b at least 2-D")
            if "hada_t1" in s:
                t = s[f"hada_t{i}"]
                if len(t) < 3 or t[0] != a[0] or t[1] != b[0] or len(b) != 2:
                    fail(f"Tucker core hada_t{i} does not fit hada_w{i}_a (R, O) and hada_w{i}_b (R, I)")
            elif a[1] != b[0]:
                fail(f"hada_w{i}_a columns {a[1]} != hada_w{i}_b rows {b[0]}")
        if "hada_t1" in s:
            if s["hada_w1_a"][1] != s["hada_w2_a"][1] or s["hada_w1_b"][1] != s["hada_w2_b"][1] or s["hada_t1"][2:] != s["hada_t2"][2:]:
                fail("the two Tucker branches have different shapes")
        elif s["hada_w1_a"][0] != s["hada_w2_a"][0] or s["hada_w1_b"][1:] != s["hada_w2_b"][1:]:
            fail("the two Hadamard branches have different shapes")
    elif m.kind == "lora":
        up, down = s["lora_up.weight"], s["lora_down.weight"]
        if len(up) < 2 or len(down) < 2:
            fail("lora_up and lora_down must be at least 2-D")
        if up[1] != down[0]:
            fail(f"lora_up columns {up[1]} != lora_down rows {down[0]}")
        mid = s.get("lora_mid.weight")
        if mid is not None and (len(mid) < 3 or mid[0] != up[1] or mid[1] != down[0]):
            fail("lora_mid does not fit lora_up and lora_down")
    elif m.kind == "lokr":
        if not ({"lokr_w1"} <= s.keys() or {"lokr_w1_a", "lokr_w1_b"} <= s.keys()):
            fail("needs lokr_w1 or lokr_w1_a and lokr_w1_b")
        if not ({"lokr_w2"} <= s.keys() or {"lokr_w2_a", "lokr_w2_b"} <= s.keys()):
            fail("needs lokr_w2 or lokr_w2_a and lokr_w2_b")
        if any(len(shape) < 2 for suffix, shape in s.items() if suffix.startswith("lokr_")):
            fail("LoKr factors must be at least 2-D")
        if "lokr_t2" in s and not (len(s["lokr_t2"]) >= 3 and {"lokr_w2_a", "lokr_w2_b"} <= s.keys()
                                   and s["lokr_t2"][:2] == (s["lokr_w2_a"][0], s["lokr_w2_b"][0])):
            fail("Tucker core lokr_t2 does not fit lokr_w2_a (R, O) and lokr_w2_b (R, I)")
        for i in ("1", "2"):
            a, b = s.get(f"lokr_w{i}_a"), s.get(f"lokr_w{i}_b")
            if a is not None and b is not None and "lokr_t2" not in s and a[1] != b[0]:
                fail(f"lokr_w{i}_a columns {a[1]} != lokr_w{i}_b rows {b[0]}")
    elif m.kind == "full":
        if len(s["diff"]) < 2:
            fail("needs a diff of at least 2 dimensions")
        if "diff_b" in s and s["diff_b"] != s["diff"][:1]:
            fail(f"diff_b must hold one value per output row, shape ({s['diff'][0]},)")
    elif m.kind == "norm":
        if len(s["w_norm"]) != 1 or s.get("b_norm", s["w_norm"]) != s["w_norm"]:
            fail("w_norm (and b_norm) must be 1-D, one value per channel")
    if m.rank == 0:
        fail("has rank 0")


def load(path: str | os.PathLike) -> Network:
    """Open a network file lazily. Only safetensors: pickles are never loaded.

    A folder is read as a PEFT LoHa adapter, and so is a file of diffusers'
    `save_lora_weights` names (see `loha.files.peft`).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from .peft import load_folder

        return load_folder(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    network = Network(_Source(path), os.path.splitext(os.path.basename(path))[0])
    from .peft import from_diffusers_file, is_diffusers_file

    return from_diffusers_file(network) if is_diffusers_file(network) else network


def from_tensors(tensors: Mapping[str, torch.Tensor], name: str = "network", metadata: dict[str, str] | None = None) -> Network:
    """A network from tensors already in memory (conversions, the trainer, tests)."""
    return Network(_Source(tensors=tensors), name, metadata or {})


#: Deepest nesting a JSON metadata value may have to be shown (kohya's are two levels deep);
#: deeper values would exhaust the recursion of whatever prints or re-encodes them.
MAX_JSON_DEPTH = 16


def parse_json_metadata(metadata: Mapping[str, str], key: str):
    """A JSON-valued metadata entry (ss_network_args, ss_tag_frequency), or None if absent,
    not JSON, nested deeper than `MAX_JSON_DEPTH`, or holding NaN/Infinity."""
    try:
        value = json.loads(metadata[key], parse_constant=_no_constant, parse_float=_finite)
    except (KeyError, TypeError, ValueError, RecursionError):
        return None
    return value if _depth(value) <= MAX_JSON_DEPTH else None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise ValueError(f"{text} is not a finite number")
    return value


def _depth(value) -> int:
    """Nesting depth of parsed JSON, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest
