"""A small adapter weights file read once: its bytes, its tensors as views over them, its sha256.

The scorer keys a row by the bytes it scored and the merge records the sha256 of the bytes it merged, so hashing,
the finiteness check, the slot load and the merge all share one read. The header is checked by
`engine.core.adapter.header_entries`, the adapter module's own parser; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.adapter import DTYPE_BYTES, header_entries

PRELOAD_MAX_BYTES = 32 << 20  # weights files up to this size are read whole, once (read_weights)
TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                     "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class LoadedWeights:
    tensors: dict[str, Any]
    sha256: str


def read_whole(path: str | Path, max_bytes: int = PRELOAD_MAX_BYTES) -> bytearray | None:
    """A file's bytes in one read into a writable buffer (what `tensors_from_bytes` views), or None when it is
    larger than `max_bytes` (read such files tensor by tensor, so memory stays bounded)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            return None
        data = bytearray(size)
        if fh.readinto(data) != size:
            raise ValueError(f"{path} changed size while it was read")
        return data


def tensors_from_bytes(data: bytearray) -> dict[str, Any]:
    """Every tensor of a safetensors file held in `data`, as views into it: no copy, where safetensors' own
    `load(bytes)` copies each tensor out of the buffer. The header gets `header_entries`' checks (dtypes known,
    every tensor exactly inside the data). A file laid out so that a tensor is not aligned to its element size,
    or a big-endian host, goes through safetensors' copying loader instead."""
    import sys

    import torch

    (length,) = struct.unpack_from("<Q", data) if len(data) >= 8 else (None,)
    if length is None or length > len(data) - 8:
        raise ValueError("file too short to be safetensors")
    base = 8 + length
    views = {}
    for key, info, offset in header_entries(bytes(memoryview(data)[8:base]), len(data) - base):
        dtype = getattr(torch, TORCH_DTYPE_NAMES[info.dtype])
        start = base + offset
        count = math.prod(info.shape)
        if sys.byteorder != "little" or start % DTYPE_BYTES[info.dtype]:
            from safetensors.torch import load

            return load(bytes(data))
        views[key] = (torch.frombuffer(data, dtype=dtype, count=count, offset=start) if count
                      else torch.empty(0, dtype=dtype)).view(info.shape)
    return views


def read_weights(path: str | Path, max_bytes: int = PRELOAD_MAX_BYTES) -> LoadedWeights | None:
    """A small weights file read once: its sha256 and its tensors come from the same bytes, so the content a score
    is keyed by is exactly the content scored, and hashing, the finiteness check and the slot load share one read
    (the tensors are views into those bytes, never copied out). None for a larger file (hashed by mmap and loaded
    tensor by tensor, so memory stays bounded) or one that does not parse (validation names what is wrong with it)."""
    try:
        data = read_whole(path, max_bytes)
        if data is None:
            return None
        return LoadedWeights(tensors_from_bytes(data), hashlib.sha256(data).hexdigest())
    except Exception:  # noqa: BLE001 - unreadable or corrupt: the per-tensor path reports it by name
        return None
