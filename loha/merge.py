"""Bake networks into a checkpoint file, streaming tensor by tensor.

    loha.merge.merge("model.safetensors", [("style.safetensors", 0.8, 0.5)], "out.safetensors")

Only the checkpoint's header is read up front: the name map is built from its shapes
and every network is planned (matched, checked, factors read) before a byte is
written. Then each tensor is read alone, the ΔW of its items is added by the same
code `loha.patch` uses (fp32 math, one rounding to the output dtype), and its bytes
are appended to the output. Peak memory is the networks plus a couple of copies of
the largest tensor, whatever the checkpoint's size.

The output is written to an unnamed temporary file in OUT's folder (a named hidden
one where the OS has no O_TMPFILE) and only renamed to OUT when complete, so an
interrupted merge leaves no OUT behind. A pickled ``.ckpt`` is read only through
``torch.load(weights_only=True)``, whole (memory-mapped where its format allows);
that one is not streamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .errors import FormatError, LohaError, UnmatchedError
from .keys import map_state_dict
from .patch import Use, apply_to_bias, apply_to_tensor, as_uses, by_tensor, plan
from .stream import Entry, Reader, Writer, data_order, dtype_name, torch_dtype

#: --dtype values.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Output metadata key holding what was merged (a JSON list, appended to on re-merges).
MERGED_KEY = "loha_merged"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class MergeResult:
    """What a merge did."""

    out: str
    checkpoint: str
    streamed: bool  # False for a pickled checkpoint (loaded whole)
    tensors: int  # tensors written
    changed: list[str] = field(default_factory=list)  # keys whose values the networks changed
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # network label -> names
    dropped: list[str] = field(default_factory=list)  # non-tensor entries of a pickle
    merged: list[dict] = field(default_factory=list)  # the records added to the metadata
    bytes: int = 0  # size of OUT
    seconds: dict[str, float] = field(default_factory=dict)  # "plan", "write", "total"


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

    `networks`: what `loha.patch` accepts (paths, Networks, `Use`s, (net, unet[, te])
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
    out_dtype = _out_dtype(dtype)
    dev = _device(device)
    _check_paths(checkpoint, out, uses, overwrite)

    source = open_checkpoint(checkpoint)
    try:
        try:
            names = map_state_dict(source.shapes())
        except LohaError as exc:
            raise LohaError(f"{checkpoint}: {exc}") from None
        items, unmatched = plan(names, uses)
        if unmatched and not allow_unmatched:
            raise _unmatched_error(checkpoint, names.family, unmatched)
        grouped = by_tensor(items)
        biases = {_bias_key(k): v for k, v in grouped.items() if any(i.bias is not None for i in v)}
        records = [merge_record(use, sum(1 for i in items if i.use is use)) for use in uses]
        metadata = _metadata(source.metadata, records)
        entries = data_order(
            Entry(k, dtype_name(_cast_dtype(dt, out_dtype)), shape) for k, (dt, shape) in source.layout().items()
        )
        planned = time.perf_counter()

        result = MergeResult(out, checkpoint, source.streamed, len(entries), unmatched=unmatched,
                             dropped=source.dropped, merged=records)
        total, done = sum(e.nbytes for e in entries), 0
        with _AtomicFile(out) as f, tqdm(total=total, unit="B", unit_scale=True, desc="merging",
                                         disable=None if progress is None else not progress) as bar:
            writer = Writer(f, entries, metadata)
            for entry in entries:
                tensor = source.read(entry.key)
                if entry.key in grouped:
                    apply = lambda w, it=grouped[entry.key]: apply_to_tensor(w, it)  # noqa: E731
                elif entry.key in biases:
                    apply = lambda b, it=biases[entry.key]: apply_to_bias(b, it)  # noqa: E731
                else:
                    apply = None
                if apply is not None:
                    tensor = _patched(tensor, apply, dev, out_dtype, owned=source.streamed)
                    result.changed.append(entry.key)
                else:
                    tensor = tensor.to(_cast_dtype(tensor.dtype, out_dtype))
                writer.write(entry.key, tensor)
                del tensor
                bar.update(entry.nbytes)
                done += entry.nbytes
                if on_progress is not None:
                    on_progress(done, total)
            writer.close()
    finally:
        source.close()
    result.bytes = os.path.getsize(out)
    finished = time.perf_counter()
    result.seconds = {"plan": planned - start, "write": finished - planned, "total": finished - start}
    return result


def _patched(tensor: torch.Tensor, apply: Callable[[torch.Tensor], None], dev: torch.device,
             out_dtype: torch.dtype | None, owned: bool) -> torch.Tensor:
    """Apply in fp32 on `dev`, then round once to the output dtype, back on the CPU.

    `owned`: `tensor` is a fresh buffer nobody else sees (else it is copied first).
    """
    result_dtype = _cast_dtype(tensor.dtype, out_dtype)
    work = tensor.to(dev, torch.float32, copy=not owned)
    with torch.no_grad():
        apply(work)
    return work.to("cpu", result_dtype)


def _cast_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


def _out_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise LohaError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})") from None


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
    if not os.path.isfile(checkpoint):
        raise LohaError(f"{checkpoint}: no such checkpoint")
    if _same(checkpoint, out):
        raise LohaError(f"{out}: refusing to overwrite the input checkpoint; choose another output path")
    for use in uses:
        if use.network.path and _same(use.network.path, out):
            raise LohaError(f"{out}: refusing to overwrite a network being merged")
    if os.path.isdir(out):
        raise LohaError(f"{out}: is a folder; give the output file's path")
    if os.path.exists(out) and not overwrite:
        raise LohaError(f"{out}: already exists (pass --force to replace it)")
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
    parts.append("nothing was written; allow unmatched names (--allow-unmatched) to merge the rest")
    return UnmatchedError("\n".join(parts), names)


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + "bias"


# --------------------------------------------------------------------------- metadata


def file_hashes(path: str | os.PathLike) -> dict[str, str]:
    """Hashes the model tools show for a safetensors file, in one read.

    "sha256": of the whole file (the WebUI's; its "AutoV2" short hash is the first 10
    hex digits). "model_hash": of everything after the header (kohya's
    `sshs_model_hash`, unchanged by metadata edits).
    """
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        whole.update(head)
        if len(head) == 8:
            header = f.read(int.from_bytes(head, "little"))
            whole.update(header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            whole.update(chunk)
            data.update(chunk)
    digest = whole.hexdigest()
    return {"sha256": digest, "autov2": digest[:10], "model_hash": data.hexdigest()}


def merge_record(use: Use, modules: int) -> dict:
    net = use.network
    record = {
        "name": os.path.basename(net.path) if net.path else net.name,
        "unet": use.unet,
        "te": use.unet if use.te is None else use.te,
        "modules": modules,
    }
    if use.blocks:
        record["blocks"] = dict(use.blocks)
    if net.path:
        record.update(file_hashes(net.path))
    if net.metadata.get("sshs_model_hash"):
        record["sshs_model_hash"] = net.metadata["sshs_model_hash"]
    return record


def _metadata(base: dict[str, str], records: list[dict]) -> dict[str, str]:
    """The input's metadata, with this merge's records appended to `loha_merged`."""
    metadata = dict(base)
    try:
        earlier = json.loads(metadata.get(MERGED_KEY, "[]"))
        earlier = earlier if isinstance(earlier, list) else [earlier]
    except ValueError:
        earlier = [metadata[MERGED_KEY]]
    metadata[MERGED_KEY] = json.dumps(earlier + records, ensure_ascii=False)
    return metadata


def merged_records(metadata: dict[str, str]) -> list[dict]:
    """What earlier merges recorded in a checkpoint's metadata ([] if none)."""
    try:
        records = json.loads(metadata.get(MERGED_KEY, "[]"))
    except ValueError:
        return []
    return records if isinstance(records, list) else []


