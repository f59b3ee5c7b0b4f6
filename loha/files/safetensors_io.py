"""safetensors files: checked, read one tensor at a time, written as a stream, atomically, hashed.

The one place that knows the format. Everything loha reads or writes goes through it:
networks (`network.load`), checkpoints (`checkpoint.open_checkpoint`), merges, converted
and trained networks, checkpoints written from diffusers parts.

- `check_header` refuses what is not a plausible safetensors file (pickles, truncated
  files, headers claiming more bytes than the file or any model needs) before any
  parser sees it.
- `Reader` parses the header and reads one tensor's bytes with a plain file read:
  a merge never maps the whole checkpoint into the process (`read_all` reads every
  tensor). `open_mapped` opens a network file through the reference library's memory
  map, so a patch reads only the tensors it uses.
- `Writer` writes the header first (every shape and dtype is known up front) and then
  appends each tensor's bytes as it comes: `safetensors.torch.save_file` would need
  every tensor in memory at once.
- `AtomicFile` / `write_streamed` / `save`: output appears under its name only when
  complete (an unnamed O_TMPFILE on Linux, else a hidden `.NAME.*.part` beside it).
- `file_hashes` / `model_hash`: the hashes the WebUI and kohya show.

The layout is the reference one, byte for byte: 8-byte little-endian header length, a
compact JSON header ("__metadata__" first, then the tensors in data order) padded with
spaces to a multiple of 8 bytes, then the data. (Metadata keys are sorted here; the
reference writes them in hash order, which varies per process.) Tensors are ordered as
the reference writer orders them (widest dtype first, then by name), so every tensor's
data is aligned to its element size, and kohya's data hash of a file we write equals
the hash of the same tensors written by the reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from ..errors import FormatError, LohaError

# --------------------------------------------------------------------------- dtypes

#: safetensors dtype name -> torch dtype (those this torch build has).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: The float dtypes network factors may have.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# The reference writer's dtype order (its enum order); data is sorted widest first.
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
          "I32", "U32", "F32", "F64", "I64", "U64")

#: The names users choose an output dtype by (CLI, UI, trainer).
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """"F16", "BF16", … for a torch dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FormatError(f"cannot write tensors of dtype {dtype} to safetensors") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise FormatError(f"safetensors dtype {name!r} is not supported by this torch build") from None


def dtype_of_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype for "fp16"/"bf16"/"fp32" (a torch dtype or None passes through)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise LohaError(f"unknown dtype {name!r} (choose from {', '.join(DTYPE_NAMES)})") from None


# --------------------------------------------------------------------------- checking


#: Any header larger than this is refused unread (a 23 GB checkpoint's is well under 1 MB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_header(path: str) -> int:
    """Refuse what is not a plausible safetensors file; returns the header's length.

    Catches empty and truncated files, pickles (.ckpt/.pt renamed), and headers that
    claim more bytes than the file has or than any model needs, without reading them.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror})") from None
    if any(head.startswith(magic) for magic in _PICKLE_MAGIC):
        raise FormatError(f"{path}: is a pickle (.ckpt/.pt), not safetensors; pickles are never loaded")
    if size < 8:
        raise FormatError(f"{path}: {size} bytes, too short for a safetensors file")
    claimed = int.from_bytes(head, "little")
    if claimed > size - 8 or claimed > MAX_HEADER_BYTES:
        raise FormatError(
            f"{path}: header claims {claimed} bytes but the file has {size - 8} after the length "
            f"(limit {MAX_HEADER_BYTES}); truncated or not safetensors"
        )
    return claimed


def open_mapped(path: str):
    """A checked file opened by the reference library (memory-mapped, tensors on request)."""
    check_header(path)
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own types for bad headers
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Entry:
    """One tensor as a header describes it."""

    key: str
    dtype: str  # safetensors name, "F16" …
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch_dtype(self.dtype).itemsize


def entry_of(key: str, tensor: torch.Tensor) -> Entry:
    return Entry(key, dtype_name(tensor.dtype), tuple(tensor.shape))


def data_order(entries: Iterable[Entry]) -> list[Entry]:
    """Entries in the reference writer's order: widest dtype first, then by key."""
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(entries, key=lambda e: (-rank.get(e.dtype, torch_dtype(e.dtype).itemsize), e.key))


