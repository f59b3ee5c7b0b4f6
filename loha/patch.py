"""Apply networks to a live model at strengths, atomically, and restore exactly.

`apply()` plans everything before it touches a weight (family, names, shapes, finite
factors and strengths, factors read from the files), so a bad file changes nothing.
Restoring never subtracts: a CPU parameter gets its patched weight in other memory
and its original tensor back on restore (one read and one write per patch, nothing to
copy back); any other tensor (GPU weights, state dicts, views a host holds) is copied
to a CPU backup and patched in place. Changing strengths, or the set of networks
(`reapply`), recomputes from the originals kept, in the memory already taken, without
reading the files again. Handles may be restored in any order: restoring one under a
newer handle that changed the same weights unwinds the newer one first and applies it
again afterwards, so the weights are always exactly what the remaining handles give.
A result that overflows the weight's dtype (finite inputs, fp16 weights) is refused,
naming the weight, and every weight is restored.

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
from typing import Callable, Iterable, Mapping

import torch

from . import delta as D
from . import kernels
from .errors import FamilyError, FormatError, LohaError, ShapeError
from .families import FAMILIES, FAMILY_NAMES, PART_COMPONENTS, UNET_STATE_PREFIXES
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

    def __post_init__(self):
        self.unet = check_strength(self.unet, f"{self.network.label}: UNet strength")
        if self.te is not None:
            self.te = check_strength(self.te, f"{self.network.label}: text-encoder strength")
        for block, value in self.blocks.items():
            check_strength(value, f"{self.network.label}: block weight {block}")

    def strength(self, target: Target) -> float:
        if target.component == "unet":
            return self.unet * self.blocks.get(target.block, 1.0)
        te = self.unet if self.te is None else self.te
        return te * self.blocks.get(target.block, 1.0)


def check_strength(value, what: str = "strength") -> float:
    """`value` as a float; a non-number, NaN or ±Inf is refused (it would write NaN into every weight)."""
    if isinstance(value, (str, bytes, bool)):
        raise LohaError(f"{what} {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LohaError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LohaError(f"{what} is {number}; strengths must be finite numbers")
    return number


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

    def shape_of(self, key: str) -> tuple[int, ...] | None:
        """The shape of the tensor under `key`, None if the model has none there."""
        tensor = self.tensor(key)
        return None if tensor is None else tuple(tensor.shape)

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
    bias: torch.Tensor | None = None  # full-diff modules' diff_b, norm modules' b_norm
    bound: float = math.inf  # max |ΔW| (and |Δbias|) at strength 1: decides whether overflow is possible


def plan_modules(names: NameMap, uses: list[Use], skip_bad: bool = False,
                 skipped: dict[str, list[str]] | None = None,
                 shape_of: Callable[[str], tuple | None] | None = None,
                 failed: dict[str, str] | None = None) -> tuple[list[PlannedModule], dict[str, list[str]]]:
    """Match, check and read every module of every use; nothing is written.

    Returns the items, and per network (by label) the module names that matched nothing.
    A network for another model family is refused as such. A bad module (wrong shape,
    NaN, …) raises; with `skip_bad` it is left out instead, with a warning, and its
    error message recorded in `skipped` under the network's label. `shape_of(key)` gives
    the shape of any tensor of the model (None if it has none): biases that full-diff and
    norm modules change are checked with it. With `failed`, a network that cannot be
    planned at all is left out and its message recorded there under its label.
    """
    with kernels.tiled.one_thread():  # many small tensors: see one_thread
        return _plan(names, uses, skip_bad, skipped, shape_of, failed)


def _plan(names: NameMap, uses: list[Use], skip_bad: bool, skipped: dict | None, shape_of: Callable | None,
          failed: dict | None) -> tuple[list[PlannedModule], dict[str, list[str]]]:
    items, unmatched = [], {}
    for use in uses:
        try:
            planned, missing = _plan_use(names, use, skip_bad, skipped, shape_of)
        except LohaError as exc:
            if failed is None:
                raise
            failed[use.network.label] = str(exc)
            continue
        items += planned
        if missing:
            unmatched[use.network.label] = missing
    return items, unmatched


def _plan_use(names: NameMap, use: Use, skip_bad: bool, skipped: dict | None,
              shape_of: Callable | None) -> tuple[list[PlannedModule], list[str]]:
    net = use.network
    if net.family in FAMILIES and names.family in FAMILIES and net.family != names.family:
        raise FamilyError(f"{net.label}: the file is for {net.family} models, this model is {names.family} (a "
                          f"{FAMILY_NAMES.get(net.family, net.family)} network cannot patch a "
                          f"{FAMILY_NAMES.get(names.family, names.family)} model)")
    items, missing, seen = [], [], {}
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
            items += split_rows(_prepare(net, module, target, use, shape_of))
        except LohaError as exc:
            if not skip_bad:
                raise
            warnings.warn(f"skipping a bad module: {exc}", stacklevel=4)
            if skipped is not None:
                skipped.setdefault(net.label, []).append(str(exc))
    return items, missing


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
        strength = item.use.strength(item.target)
        if not math.isfinite(strength):
            raise LohaError(f"{item.use.network.label}: strength {strength} for '{item.target.key}'; strengths "
                            "must be finite numbers")
        if strength != 0:
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
    if source is not None and (set(regions) != {None} or items[0].target.transposed):
        # rows left alone must be copied too, and a transposed region is patched where it lies
        weight.copy_(source)
        source = None
    own_batch = batch is None
    batch = [] if own_batch else batch
    for rows, group in regions.items():
        region = weight if rows is None else weight[rows[0] : rows[1]]
        if group[0].target.transposed:  # stored input-major (OpenCLIP's text_projection)
            region = region.t()
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
    """Add full-diff modules' `diff_b` (norm modules' `b_norm`) into the bias next to their weight."""
    total = bias.float()
    for it in items:
        if it.bias is not None:
            rows = it.target.rows
            region = total if rows is None else total[rows[0] : rows[1]]
            region += it.bias.float().to(bias.device).reshape(region.shape) * it.use.strength(it.target)
    bias.copy_(total)


def overflow_possible(items: list[PlannedModule], dtype: torch.dtype) -> bool:
    """Whether adding `items` could take a `dtype` weight beyond its range.

    Each item's `bound` is the largest |ΔW| it can add at strength 1. While their sum
    stays under half a unit in the last place at the dtype's maximum, no finite weight
    can round to ±Inf, whatever its value, so the common case needs no extra pass over
    the weight; otherwise the caller checks the result.
    """
    if not dtype.is_floating_point:
        return False
    info = torch.finfo(dtype)
    total = sum(abs(it.use.strength(it.target)) * it.bound for it in items)
    return not total < info.max * info.eps / 4


def overflowed(result: torch.Tensor, original: torch.Tensor | None = None) -> bool:
    """Whether `result` holds ±Inf or NaN that `original` (the weight before) did not."""
    if result.numel() == 0 or not result.is_floating_point():
        return False
    low, high = torch.aminmax(result)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return False
    if original is None:
        return True
    low, high = torch.aminmax(original)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def overflow_error(key: str, items: list[PlannedModule], dtype: torch.dtype) -> LohaError:
    labels = ", ".join(sorted({it.use.network.label for it in items}))
    return LohaError(f"'{key}' would overflow its {str(dtype).removeprefix('torch.')} range with {labels} at these "
                     "strengths (values beyond its largest number become Inf); lower the strengths or use "
                     "an fp32 or bf16 model")


#: Handles with weights changed, oldest first (weak: a handle dropped unrestored is forgotten).
_ACTIVE: list[weakref.ref] = []


class PatchHandle:
    """What `apply()` returns: restore(), set strengths, and what was not applied.

    `unmatched`: per network, module names that match no weight; `unknown_keys`: per
    network, file keys of no known kind; `skipped`: modules left out by `skip_bad`;
    `failed`: networks left out whole by `skip_failed`, with the reason.
    """

    def __init__(self, view: ModelView, uses: list[Use], skip_bad: bool = False, skip_failed: bool = False):
        self._view = view
        self.skipped: dict[str, list[str]] = {}
        self.failed: dict[str, str] = {}
        self._items, self.unmatched = plan_modules(view.names, uses, skip_bad, self.skipped, view.shape_of,
                                                   self.failed if skip_failed else None)
        self.uses = [u for u in uses if u.network.label not in self.failed]
        self._backups: dict[str, torch.Tensor] = {}  # key -> CPU copy (patched in place)
        self._swapped: dict[str, tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        # ^ key -> (parameter, its original tensor, the patched tensor it holds instead)
        self._apply()
        _ACTIVE.append(weakref.ref(self))

    @property
    def unknown_keys(self) -> dict[str, list[str]]:
        return {u.network.label: list(u.network.unknown_keys) for u in self.uses if u.network.unknown_keys}

    @property
    def patched_keys(self) -> list[str]:
        return [*self._swapped, *self._backups]

    def restore(self) -> None:
        """Put every original weight back, bit for bit, and let the copies go.

        Newer handles that changed the same weights are unwound first and applied
        again afterwards, so any order of restores ends exactly where LIFO order would.
        """
        above = self._unwind_newer()
        self._release()
        _forget(self)
        for handle in above:
            handle._apply()

    def _release(self) -> None:
        """Every original back and no copies kept: what restore does to this handle alone."""
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
        new = []
        for use, value in zip(self.uses, strengths, strict=True):
            unet, *te = value if isinstance(value, tuple) else (value,)
            new.append((check_strength(unet, f"{use.network.label}: UNet strength"),
                        None if not te or te[0] is None else check_strength(te[0], f"{use.network.label}: "
                                                                                   "text-encoder strength")))
        above = self._unwind_newer()
        for use, (unet, te) in zip(self.uses, new):
            use.unet, use.te = unet, te
        self._copy_back()  # the backups stay: re-applying needs no second copy
        try:
            self._apply()
        finally:
            for handle in above:
                handle._apply()

    def _spans(self) -> set[tuple]:
        """Where the tensors this handle may change live now (device, address): how handles overlap.

        Every tensor its modules target counts, not only those changed at the current
        strengths, so raising a strength from 0 later is still ordered against newer handles.
        """
        keys = {item.target.key for item in self._items}
        keys |= {bias_key(item.target.key) for item in self._items if item.bias is not None}
        spans = set()
        for key in keys:
            tensor = self._view.tensor(key)
            if tensor is not None and tensor.data_ptr():
                spans.add((tensor.device, tensor.data_ptr()))
        return spans

    def _unwind_newer(self) -> list["PatchHandle"]:
        """Restore the newer handles that changed what this one changed (newest first); returns
        them oldest first, released, for `_apply` to put them back on top."""
        handles = [h for h in (ref() for ref in _ACTIVE) if h is not None]
        if self not in handles:
            return []
        touched, above = self._spans(), []
        for handle in handles[handles.index(self) + 1:]:
            spans = handle._spans()
            if spans & touched:
                above.append(handle)
                touched |= spans
        for handle in reversed(above):
            handle._release()
        return above

    def reapply(self, networks, skip_bad: bool = False) -> None:
        """Apply `networks` (as `apply` takes them) instead of the current ones.

        Weights changed before and now are recomputed from the originals kept, in the
        memory they already use; the others are restored, new ones backed up. Planning
        comes first: a bad file leaves the current networks applied.
        """
        uses = as_uses(networks)
        skipped: dict[str, list[str]] = {}
        items, unmatched = plan_modules(self._view.names, uses, skip_bad, skipped, self._view.shape_of)
        above = self._unwind_newer()
        self._copy_back()
        self.uses, self._items, self.unmatched, self.skipped = uses, items, unmatched, skipped
        try:
            self._apply()
        finally:
            for handle in above:
                handle._apply()

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
                self._check_range(grouped)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self._undo()
            labels = ", ".join(u.network.label for u in self.uses)
            raise LohaError(f"out of memory while patching {labels}; every weight was restored ({exc})") from exc
        except BaseException:
            self._undo()
            raise

    def _undo(self) -> None:
        """Put back what a failed `_apply` wrote (the handle then holds nothing)."""
        self._release()
        _forget(self)

    def _check_range(self, grouped: dict[str, list[PlannedModule]]) -> None:
        """Refuse results that overflowed the weight's dtype (checked only where it could happen)."""
        for key, items in grouped.items():
            tensor = self._view.tensor(key)
            original = self._swapped[key][1] if key in self._swapped else self._backups[key]
            if overflow_possible(items, tensor.dtype) and overflowed(tensor, original):
                raise overflow_error(key, items, tensor.dtype)
            bias = bias_key(key)
            if bias in self._backups and overflowed(self._view.tensor(bias), self._backups[bias]):
                raise overflow_error(bias, items, self._view.tensor(bias).dtype)

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


