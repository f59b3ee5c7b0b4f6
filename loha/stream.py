"""safetensors read and written one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once, and reading a
whole checkpoint through a memory map leaves every page it touched resident in the
process. A merge needs neither: `Reader` parses the header and reads one tensor's
bytes with a plain file read; `Writer` writes the header first (every shape and
dtype is known up front) and then appends each tensor's bytes as it comes.

The layout is the reference one, byte for byte: 8-byte little-endian header
length, a compact JSON header ("__metadata__" first, then the tensors in data order)
padded with spaces to a multiple of 8 bytes, then the data. (Metadata keys are
sorted here; the reference writes them in hash order, which varies per process.)
Tensors are ordered as the reference writer orders them (widest dtype first, then
by name), so every tensor's data is aligned to its element size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Mapping

import torch

from .errors import FormatError

# safetensors dtype name -> torch dtype (those this torch build has).
_DTYPES = {
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
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

# The reference writer's dtype order (its enum order); data is sorted widest first.
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
          "I32", "U32", "F32", "F64", "I64", "U64")

_MAX_HEADER = 100_000_000  # the reference reader's limit


def dtype_name(dtype: torch.dtype) -> str:
    """"F16", "BF16", … for a torch dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FormatError(f"cannot write tensors of dtype {dtype} to safetensors") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise FormatError(f"safetensors dtype {name!r} is not supported by this torch build") from None


@dataclass(frozen=True)
class Entry:
    """One tensor as a header describes it."""

    key: str
    dtype: str  # safetensors name, "F16" …
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch_dtype(self.dtype).itemsize


def data_order(entries: Iterable[Entry]) -> list[Entry]:
    """Entries in the reference writer's order: widest dtype first, then by key."""
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(entries, key=lambda e: (-rank.get(e.dtype, torch_dtype(e.dtype).itemsize), e.key))


class Reader:
    """A safetensors file's header, and its tensors read one at a time (no mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) != 8:
            raise FormatError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise FormatError(f"{self.path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{self.path}: unreadable safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
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
        got = Entry(key, dtype_name(tensor.dtype), tuple(tensor.shape))
        if got != entry:
            raise FormatError(f"writer expected {entry}, got {got}")
        if tensor.numel():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(flat.numpy()))
        self._next += 1

    def close(self) -> None:
        if not self.done:
            missing = [e.key for e in self._entries[self._next :]]
            raise FormatError(f"{len(missing)} announced tensors were never written (first: '{missing[0]}')")


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of tensors (small files: demo networks, tests); same layout as above."""
    entries = data_order(Entry(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items())
    with open(path, "wb") as f:
        writer = Writer(f, entries, metadata)
        for e in entries:
            writer.write(e.key, tensors[e.key])
        writer.close()
