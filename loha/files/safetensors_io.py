"""safetensors files: checked, read one tensor at a time, written as a stream, atomically, hashed.

The one place that knows the format. Everything loha reads or writes goes through it:
networks (`network.load`), checkpoints (`checkpoint.open_checkpoint`), merges, converted
and trained networks, checkpoints written from diffusers parts.

- `check_header` refuses what is not a plausible safetensors file (FIFOs and other
  non-files, pickles, truncated files, headers claiming more bytes than the file or
  any model needs) before any parser sees it.
- `Reader` parses the header, checking every field, and reads one tensor's bytes with
  a plain file read: nothing is memory-mapped, so a merge never maps the whole
  checkpoint and a file truncated on disk is an error, not a SIGBUS (`read_all` reads
  every tensor). Networks keep only the parsed header between reads.
- `Writer` writes the header first (every shape and dtype is known up front) and then
  appends each tensor's bytes as it comes: `safetensors.torch.save_file` would need
  every tensor in memory at once.
- `AtomicFile` / `write_streamed` / `save`: output appears under its name only when
  complete (an unnamed O_TMPFILE on Linux, else a hidden `.NAME.PID.*.part` beside
  it), and without `overwrite` never over a file another writer finished first.
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

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Mapping

import torch

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


def open_regular(path: str) -> int:
    """A read-only descriptor of `path`, which must be a regular file.

    Opened non-blocking and checked with fstat, so a FIFO, a device or a folder is
    refused at once instead of blocking a read forever.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{path}: not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def check_header(path: str, fd: int | None = None) -> int:
    """Refuse what is not a plausible safetensors file; returns the header's length.

    Catches empty and truncated files, pickles (.ckpt/.pt renamed), and headers that
    claim more bytes than the file has or than any model needs, without reading them.
    """
    own = fd is None
    fd = open_regular(path) if own else fd
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 9, 0) if hasattr(os, "pread") else _read_at(fd, 9, 0)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        if own:
            os.close(fd)
    # A header of 640, 896, 1152 or 1408 bytes has a length that starts like a pickle (0x80 0x02…);
    # its JSON starts with "{" right after the length, where a pickle holds its opcodes.
    if any(head.startswith(magic) for magic in _PICKLE_MAGIC) and head[8:9] != b"{":
        raise FormatError(f"{path}: is a pickle (.ckpt/.pt), not safetensors; pickles are never loaded")
    if size < 8:
        raise FormatError(f"{path}: {size} bytes, too short for a safetensors file")
    claimed = int.from_bytes(head[:8], "little")
    if claimed > size - 8 or claimed > MAX_HEADER_BYTES:
        raise FormatError(
            f"{path}: header claims {claimed} bytes but the file has {size - 8} after the length "
            f"(limit {MAX_HEADER_BYTES}); truncated or not safetensors"
        )
    return claimed


def _read_at(fd: int, n: int, offset: int) -> bytes:
    """`os.pread` where the platform has none (Windows): seek and read."""
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


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