# --------------------------------------------------------------------------- checkpoints


class _SafetensorsCheckpoint:
    streamed = True

    def __init__(self, path: str):
        self._reader = Reader(path)
        self.metadata = self._reader.metadata
        self.dropped: list[str] = []

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._reader.shapes()

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (torch_dtype(e.dtype), e.shape) for k, e in self._reader.entries.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._reader.read(key)

    def close(self) -> None:
        self._reader.close()


class _PickleCheckpoint:
    """A `.ckpt` loaded whole with `torch.load(weights_only=True)`: no code runs."""

    streamed = False

    def __init__(self, path: str):
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) pickles cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but plain tensors and containers
            raise FormatError(f"{path}: cannot load as a weights-only checkpoint ({exc})") from None
        outer: list[str] = []
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            outer = [str(k) for k in obj if k != "state_dict"]  # global_step, optimizer state …
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.dropped = sorted(outer + [str(k) for k in obj if k not in self._tensors])
        self.metadata: dict[str, str] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]  # callers never write into it: patched tensors are copied

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str):
    """A checkpoint as shapes + metadata + one tensor at a time (safetensors or a pickle)."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        return _PickleCheckpoint(path)
    return _SafetensorsCheckpoint(path)


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes of a checkpoint's tensors; for safetensors only its header is read."""
    source = open_checkpoint(os.fspath(path))
    try:
        return source.shapes()
    finally:
        source.close()


