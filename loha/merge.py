"""Bake networks into a checkpoint file, streaming tensor by tensor.

    loha.merge.merge("model.safetensors", [("style.safetensors", 0.8, 0.5)], "out.safetensors")

Only the checkpoint's header is read up front: the name map is built from its shapes
and every network is planned (matched, checked, factors read) before a byte is
written. Then each tensor is read alone, the ΔW of its items is added by the same
code `loha.apply` uses (fp32 math, one rounding to the output dtype), and its bytes
are appended to the output. Peak memory is the networks plus a couple of copies of
the largest tensor, whatever the checkpoint's size.

The output appears at OUT only when complete (`safetensors_io.AtomicFile`), so an
interrupted merge leaves no OUT behind. A pickled ``.ckpt`` is read only through
``torch.load(weights_only=True)``, whole (`files.checkpoint`); that one is not streamed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import LohaError, UnmatchedError
from .files.checkpoint import PICKLE_SUFFIXES, open_checkpoint
from .files.safetensors_io import Entry, data_order, dtype_name, dtype_of_name, refuse_existing, write_streamed
from .keys import bias_key, map_state_dict
from .merge_records import merge_record, with_records
from .patch import (PlannedModule, Use, apply_to_bias, apply_to_tensor, as_uses, by_tensor, overflow_error,
                    overflow_possible, overflowed, plan_modules)


@dataclass
class MergeResult:
    """What a merge did."""

    out: str
    checkpoint: str
    streamed: bool  # False for a pickled checkpoint (loaded whole)
    tensors: int  # tensors written
    changed: list[str] = field(default_factory=list)  # keys whose values the networks changed
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # network label -> names
    unknown_keys: dict[str, list[str]] = field(default_factory=dict)  # network label -> keys of no known kind
    dropped: list[str] = field(default_factory=list)  # non-tensor entries of a pickle
    merged: list[dict] = field(default_factory=list)  # the records added to the metadata
    bytes: int = 0  # size of OUT
    seconds: dict[str, float] = field(default_factory=dict)  # "plan", "write", "total"


@dataclass
class _Change:
    """What one tensor of the checkpoint gets: `apply(tensor, items)` adds their ΔW (or bias)."""

    apply: Callable[[torch.Tensor, list[PlannedModule]], None]
    items: list[PlannedModule]


@dataclass
class _Plan:
    """Everything decided before a byte is written."""

    changes: dict[str, _Change]  # key -> what adds ΔW (or diff_b) into it
    unmatched: dict[str, list[str]]
    records: list[dict]


def merge(
    checkpoint: str | os.PathLike,
    networks,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    allow_unmatched: bool = False,
    overwrite: bool = False,
    progress: bool | None = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge `networks` into `checkpoint`, writing a safetensors file at `out`.

    `networks`: what `loha.apply` accepts (paths, Networks, `Use`s, (net, unet[, te])
    tuples). `dtype`: "fp16"/"bf16"/"fp32" for every floating tensor of the output,
    None to keep each tensor's. `progress`: a tqdm bar (None: only on a terminal);
    `on_progress(done_bytes, total_bytes)` is called after each tensor (UI progress bars).
    Raises `UnmatchedError` when a network names weights the checkpoint lacks, unless
    `allow_unmatched`; refuses to write over the checkpoint, a network, or (without
    `overwrite`) any existing file.
    """
    start = time.perf_counter()
    checkpoint, out = os.fspath(checkpoint), os.fspath(out)
    uses = as_uses(networks)
    out_dtype = dtype_of_name(dtype)
    dev = _device(device)
    _check_paths(checkpoint, out, uses, overwrite)
    source = open_checkpoint(checkpoint)
    try:
        plan = _plan(checkpoint, source, uses, allow_unmatched)
        entries = data_order(Entry(k, dtype_name(_cast_dtype(dt, out_dtype)), shape)
                             for k, (dt, shape) in source.layout().items())
        planned = time.perf_counter()
        result = MergeResult(out, checkpoint, source.streamed, len(entries), unmatched=plan.unmatched,
                             unknown_keys={u.network.label: u.network.unknown_keys for u in uses if u.network.unknown_keys},
                             dropped=source.dropped, merged=plan.records)
        _write(out, entries, with_records(source.metadata, plan.records), source, plan, result,
               dev, out_dtype, progress, on_progress, overwrite)
    finally:
        source.close()
    result.bytes = os.path.getsize(out)
    finished = time.perf_counter()
    result.seconds = {"plan": planned - start, "write": finished - planned, "total": finished - start}
    return result