def _identity(st: os.stat_result) -> tuple:
    """What tells a file's current content apart from what it held: inode, size, mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _count(value) -> bool:
    """A JSON number that is a count (shape dimension, byte offset): int, not bool, >= 0."""
    return type(value) is int and value >= 0


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class Reader:
    """A safetensors file's header, and its tensors read one at a time (plain reads, no mmap).

    Every header field is checked before use (types, counts, offsets inside the file,
    text that is valid Unicode), so whatever the bytes only `FormatError` escapes. The
    file is pinned by what `fstat` says when it is opened (inode, size, mtime): a read
    after it changed on disk (truncated, rewritten) is refused instead of returning
    bytes the header no longer describes (a memory map would die with SIGBUS there).

    `keep_open=False` closes the file after the header and opens it again for each read
    (networks: nothing stays open between patches, and a file replaced on disk is
    noticed rather than read through the old header).
    """

    def __init__(self, path: str | os.PathLike, *, keep_open: bool = True):
        self.path = os.fspath(path)
        fd = open_regular(self.path)
        try:
            length = check_header(self.path, fd)
            self._identity = _identity(os.fstat(fd))
            self._parse(fd, length)
        except BaseException:
            os.close(fd)
            raise
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        if keep_open:
            self._file = os.fdopen(fd, "rb", buffering=0)
        else:
            os.close(fd)

    def _parse(self, fd: int, length: int) -> None:
        size = os.fstat(fd).st_size
        raw = _read_exactly(fd, 8, length, self.path)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._unreadable(f"header is not JSON: {_clip(str(exc))}") from None
        if not isinstance(header, dict):
            raise self._unreadable("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._unreadable("__metadata__ must map strings to strings")
        for key, value in meta.items():
            self._check_text(key, "a metadata key")
            self._check_text(value, f"metadata '{_clip(key)}'")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + length
        self.entries: dict[str, Entry] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for key, info in header.items():
            self._check_text(key, "a tensor name")
            entry, begin, end = self._entry(key, info)
            if end - begin != entry.nbytes or self.data_start + end > size:
                raise FormatError(
                    f"{self.path}: '{_clip(key)}' ({entry.dtype} {entry.shape}) claims bytes [{begin}, {end}) "
                    f"of a {size - self.data_start}-byte data section"
                )
            self.entries[key] = entry
            self._offsets[key] = (begin, end)

    def _entry(self, key: str, info) -> tuple[Entry, int, int]:
        """One header entry, checked field by field."""
        def malformed(why: str) -> FormatError:
            return self._unreadable(f"header entry '{_clip(key)}' {why}: {_clip(repr(info))}")

        if not isinstance(info, dict):
            raise malformed("is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise malformed("has no dtype name")
        if dtype not in DTYPES:
            raise FormatError(f"{self.path}: '{_clip(key)}' has dtype {_clip(dtype)!r}, which this torch build "
                              "does not read")
        if not isinstance(shape, list) or not all(map(_count, shape)):
            raise malformed("has a shape that is not a list of counts")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1]):
            raise malformed("has data_offsets that are not two increasing counts")
        return Entry(key, dtype, tuple(shape)), offsets[0], offsets[1]

    def _check_text(self, text: str, what: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = _clip(text.encode("utf-8", "backslashreplace").decode())
            raise self._unreadable(f"{what} is not valid Unicode text: {shown}") from None

    def _unreadable(self, why: str) -> FormatError:
        return FormatError(f"{self.path}: not a readable safetensors file ({why})")

    def keys(self) -> list[str]:
        """Keys in the order of their data in the file."""
        return sorted(self.entries, key=lambda k: self._offsets[k])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def check_unchanged(self, fd: int) -> None:
        """Refuse to read a file that changed since its header was read."""
        now = _identity(os.fstat(fd))
        if now != self._identity:
            was = f"{self._identity[2]} bytes" if now[:2] == self._identity[:2] else "another file"
            raise FormatError(f"{self.path}: changed on disk since it was read (now {now[2]} bytes, was {was}); "
                              "load it again")

    @contextlib.contextmanager
    def opened(self):
        """Keep the file open for several reads (a no-op when it is kept open anyway)."""
        if self._file is not None:
            yield self
            return
        fd = open_regular(self.path)
        self._file = os.fdopen(fd, "rb", buffering=0)
        try:
            yield self
        finally:
            file, self._file = self._file, None
            file.close()

    def read(self, key: str) -> torch.Tensor:
        """One tensor, freshly allocated (the caller owns it and may write to it)."""
        if self._file is None:
            with self.opened():
                return self.read(key)
        entry = self.entries[key]
        begin, end = self._offsets[key]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with self._lock:
            self.check_unchanged(self._file.fileno())
            if raw.numel():
                _fill(self._file, self.data_start + begin, memoryview(raw.numpy()), self.path, key)
        return raw.view(torch_dtype(entry.dtype)).reshape(entry.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_exactly(fd: int, offset: int, n: int, path: str) -> bytes:
    chunks, done = [], 0
    while done < n:
        chunk = os.pread(fd, n - done, offset + done) if hasattr(os, "pread") else _read_at(fd, n - done, offset + done)
        if not chunk:
            raise FormatError(f"{path}: cut short ({done} of {n} header bytes)")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _fill(file: BinaryIO, offset: int, buffer: memoryview, path: str, key: str) -> None:
    """Read exactly len(buffer) bytes at `offset` (large reads can come back in parts)."""
    file.seek(offset)
    done = 0
    while done < len(buffer):
        got = file.readinto(buffer[done:])
        if not got:
            raise FormatError(f"{path}: '{_clip(key)}' is cut short ({done} of {len(buffer)} bytes)")
        done += got


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
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: JSON can escape it, no reader accepts it
        raise FormatError(f"metadata or a tensor name is not valid Unicode text ({exc.reason} at "
                          f"{_clip(repr(exc.object[max(0, exc.start - 40):exc.end + 40]))})") from None
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
                   written: Callable[[Entry], None] | None = None, overwrite: bool = True) -> None:
    """Write `tensor_of(key)` for every entry (in data order) into `path`, atomically.

    `prefetch`: make the next tensor on a worker thread while the current one is
    written (both release the GIL; two tensors at most are alive). `written(entry)` is
    called after each tensor (progress bars). `overwrite=False`: the file gets its name
    only if nothing has it by then (two writers racing for one name: the second fails).
    A full disk or a folder we may not write to is a `LohaError` naming the output.
    """
    path = os.fspath(path)
    try:
        with AtomicFile(path, overwrite) as f, ThreadPoolExecutor(1) as worker:
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
    except OSError as exc:
        raise LohaError(f"{path}: cannot write ({exc.strerror or exc}); nothing was written") from None


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
         written: Callable[[Entry], None] | None = None, overwrite: bool = True) -> None:
    """Write a dict of tensors (atomically; same layout as `Writer`; `written` and `overwrite` as there)."""
    entries = data_order(entry_of(k, t) for k, t in tensors.items())
    write_streamed(path, entries, metadata, tensors.__getitem__, written=written, overwrite=overwrite)


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


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (always True where that cannot be asked safely)."""
    if os.name == "nt":  # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class AtomicFile:
    """A file that appears at `path` only when the `with` block completes.

    On Linux it is an O_TMPFILE (no name until linked, so even a killed process leaves
    nothing behind); elsewhere a hidden `.NAME.PID.*.part` beside `path`, removed on
    any error or interrupt (SIGTERM included, through the CLI's handler).

    Without `overwrite` the file is linked straight to `path`, which fails if anything
    took the name meanwhile: two writers of one name never silently replace each other.
    With it, the file is first named `.NAME.PID.*.part` and renamed over `path`; a
    process killed between the two leaves that name behind, and the next write to
    `path` removes such leftovers of processes that no longer run.
    """

    def __init__(self, path: str, overwrite: bool = True):
        self.path = path
        self.overwrite = overwrite
        self.folder = os.path.dirname(os.path.abspath(path))
        self._named: str | None = None

    @property
    def _part_prefix(self) -> str:
        return f".{os.path.basename(self.path)}.{os.getpid()}."

    def _remove_leftovers(self) -> None:
        """Delete `.NAME.PID.*.part` files whose writer no longer runs."""
        pattern = re.compile(rf"\.{re.escape(os.path.basename(self.path))}\.(\d+)\.[^.]+\.part")
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            match = pattern.fullmatch(name)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

    def __enter__(self):
        mode = 0o666 & ~_umask()
        self._remove_leftovers()
        if tmpfile_works(self.folder):
            fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY, mode)
        else:
            fd, self._named = tempfile.mkstemp(dir=self.folder, prefix=self._part_prefix, suffix=".part")
            os.chmod(self._named, mode)
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        return self.file

    def _link(self) -> str:
        """Name the unnamed file beside `path` (os.replace needs a name)."""
        for _ in range(100):
            name = os.path.join(self.folder, f"{self._part_prefix}{os.urandom(6).hex()}.part")
            try:
                _link_fd(self.file.fileno(), name)
                return name
            except FileExistsError:
                continue
        raise LohaError(f"{self.folder}: cannot name the temporary output file")

    def _publish_new(self) -> None:
        """Name the file `path` only if no file has that name (atomically, by a hard link)."""
        try:
            if self._named is None:
                _link_fd(self.file.fileno(), self.path)
                return
            try:
                os.link(self._named, self.path)  # the finally block removes the temporary name
            except FileExistsError:
                raise
            except OSError:  # no hard links here (FAT, some network shares): rename, checked first
                if os.path.exists(self.path):
                    raise FileExistsError(self.path) from None
                os.rename(self._named, self.path)  # Windows' rename refuses an existing target itself
                self._named = None
        except FileExistsError:
            raise LohaError(f"{self.path}: already exists (written by someone else meanwhile); nothing was "
                            "replaced", option="overwrite") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                return
            self.file.flush()
            os.fsync(self.file.fileno())
            if not self.overwrite:
                self._publish_new()
                return
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