# --------------------------------------------------------------------------- atomic output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_fd(fd: int, name: str) -> None:
    """Give an O_TMPFILE file a name: through /proc, else linkat(AT_EMPTY_PATH)."""
    try:
        os.link(f"/proc/self/fd/{fd}", name, follow_symlinks=True)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        first = exc
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_empty_path = -100, 0x1000
    if libc.linkat(fd, b"", at_fdcwd, os.fsencode(name), at_empty_path) != 0:
        errno = ctypes.get_errno()
        if errno == 17:
            raise FileExistsError(errno, os.strerror(errno), name)
        raise first


_LINKABLE: dict[str, bool] = {}


def _tmpfile_works(folder: str) -> bool:
    """Whether unnamed files can be made in `folder` and named later (probed once)."""
    if folder not in _LINKABLE:
        works = False
        if hasattr(os, "O_TMPFILE"):
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
            except OSError:
                fd = None
            if fd is not None:
                name = os.path.join(folder, f".loha-probe.{os.getpid()}.{os.urandom(4).hex()}")
                try:
                    _link_fd(fd, name)
                    os.unlink(name)
                    works = True
                except OSError:
                    pass
                finally:
                    os.close(fd)
        _LINKABLE[folder] = works
    return _LINKABLE[folder]


class _AtomicFile:
    """A file that appears at `path` only when the `with` block completes.

    On Linux it is an O_TMPFILE (no name until linked, so even a killed process leaves
    nothing behind); elsewhere a hidden `.NAME.*.part` beside `path`, removed on any
    error or interrupt (SIGTERM included, through the CLI's handler).
    """

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self._named: str | None = None

    def __enter__(self):
        mode = 0o666 & ~_umask()
        if _tmpfile_works(self.folder):
            fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY, mode)
        else:
            fd, self._named = tempfile.mkstemp(dir=self.folder, prefix=f".{os.path.basename(self.path)}.", suffix=".part")
            os.chmod(self._named, mode)
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        return self.file

    def _link(self) -> str:
        """Name the unnamed file beside `path` (os.replace needs a name)."""
        for _ in range(100):
            name = os.path.join(self.folder, f".{os.path.basename(self.path)}.{os.urandom(6).hex()}.part")
            try:
                _link_fd(self.file.fileno(), name)
                return name
            except FileExistsError:
                continue
        raise LohaError(f"{self.folder}: cannot name the temporary output file")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                return
            self.file.flush()
            os.fsync(self.file.fileno())
            if self._named is None:
                self._named = self._link()
            os.replace(self._named, self.path)
            self._named = None
        finally:
            self.file.close()
            if self._named is not None:
                try:
                    os.unlink(self._named)
                except OSError:
                    pass


def parse_spec(spec: str) -> tuple[str, float, float | None]:
    """FILE[:UNET[:TE]] -> (file, unet, te); a path that exists as written wins."""
    if os.path.exists(spec):
        return spec, 1.0, None
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise LohaError(f"--loha {spec!r}: no file name")
    return path, (numbers[0] if numbers else 1.0), (numbers[1] if len(numbers) > 1 else None)


def uses_from_specs(specs: Iterable[str]) -> list[Use]:
    """`Use`s from FILE[:UNET[:TE]] strings (loads each network lazily)."""
    from .format import load

    return [Use(load(path), unet, te) for path, unet, te in map(parse_spec, specs)]
