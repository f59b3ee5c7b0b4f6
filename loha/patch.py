"""Apply networks to a live model at strengths, atomically, and restore exactly.

`apply()` plans everything before it touches a weight (names, shapes, factors read
from the files), so a bad file changes nothing. Restoring never subtracts: a CPU
parameter gets its patched weight in other memory and its original tensor back on
restore (one read and one write per patch, nothing to copy back); any other tensor
(GPU weights, state dicts, views a host holds) is copied to a CPU backup and patched
in place. Changing strengths, or the set of networks (`reapply`), recomputes from
the originals kept, in the memory already taken, without reading the files again.

Fresh memory is slow to take (the OS maps and zeroes every page: about 0.4 s per GB
on the reference machine, more than patching costs), so `restore` keeps the memory a
parameter's patch used, and the next patch of that parameter reuses it: patching and
restoring again, as the WebUI and strength changes do all the time, costs what the
kernels cost. That memory goes with the model, or at once with `release_memory()`.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch

from . import delta as D
from . import kernels
from .errors import FormatError, LohaError, ShapeError
from .families import PART_COMPONENTS, UNET_STATE_PREFIXES
from .files.network import Module, Network, load
from .keys import NameMap, Target, bias_key, map_modules, map_state_dict
from .keys.text import TEXT_STATE_SOURCES


@dataclass
class Use:
    """One network with its strengths: UNet, text encoders, and per-block multipliers."""

    network: Network
    unet: float = 1.0
    te: float | None = None  # None: same as unet
    blocks: Mapping[str, float] = field(default_factory=dict)  # block id -> multiplier

    def strength(self, target: Target) -> float:
        if target.component == "unet":
            return self.unet * self.blocks.get(target.block, 1.0)
        te = self.unet if self.te is None else self.te
        return te * self.blocks.get(target.block, 1.0)


def as_uses(networks) -> list[Use]:
    """Accept a Network, a path, a Use, a (network, unet[, te]) tuple, or a list of them."""
    if isinstance(networks, (Network, Use, str, os.PathLike, tuple)):
        networks = [networks]
    uses = []
    for item in networks:
        if isinstance(item, Use):
            uses.append(item)
            continue
        if isinstance(item, tuple):
            net, *strengths = item
            uses.append(Use(_as_network(net), *strengths))
        else:
            uses.append(Use(_as_network(item)))
    return uses


def _as_network(item) -> Network:
    return item if isinstance(item, Network) else load(item)


class ModelView:
    """A model seen as a flat namespace of weight tensors plus its name map.

    Accepts a state dict (checkpoint or host layout), a mapping of modules by pipeline
    attribute ({"transformer": ..., "text_encoder": ...}), a diffusers pipeline (its
    `unet`/`transformer`/`prior` and text encoders), a single model (a diffusers
    UNet or transformer, a text encoder, any ``nn.Module``: its own module paths name
    it), or a module whose parameters are a state dict of a known layout (the WebUI's
    and ComfyUI's model objects).
    """

    def __init__(self, model, family: str | None = None):
        if isinstance(model, Mapping) and model and all(isinstance(v, torch.nn.Module) for v in model.values()):
            self._modules = dict(model)
        elif isinstance(model, Mapping):
            self._modules = None
            self._tensors = model
        elif not isinstance(model, torch.nn.Module) and any(hasattr(model, attr) for attr in PART_COMPONENTS):
            self._modules = {attr: part for attr in PART_COMPONENTS
                             if isinstance(part := getattr(model, attr, None), torch.nn.Module)}
        elif isinstance(model, torch.nn.Module) and not _holds_state_layout(model):
            self._modules = {_part_name(model): model}
        elif isinstance(model, torch.nn.Module):
            self._modules = None
            self._tensors = {k: p.data for k, p in model.named_parameters()}
        else:
            raise LohaError(f"cannot patch a {type(model).__name__}: expected a state dict, modules or a pipeline")
        if self._modules is not None:
            self.names: NameMap = map_modules(self._modules, family=family)
        else:
            self.names = map_state_dict(self._tensors, family=family)
        self._root = model if isinstance(model, torch.nn.Module) and self._modules is None else None
        self._params: dict[str, torch.nn.Parameter | None] = {}  # resolved module attributes

    def tensor(self, key: str) -> torch.Tensor | None:
        """The live tensor under `key` (writes to it change the model), or None."""
        if self._modules is None and self._root is None:
            return self._tensors.get(key)
        param = self.parameter(key)
        # .data at each call: hosts move models between devices by swapping a parameter's data
        return None if param is None else param.data

    def parameter(self, key: str) -> torch.nn.Parameter | None:
        """The parameter object under `key` (its .data may be replaced), or None for state dicts."""
        if key not in self._params:
            found = self.module_of(key)
            self._params[key] = None if found is None else getattr(found[0], found[1], None)
        return self._params[key]

    def module_of(self, key: str) -> tuple[torch.nn.Module, str] | None:
        """The module that owns the tensor under `key` and its attribute name, or None."""
        if self._root is not None:
            module, path = self._root, key
        elif self._modules is not None:
            part, _, path = key.partition(".")
            module = self._modules.get(part)
        else:
            return None
        module_path, _, attr = path.rpartition(".")
        try:
            return module.get_submodule(module_path), attr
        except AttributeError:
            return None


#: Where a module's parameters say it is a whole model in a state-dict layout (LDM, host).
_STATE_PREFIXES = (*UNET_STATE_PREFIXES, *(prefix for prefix, _, _ in TEXT_STATE_SOURCES))


def _holds_state_layout(module: torch.nn.Module) -> bool:
    return any(name.startswith(_STATE_PREFIXES) for name, _ in module.named_parameters())


def _part_name(module: torch.nn.Module) -> str:
    """The pipeline attribute a lone model stands in: its class says UNet, text encoder or transformer."""
    name = type(module).__name__
    if name.startswith("UNet"):
        return "unet"
    if "TextModel" in name or "EncoderModel" in name or name.startswith(("CLIP", "T5", "UMT5")):
        return "text_encoder"
    return "transformer"


@dataclass
class PlannedModule:
    """One module of one network, matched to its target and ready to apply."""

    use: Use
    module: Module
    target: Target
    kind: str  # "hadamard", "lowrank", "dense"
    factors: tuple  # canonical factors (delta.py) or the dense ΔW
    scale: float  # alpha/rank
    dora_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # full-diff modules' diff_b


def plan_modules(names: NameMap, uses: list[Use], skip_bad: bool = False,
                 skipped: dict[str, list[str]] | None = None) -> tuple[list[PlannedModule], dict[str, list[str]]]:
    """Match, check and read every module of every use; nothing is written.

    Returns the items, and per network (by label) the module names that matched nothing.
    A bad module (wrong shape, NaN, …) raises; with `skip_bad` it is left out instead, with
    a warning, and its error message recorded in `skipped` under the network's label.
    """
    with kernels.tiled.one_thread():  # many small tensors: see one_thread
        return _plan(names, uses, skip_bad, skipped)


def _plan(names: NameMap, uses: list[Use], skip_bad: bool, skipped: dict | None):
    items, unmatched = [], {}
    for use in uses:
        net = use.network
        missing, seen = [], {}
        for module in net.modules.values():
            target = names.lookup(module.name)
            if target is None:
                shared = names.ambiguous(module.name)
                if shared:
                    raise FormatError(f"{net.label}: module '{module.name}' could mean any of {', '.join(shared)} "
                                      "(their paths differ only in '.' against '_')")
                missing.append(module.name)
                continue
            for piece in target.pieces or (target,):
                if (piece.key, piece.rows) in seen:
                    raise FormatError(
                        f"{net.label}: modules '{seen[(piece.key, piece.rows)]}' and '{module.name}' "
                        f"both patch '{piece.key}' (one module under two naming styles)"
                    )
                seen[(piece.key, piece.rows)] = module.name
            try:
                items += split_rows(_prepare(net, module, target, use))
            except LohaError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping a bad module: {exc}", stacklevel=4)
                if skipped is not None:
                    skipped.setdefault(net.label, []).append(str(exc))
        if missing:
            unmatched[net.label] = missing
    return items, unmatched


def split_rows(item: PlannedModule) -> list[PlannedModule]:
    """A module planned for a target over several weights, as one item per piece.

    Rows of ΔW depend only on rows of the output-side factors (``a``, the LoRA up, the
    dense ΔW, an output-axis DoRA scale, ``diff_b``), so each piece gets those rows and
    the rest as they are: exact. Input-axis DoRA normalises over every output row
    together and cannot be split.
    """
    target = item.target
    if not target.pieces:
        return [item]
    if item.dora_scale is not None and D.dora_axis(item.dora_scale.shape, target.shape) == "in":
        raise ShapeError(f"{item.use.network.label}: module '{item.module.name}' has an input-axis dora_scale, "
                         f"which cannot be split over the weights it spans ({target.key})")
    pieces, start = [], 0
    for piece in target.pieces:
        rows = slice(start, start + piece.shape[0])
        start = rows.stop
        if item.kind == "hadamard":
            a1, b1, a2, b2 = item.factors
            factors = (a1[rows], b1, a2[rows], b2)
        elif item.kind == "lowrank":
            factors = (item.factors[0][rows], item.factors[1])
        else:
            factors = (item.factors[0].reshape(target.shape[0], -1)[rows],)
        pieces.append(replace(item, target=piece, factors=factors,
                              dora_scale=None if item.dora_scale is None else item.dora_scale[rows],
                              bias=None if item.bias is None else item.bias[rows]))
    return pieces


def by_tensor(items: list[PlannedModule]) -> dict[str, list[PlannedModule]]:
    """Items with a non-zero strength, grouped by the key of the tensor they change."""
    grouped: dict[str, list[PlannedModule]] = defaultdict(list)
    for item in items:
        if item.use.strength(item.target) != 0:
            grouped[item.target.key].append(item)
    return grouped


def apply_to_tensor(weight: torch.Tensor, items: list[PlannedModule], batch: list | None = None,
                    source: torch.Tensor | None = None) -> None:
    """Add the ΔW of `items` (all targeting `weight`, maybe row slices of it) in place.

    With `source` (same shape), `weight` becomes source + ΔW instead (patching into new
    memory). A region changed by one plain LoHa goes to the fused kernels (into `batch`
    when the caller gathers many layers for one grouped call); a region changed by
    several networks, or by DoRA, goes to `kernels.apply_steps_` (fp32, rounded once,
    tile by tile).
    """
    regions: dict[tuple | None, list[PlannedModule]] = defaultdict(list)
    for item in items:
        regions[item.target.rows].append(item)
    if source is not None and set(regions) != {None}:  # rows left alone must be copied too
        weight.copy_(source)
        source = None
    own_batch = batch is None
    batch = [] if own_batch else batch
    for rows, group in regions.items():
        region = weight if rows is None else weight[rows[0] : rows[1]]
        region = region.view(group[0].target.shape)
        from_ = None if source is None else source.view(region.shape)
        if len(group) == 1 and group[0].dora_scale is None and group[0].kind == "hadamard":
            it = group[0]
            batch.append(kernels.HadamardItem(region, *it.factors, it.scale * it.use.strength(it.target), from_))
            continue
        kernels.apply_steps_(region, [kernel_step(it, region.device) for it in group], from_)
    if own_batch:
        kernels.add_hadamard_many_(batch)


_KERNEL_KIND = {"hadamard": kernels.HADAMARD, "lowrank": kernels.MATMUL, "dense": kernels.DENSE}


def kernel_step(item: PlannedModule, device) -> kernels.Step:
    """One planned module as the kernels' `Step`, its factors fp32 on `device`."""
    return kernels.step(_KERNEL_KIND[item.kind], item.factors, item.scale, item.use.strength(item.target),
                        item.target.shape, device, item.dora_scale)


def apply_to_bias(bias: torch.Tensor, items: list[PlannedModule]) -> None:
    """Add full-diff modules' `diff_b` into the bias next to their weight (its rows for a slice)."""
    total = bias.float()
    for it in items:
        if it.bias is not None:
            rows = it.target.rows
            region = total if rows is None else total[rows[0] : rows[1]]
            region += it.bias.float().to(bias.device).reshape(region.shape) * it.use.strength(it.target)
    bias.copy_(total)


class PatchHandle:
    """What `apply()` returns: restore(), set strengths, and the names that matched nothing."""

    def __init__(self, view: ModelView, uses: list[Use], skip_bad: bool = False):
        self._view = view
        self.uses = uses
        self.skipped: dict[str, list[str]] = {}
        self._items, self.unmatched = plan_modules(view.names, uses, skip_bad, self.skipped)
        self._backups: dict[str, torch.Tensor] = {}  # key -> CPU copy (patched in place)
        self._swapped: dict[str, tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        # ^ key -> (parameter, its original tensor, the patched tensor it holds instead)
        self._apply()

    @property
    def patched_keys(self) -> list[str]:
        return [*self._swapped, *self._backups]

    def restore(self) -> None:
        """Put every original weight back, bit for bit, and let the copies go."""
        self._copy_back()
        self._backups.clear()
        for key in list(self._swapped):
            self._unswap(key)

    def _copy_back(self) -> None:
        with torch.no_grad():
            for key, original in self._backups.items():
                self._view.tensor(key).copy_(original)

    def set_strengths(self, strengths: Iterable) -> None:
        """New (unet[, te]) strengths per use, in order; re-applies from cached factors."""
        for use, value in zip(self.uses, strengths, strict=True):
            unet, *te = value if isinstance(value, tuple) else (value,)
            use.unet, use.te = unet, (te[0] if te else None)
        self._copy_back()  # the backups stay: re-applying needs no second copy
        self._apply()

    def reapply(self, networks, skip_bad: bool = False) -> None:
        """Apply `networks` (as `apply` takes them) instead of the current ones.

        Weights changed before and now are recomputed from the originals kept, in the
        memory they already use; the others are restored, new ones backed up. Planning
        comes first: a bad file leaves the current networks applied.
        """
        uses = as_uses(networks)
        skipped: dict[str, list[str]] = {}
        items, unmatched = plan_modules(self._view.names, uses, skip_bad, skipped)
        self._copy_back()
        self.uses, self._items, self.unmatched, self.skipped = uses, items, unmatched, skipped
        self._apply()

    def _apply(self) -> None:
        """Keep every tensor about to change, then write; a failure restores them all."""
        grouped = by_tensor(self._items)
        biased = {bias_key(k) for k, items in grouped.items() if any(i.bias is not None for i in items)}
        try:
            with torch.no_grad():
                for key in [k for k in self._swapped if k not in grouped]:
                    self._unswap(key)  # changed before, not now
                for key in [k for k in self._backups if k not in grouped and k not in biased]:
                    del self._backups[key]  # copied back already
                batch: list = []
                for key, items in grouped.items():
                    weight, source = self._writable(key)
                    apply_to_tensor(weight, items, batch, source)
                    if bias_key(key) in biased:
                        self._backup(bias_key(key))
                        apply_to_bias(self._view.tensor(bias_key(key)), items)
                kernels.add_hadamard_many_(batch)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.restore()
            labels = ", ".join(u.network.label for u in self.uses)
            raise LohaError(f"out of memory while patching {labels}; every weight was restored ({exc})") from exc
        except BaseException:
            self.restore()
            raise

    def _writable(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tensor to write, tensor to read it from or None for in place); keeps the original.

        A contiguous CPU parameter is given new memory (or the memory it got before) and
        read from its original tensor, which is kept; anything else is backed up and
        written in place.
        """
        if key in self._swapped:
            param, original, patched = self._swapped[key]
            if _holds(param, patched):
                return patched, original
            self._unswap(key)  # the host replaced it since: patch what it holds now
        param = self._view.parameter(key)
        tensor = self._view.tensor(key)
        if key not in self._backups and param is not None and tensor.device.type == "cpu" and tensor.is_contiguous():
            patched = _take_spare(param, tensor)
            self._swapped[key] = (param, tensor, patched)
            param.data = patched
            return patched, tensor
        self._backup(key)
        return tensor, None

    def _unswap(self, key: str) -> None:
        param, original, patched = self._swapped.pop(key)
        if _holds(param, patched):
            param.data = original
        else:  # the host moved or cast the weight since: copy into what it holds now
            with torch.no_grad():
                param.data.copy_(original)
        _keep_spare(param, patched)

    def _backup(self, key: str) -> None:
        if key not in self._backups:
            self._backups[key] = self._view.tensor(key).detach().to("cpu", copy=True)


#: id(parameter) -> (weak reference to it, memory its last patch used); see the module docstring.
_SPARE: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def release_memory(model=None) -> None:
    """Let go of the memory `restore` kept for the next patch of the same weights: all of it,
    or `model`'s (what `apply` takes, a state dict aside)."""
    if model is None:
        _SPARE.clear()
        return
    modules = model.values() if isinstance(model, Mapping) else [getattr(model, part, None) for part in PIPELINE_COMPONENTS] \
        if not isinstance(model, torch.nn.Module) else [model]
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                _SPARE.pop(id(param), None)


def _keep_spare(param: torch.nn.Parameter, patched: torch.Tensor) -> None:
    key = id(param)
    _SPARE[key] = (weakref.ref(param, lambda _, key=key: _SPARE.pop(key, None)), patched)


def _take_spare(param: torch.nn.Parameter, like: torch.Tensor) -> torch.Tensor:
    """Memory for the patched `like`: what this parameter's last patch used, else new."""
    ref, spare = _SPARE.pop(id(param), (None, None))
    if ref is not None and ref() is param and spare.shape == like.shape and spare.dtype == like.dtype \
            and spare.device == like.device and spare.is_contiguous():
        return spare
    return torch.empty_like(like)


def _holds(param: torch.nn.Parameter, tensor: torch.Tensor) -> bool:
    """Whether the parameter's data is still `tensor` (`param.data` is a new wrapper at each access)."""
    data = param.data
    return (data.data_ptr() == tensor.data_ptr() and data.dtype == tensor.dtype and data.shape == tensor.shape
            and data.device == tensor.device)


def _prepare(net: Network, module: Module, target: Target, use: Use) -> PlannedModule:
    """Check a module against its target, read its tensors, reduce them to canonical factors."""
    try:
        return _prepare_checked(net, module, target, use)
    except (torch.OutOfMemoryError, MemoryError) as exc:  # the machine's limit, not the file's fault
        raise LohaError(f"{net.label}: out of memory while reading module '{module.name}' for "
                        f"'{target.key}'; nothing was changed ({exc})") from exc
    except (RuntimeError, IndexError, ValueError) as exc:
        # Factors that pass the cheap checks but still do not compose (hostile files).
        shapes = ", ".join(f"{k}={v}" for k, v in sorted(module.shapes.items()))
        raise ShapeError(f"{net.label}: module '{module.name}' cannot be applied to '{target.key}' "
                         f"{tuple(target.shape)}: {exc} ({shapes})") from None


def _prepare_checked(net: Network, module: Module, target: Target, use: Use) -> PlannedModule:
    shape = tuple(target.shape)
    if module.kind != "lokr" and (module.out_features != shape[0] or module.delta_numel != math.prod(shape)):
        raise ShapeError(
            f"{net.label}: module '{module.name}' makes ΔW of {module.out_features} rows and "
            f"{module.delta_numel} elements, but its target '{target.key}' has shape {shape} "
            f"(factors {', '.join(f'{k}={v}' for k, v in sorted(module.shapes.items()))})"
        )
    t = net.tensors(module)
    dora_scale = t.get("dora_scale")
    if dora_scale is not None:
        try:
            D.dora_axis(dora_scale.shape, shape)
        except ValueError as exc:
            raise ShapeError(f"{net.label}: '{module.keys['dora_scale']}': {exc} (target '{target.key}')") from None
    rank = module.rank
    scale = D.module_scale(module.alpha, rank) if rank else 1.0
    bias = None
    if module.kind == "loha":
        factors = D.hadamard_factors(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2"))
        kind = "hadamard"
    elif module.kind == "lora":
        factors = D.lora_factors(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"))
        kind = "lowrank"
    elif module.kind == "lokr":
        factors = (_lokr_dense(net, module, t, shape),)
        kind = "dense"
    else:
        factors, kind, bias = (t["diff"],), "dense", t.get("diff_b")
    _check_finite(net, module, [*factors, dora_scale])
    return PlannedModule(use, module, target, kind, factors, scale, dora_scale, bias)


def _lokr_dense(net: Network, module: Module, t: dict, shape: tuple) -> torch.Tensor:
    """LoKr ΔW materialised (LoKr is rare in LoHa files; no fused path for it)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("ij...,jr,ip->pr...", t["lokr_t2"].float(), t["lokr_w2_b"].float(), t["lokr_w2_a"].float())
    else:
        w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float().reshape(t["lokr_w2_b"].shape[0], -1)
    if w2.dim() == 2 and len(shape) > 2:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1.reshape(*w1.shape, *([1] * (len(shape) - 2)))
    dense = D.lokr_delta(w1, w2)
    if dense.numel() != math.prod(shape):
        raise ShapeError(f"{net.label}: LoKr module '{module.name}' makes ΔW of shape {tuple(dense.shape)}, target has {shape}")
    return dense.reshape(shape[0], -1)


def _check_finite(net: Network, module: Module, tensors) -> None:
    """Refuse NaN/Inf. aminmax propagates them and is ~10× faster than isfinite() on fp16 CPU."""
    for tensor in tensors:
        if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = torch.aminmax(tensor)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise FormatError(f"{net.label}: module '{module.name}' holds NaN or Inf values")


def apply(model, networks, skip_bad: bool = False, family: str | None = None) -> PatchHandle:
    """Apply networks to `model` in place; returns a handle whose restore() undoes it exactly.

    `networks`: a Network or path (strength 1), a `Use`, a (network, unet[, te]) tuple,
    or a list of these. Names that match nothing are listed on `handle.unmatched`. A bad
    module makes the whole patch fail and change nothing, unless `skip_bad` is set: then
    it is left out with a warning and listed on `handle.skipped`. `family` ("sd1", "sd2",
    "sdxl", "flux", "sd3") is detected from the model unless given; a model of no known
    family is patched by its own module paths.
    """
    return PatchHandle(ModelView(model, family), as_uses(networks), skip_bad)
