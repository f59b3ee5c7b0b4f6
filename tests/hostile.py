"""Helpers for the hostile-input tests: raw files, and checks that nothing changed.

A hostile file is written byte by byte (`raw_safetensors`), so a test can say exactly
what a header holds; "nothing changed" means the model's weights are bit-identical, the
input files have the same bytes, and the output folder holds what it held before.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch


def raw_safetensors(path, header, data: bytes = b"", claimed: int | None = None):
    """A file of an 8-byte length, `header` (bytes, str, or an object written as JSON) and `data`."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if claimed is None else claimed) + header + data)
    return path


def header_of(state: dict[str, torch.Tensor], metadata: dict | None = None) -> tuple[dict, bytes]:
    """The JSON header (as an object, to edit) and data section safetensors writes for `state`."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for key, tensor in state.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[key] = {"dtype": {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}[tensor.dtype],
                       "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def snapshot(parts) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def unchanged(before: dict, parts) -> bool:
    after = snapshot(parts)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def listing(folder) -> list[str]:
    """Every name in `folder`, hidden temporary files included."""
    return sorted(os.listdir(folder))
