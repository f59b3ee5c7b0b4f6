"""Model checkpoints as the merge and the trainer read them: shapes first, then one tensor at a time.

A safetensors checkpoint is streamed (`safetensors_io.Reader`: the header up front, each
tensor read alone when asked for). A pickled ``.ckpt``/``.pt`` is read only through
``torch.load(weights_only=True)``, so no code in it runs; it is loaded whole
(memory-mapped where its format allows), and its non-tensor entries are listed in
`dropped`.
"""

from __future__ import annotations

import os

import torch

from ..errors import FormatError
from .safetensors_io import Reader, open_regular, torch_dtype

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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
        os.close(open_regular(path))  # a FIFO or device would block torch.load forever
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


def open_checkpoint(path: str | os.PathLike):
    """A checkpoint as shapes + metadata + one tensor at a time (safetensors or a pickle).

    The result has `shapes()`, `layout()` ({key: (dtype, shape)}), `read(key)`, `metadata`,
    `dropped`, `streamed` and `close()`.
    """
    path = os.fspath(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        return _PickleCheckpoint(path)
    return _SafetensorsCheckpoint(path)


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes of a checkpoint's tensors; for safetensors only its header is read."""
    source = open_checkpoint(path)
    try:
        return source.shapes()
    finally:
        source.close()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor, metadata) of a checkpoint, read whole."""
    source = open_checkpoint(path)
    try:
        return {key: source.read(key) for key in source.shapes()}, dict(source.metadata)
    finally:
        source.close()