def _forget(handle: PatchHandle) -> None:
    _ACTIVE[:] = [ref for ref in _ACTIVE if ref() is not None and ref() is not handle]


#: id(parameter) -> (weak reference to it, memory its last patch used); see the module docstring.
_SPARE: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def release_memory(model=None) -> None:
    """Let go of the memory `restore` kept for the next patch of the same weights: all of it,
    or `model`'s (what `apply` takes, a state dict aside)."""
    if model is None:
        _SPARE.clear()
        return
    if isinstance(model, torch.nn.Module):
        modules = [model]
    elif isinstance(model, Mapping):
        modules = model.values()
    else:  # a pipeline
        modules = [getattr(model, attr, None) for attr in PART_COMPONENTS]
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


def _prepare(net: Network, module: Module, target: Target, use: Use, shape_of=None) -> PlannedModule:
    """Check a module against its target, read its tensors, reduce them to canonical factors."""
    try:
        return _prepare_checked(net, module, target, use, shape_of)
    except (torch.OutOfMemoryError, MemoryError) as exc:  # the machine's limit, not the file's fault
        raise LohaError(f"{net.label}: out of memory while reading module '{module.name}' for "
                        f"'{target.key}'; nothing was changed ({exc})") from exc
    except (RuntimeError, IndexError, ValueError) as exc:
        # Factors that pass the cheap checks but still do not compose (hostile files).
        shapes = ", ".join(f"{k}={v}" for k, v in sorted(module.shapes.items()))
        raise ShapeError(f"{net.label}: module '{module.name}' cannot be applied to '{target.key}' "
                         f"{tuple(target.shape)}: {exc} ({shapes})") from None