def _plan(checkpoint: str, source, uses: list[Use], allow_unmatched: bool) -> _Plan:
    """Match and check every network against the checkpoint's header; read their factors."""
    shapes = source.shapes()
    try:
        names = map_state_dict(shapes)
    except LohaError as exc:
        raise LohaError(f"{checkpoint}: {exc}") from None
    items, unmatched = plan_modules(names, uses, shape_of=shapes.get)
    if unmatched and not allow_unmatched:
        raise _unmatched_error(checkpoint, names.family, unmatched)
    changes: dict[str, _Change] = {}
    for key, group in by_tensor(items).items():
        changes[key] = _Change(apply_to_tensor, group)
        if any(item.bias is not None for item in group):
            changes[bias_key(key)] = _Change(apply_to_bias, group)
    records = [merge_record(use, sum(1 for i in items if i.use is use)) for use in uses]
    return _Plan(changes, unmatched, records)


def _write(out: str, entries: list[Entry], metadata: dict[str, str], source, plan: _Plan, result: MergeResult,
           dev: torch.device, out_dtype: torch.dtype | None, progress: bool | None,
           on_progress: Callable[[int, int], None] | None, overwrite: bool) -> None:
    """Read, change and append each tensor in turn, reporting the bytes done."""
    total, done = sum(e.nbytes for e in entries), 0

    def tensor_of(key: str) -> torch.Tensor:
        tensor = source.read(key)
        if key not in plan.changes:
            return tensor.to(_cast_dtype(tensor.dtype, out_dtype))
        result.changed.append(key)
        return _patched(key, tensor, plan.changes[key], dev, out_dtype, owned=source.streamed)

    with tqdm(total=total, unit="B", unit_scale=True, desc="merging",
              disable=None if progress is None else not progress) as bar:
        def written(entry: Entry) -> None:
            nonlocal done
            bar.update(entry.nbytes)
            done += entry.nbytes
            if on_progress is not None:
                on_progress(done, total)

        write_streamed(out, entries, metadata, tensor_of, written=written, overwrite=overwrite)


def _patched(key: str, tensor: torch.Tensor, change: "_Change", dev: torch.device,
             out_dtype: torch.dtype | None, owned: bool) -> torch.Tensor:
    """Apply in fp32 on `dev`, then round once to the output dtype, back on the CPU.

    `owned`: `tensor` is a fresh buffer nobody else sees (else it is copied first). A
    result beyond the output dtype's range (±Inf from finite inputs) is refused, naming
    the tensor: nothing has been written under OUT's name yet.
    """
    result_dtype = _cast_dtype(tensor.dtype, out_dtype)
    risky = overflow_possible(change.items, result_dtype)
    original = tensor.clone() if risky and owned else tensor
    work = tensor.to(dev, torch.float32, copy=not owned)
    with torch.no_grad():
        change.apply(work, change.items)
    result = work.to("cpu", result_dtype)
    if risky and overflowed(result, original):
        raise overflow_error(key, change.items, result_dtype)
    return result


def _cast_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LohaError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LohaError(f"device {device!r}: this torch build sees no CUDA device")
    return dev


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _check_paths(checkpoint: str, out: str, uses: list[Use], overwrite: bool) -> None:
    if not os.path.exists(checkpoint):
        raise LohaError(f"{checkpoint}: no such checkpoint")
    if _same(checkpoint, out):
        raise LohaError(f"{out}: refusing to overwrite the input checkpoint; choose another output path")
    for use in uses:
        if use.network.path and _same(use.network.path, out):
            raise LohaError(f"{out}: refusing to overwrite a network being merged")
    if os.path.isdir(out):
        raise LohaError(f"{out}: is a folder; give the output file's path")
    refuse_existing(out, overwrite)
    if out.lower().endswith(PICKLE_SUFFIXES):
        raise LohaError(f"{out}: merges are written as safetensors only; name it .safetensors")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise LohaError(f"{out}: folder {folder} does not exist")


def _unmatched_error(checkpoint: str, family: str, unmatched: dict[str, list[str]]) -> UnmatchedError:
    names = [n for group in unmatched.values() for n in group]
    parts = []
    for label, group in unmatched.items():
        shown = ", ".join(group[:20]) + (f", … ({len(group) - 20} more)" if len(group) > 20 else "")
        parts.append(f"{label}: {len(group)} module names match no weight of {checkpoint} ({family}): {shown}")
    parts.append("nothing was written; allow unmatched names to merge the rest")
    return UnmatchedError("\n".join(parts), names)