class Reader:
    """A safetensors file's header, and its tensors read one at a time (no mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        length = check_header(self.path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            self._parse(length)
        except BaseException:
            self._file.close()
            raise

    def _parse(self, length: int) -> None:
        size = os.fstat(self._file.fileno()).st_size
        self._file.seek(8)
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{self.path}: unreadable safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + length
        self.entries: dict[str, Entry] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for key, info in header.items():
            try:
                entry = Entry(key, info["dtype"], tuple(int(d) for d in info["shape"]))
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{self.path}: malformed header entry for '{key}': {info!r}") from None
            torch_dtype(entry.dtype)
            if end - begin != entry.nbytes or begin < 0 or self.data_start + end > size:
                raise FormatError(
                    f"{self.path}: '{key}' ({entry.dtype} {entry.shape}) claims bytes [{begin}, {end}) "
                    f"of a {size - self.data_start}-byte data section"
                )
            self.entries[key] = entry
            self._offsets[key] = (begin, end)

    def keys(self) -> list[str]:
        """Keys in the order of their data in the file."""
        return sorted(self.entries, key=lambda k: self._offsets[k])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def read(self, key: str) -> torch.Tensor:
        """One tensor, freshly allocated (the caller owns it and may write to it)."""
        entry = self.entries[key]
        begin, end = self._offsets[key]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if raw.numel():
            self._file.seek(self.data_start + begin)
            got = self._file.readinto(memoryview(raw.numpy()))
            if got != raw.numel():
                raise FormatError(f"{self.path}: '{key}' is cut short ({got} of {raw.numel()} bytes)")
        return raw.view(torch_dtype(entry.dtype)).reshape(entry.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_all(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor, metadata) of a file, read whole (small files; checkpoints a trainer loads)."""
    with Reader(path) as reader:
        return {key: reader.read(key) for key in reader.keys()}, dict(reader.metadata)


# --------------------------------------------------------------------------- writing


def header_bytes(entries: list[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and padded JSON header for `entries` laid out in that order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for e in entries:
        header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _data(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as the data section holds them."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


class Writer:
    """Writes a safetensors file whose tensors arrive one at a time, in `entries` order.

    The header is written at once; `write(key, tensor)` must then be called for every
    entry, in order, with a tensor of exactly the announced dtype and shape.
    """

    def __init__(self, file: BinaryIO, entries: list[Entry], metadata: Mapping[str, str] | None = None):
        self._file = file
        self._entries = entries
        self._next = 0
        file.write(header_bytes(entries, metadata))

    @property
    def done(self) -> bool:
        return self._next == len(self._entries)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._entries):
            raise FormatError(f"'{key}' written after the last announced tensor")
        entry = self._entries[self._next]
        got = entry_of(key, tensor)
        if got != entry:
            raise FormatError(f"writer expected {entry}, got {got}")
        if tensor.numel():
            self._file.write(_data(tensor))
        self._next += 1

    def close(self) -> None:
        if not self.done:
            missing = [e.key for e in self._entries[self._next :]]
            raise FormatError(f"{len(missing)} announced tensors were never written (first: '{missing[0]}')")


def write_streamed(path: str | os.PathLike, entries: list[Entry], metadata: Mapping[str, str] | None,
                   tensor_of: Callable[[str], torch.Tensor], *, prefetch: bool = False,
                   written: Callable[[Entry], None] | None = None) -> None:
    """Write `tensor_of(key)` for every entry (in data order) into `path`, atomically.

    `prefetch`: make the next tensor on a worker thread while the current one is
    written (both release the GIL; two tensors at most are alive). `written(entry)` is
    called after each tensor (progress bars).
    """
    with AtomicFile(os.fspath(path)) as f, ThreadPoolExecutor(1) as worker:
        writer = Writer(f, entries, metadata)
        pending = worker.submit(tensor_of, entries[0].key) if prefetch and entries else None
        for index, entry in enumerate(entries):
            if pending is not None:
                current = pending.result()
                pending = worker.submit(tensor_of, entries[index + 1].key) if index + 1 < len(entries) else None
            else:
                current = tensor_of(entry.key)
            writer.write(entry.key, current)
            del current
            if written is not None:
                written(entry)
        writer.close()


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
         written: Callable[[Entry], None] | None = None) -> None:
    """Write a dict of tensors (atomically; same layout as `Writer`; `written` as there)."""
    entries = data_order(entry_of(k, t) for k, t in tensors.items())
    write_streamed(path, entries, metadata, tensors.__getitem__, written=written)


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


def tmpfile_works(folder: str) -> bool:
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


def refuse_existing(out: str, overwrite: bool) -> None:
    """Outputs never replace a file unless the caller asked to (hosts name the switch)."""
    if os.path.exists(out) and not overwrite:
        raise LohaError(f"{out}: already exists; choose another name or allow replacing it", option="overwrite")


class AtomicFile:
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
        if tmpfile_works(self.folder):
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


# --------------------------------------------------------------------------- hashes


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


def model_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash` of the file `tensors` make: sha256 of its data section."""
    digest = hashlib.sha256()
    for entry in data_order(entry_of(k, t) for k, t in tensors.items()):
        if entry.nbytes:
            digest.update(_data(tensors[entry.key]))
    return digest.hexdigest()