def _prepare_checked(net: Network, module: Module, target: Target, use: Use, shape_of) -> PlannedModule:
    shape = tuple(target.shape)
    factors_shown = ", ".join(f"{k}={v}" for k, v in sorted(module.shapes.items()))
    if module.out_features != shape[0] or module.delta_numel != math.prod(shape):
        raise ShapeError(
            f"{net.label}: module '{module.name}' makes ΔW of {module.out_features} rows and "
            f"{module.delta_numel} elements, but its target '{target.key}' has shape {shape} "
            f"(factors {factors_shown})"
        )
    bias_suffix = {"full": "diff_b", "norm": "b_norm"}.get(module.kind)
    if bias_suffix in module.keys:
        _check_bias(net, module, target, shape_of, bias_suffix)
    t = net.tensors(module)
    dora_scale = t.get("dora_scale")
    if dora_scale is not None:
        try:
            D.dora_axis(dora_scale.shape, shape)
        except ValueError as exc:
            raise ShapeError(f"{net.label}: '{module.keys['dora_scale']}': {exc} (target '{target.key}')") from None
    rank = module.rank
    scale = D.module_scale(module.alpha, rank) if rank else 1.0
    bias = t.get(bias_suffix) if bias_suffix else None
    if module.kind == "loha":
        factors = D.hadamard_factors(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2"))
        kind = "hadamard"
    elif module.kind == "lora":
        factors = D.lora_factors(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"))
        kind = "lowrank"
    elif module.kind == "lokr":
        factors = (_lokr_dense(net, module, t, shape),)
        kind = "dense"
    else:  # full diff, or a norm layer's w_norm: the change itself
        factors, kind = (t["diff"] if module.kind == "full" else t["w_norm"],), "dense"
    *peaks, _, bias_peak = _finite_peaks(net, module, [*factors, dora_scale, bias])
    bound = math.inf if dora_scale is not None else abs(scale) * _bound(kind, factors, peaks)
    return PlannedModule(use, module, target, kind, factors, scale, dora_scale, bias, max(bound, bias_peak))


def _check_bias(net: Network, module: Module, target: Target, shape_of, suffix: str) -> None:
    """A module that changes a bias needs layers with a bias of their rows' size (each piece's,
    for a target over several weights)."""
    if shape_of is None:
        return
    for piece in target.pieces or (target,):
        key = bias_key(piece.key)
        bias = shape_of(key)
        rows = piece.rows or (0, piece.shape[0])
        if bias is None:
            raise ShapeError(f"{net.label}: '{module.keys[suffix]}' changes a bias, but '{piece.key}' has no bias "
                             f"('{key}' does not exist)")
        if len(bias) != 1 or bias[0] < rows[1] or (piece.rows is None and bias[0] != piece.shape[0]):
            raise ShapeError(f"{net.label}: '{module.keys[suffix]}' {module.shapes[suffix]} does not fit the bias "
                             f"'{key}' {tuple(bias)}")


def _bound(kind: str, factors, peaks: list[float]) -> float:
    """Largest |ΔW| the factors can make, from their largest magnitudes `peaks`: a product a @ b
    of inner size R makes at most R·max|a|·max|b| per branch."""
    if kind == "dense":
        return peaks[0]
    branches = [a.shape[1] * peaks[2 * i] * peaks[2 * i + 1] for i, a in enumerate(factors[0::2])]
    if any(b > 1e30 for b in branches):  # an fp32 intermediate could overflow on its own
        return math.inf
    return math.prod(branches)


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
    return dense.reshape(shape[0], -1)


def _finite_peaks(net: Network, module: Module, tensors) -> list[float]:
    """max |x| of each tensor (0 for None), refusing NaN/Inf. aminmax propagates them and is
    ~10× faster than isfinite() on fp16 CPU."""
    peaks = []
    for tensor in tensors:
        if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
            peaks.append(0.0)
            continue
        low, high = (float(x) for x in torch.aminmax(tensor))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise FormatError(f"{net.label}: module '{module.name}' holds NaN or Inf values")
        peaks.append(max(-low, high))
    return peaks


def apply(model, networks, skip_bad: bool = False, family: str | None = None) -> PatchHandle:
    """Apply networks to `model` in place; returns a handle whose restore() undoes it exactly.

    `networks`: a Network or path (strength 1), a `Use`, a (network, unet[, te]) tuple,
    or a list of these. Names that match nothing are listed on `handle.unmatched`, keys of
    no known kind on `handle.unknown_keys`; both are also given as a warning. A bad
    module makes the whole patch fail and change nothing, unless `skip_bad` is set: then
    it is left out with a warning and listed on `handle.skipped`. `family` ("sd1", "sd2",
    "sdxl", "flux", "sd3") is detected from the model unless given; a model of no known
    family is patched by its own module paths.
    """
    handle = PatchHandle(ModelView(model, family), as_uses(networks), skip_bad)
    for label, names in handle.unmatched.items():
        warnings.warn(f"{label}: {len(names)} module names match no weight of the model and were not applied "
                      f"(first: '{names[0]}'; all on handle.unmatched)", stacklevel=2)
    for label, keys in handle.unknown_keys.items():
        warnings.warn(f"{label}: {len(keys)} keys are of no known kind and were not applied (first: '{keys[0]}'; "
                      "all on handle.unknown_keys)", stacklevel=2)
    return handle
