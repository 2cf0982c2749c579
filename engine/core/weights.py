"""A small adapter weights file read once: its bytes, its tensors as views over them, its sha256.

The scorer keys a row by the bytes it scored and the merge records the sha256 of the bytes it merged, so hashing,
the finiteness check, the slot load and the merge all share one read. The header is checked by
`engine.core.adapter.header_entries`, the adapter module's own parser; nothing is ever unpickled.
"""
from __future__ import annotations

import functools
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
    flat: Any = None  # every tensor's elements as one view, when they are of one dtype and tile the data


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


@dataclass(frozen=True)
class _ViewPlan:
    """How to view one header's tensors in the file: (key, torch dtype, shape, byte start, element count) each, and
    the dtype of the whole data region when its tensors are of one dtype and tile it back to back (else None)."""

    entries: tuple[tuple[str, Any, tuple[int, ...], int, int], ...]
    copy: bool  # a tensor not aligned to its element size, or a big-endian host: safetensors' copying loader
    uniform: Any


@functools.lru_cache(maxsize=64)
def _view_plan(header: bytes, data_size: int) -> _ViewPlan:
    """`header_entries`' checks and the views' layout, parsed once per distinct header: a pool's donors of one shape
    share their header bytes exactly, and its JSON parse was a third of reading a small donor. The key is the header
    and the data's size, all that the plan depends on."""
    import sys

    import torch

    parsed = header_entries(header, data_size)
    copy = sys.byteorder != "little" or any((8 + len(header) + offset) % DTYPE_BYTES[info.dtype]
                                            for _, info, offset in parsed)
    entries = tuple((key, getattr(torch, TORCH_DTYPE_NAMES[info.dtype]), info.shape, offset, math.prod(info.shape))
                    for key, info, offset in parsed)
    end = 0
    for _, info, offset in sorted(parsed, key=lambda e: e[2]):  # do the tensors tile the data, back to back?
        end = offset + math.prod(info.shape) * DTYPE_BYTES[info.dtype] if offset == end else -1
    tiled = bool(parsed) and end == data_size and len({info.dtype for _, info, _ in parsed}) == 1
    return _ViewPlan(entries, copy, entries[0][1] if tiled and not copy else None)


def tensors_from_bytes(data: bytearray) -> dict[str, Any]:
    """Every tensor of a safetensors file held in `data`, as views into it: no copy, where safetensors' own
    `load(bytes)` copies each tensor out of the buffer. The header gets `header_entries`' checks (dtypes known,
    every tensor exactly inside the data). A file laid out so that a tensor is not aligned to its element size,
    or a big-endian host, goes through safetensors' copying loader instead."""
    return _views(data)[0]


def _views(data: bytearray) -> tuple[dict[str, Any], Any]:
    """`tensors_from_bytes`, and one flat view of the whole data region when its tensors are of one dtype and tile
    it (what `check_finite_weights` checks in one pass), else None."""
    import torch

    (length,) = struct.unpack_from("<Q", data) if len(data) >= 8 else (None,)
    if length is None or length > len(data) - 8:
        raise ValueError("file too short to be safetensors")
    base = 8 + length
    plan = _view_plan(bytes(memoryview(data)[8:base]), len(data) - base)
    if plan.copy:
        from safetensors.torch import load

        return load(bytes(data)), None
    views = {key: (torch.frombuffer(data, dtype=dtype, count=count, offset=base + offset) if count
                   else torch.empty(0, dtype=dtype)).view(shape)
             for key, dtype, shape, offset, count in plan.entries}
    flat = None
    if plan.uniform is not None and len(data) > base:
        flat = torch.frombuffer(data, dtype=plan.uniform, offset=base)
    return views, flat


def read_weights(path: str | Path, max_bytes: int = PRELOAD_MAX_BYTES) -> LoadedWeights | None:
    """A small weights file read once: its sha256 and its tensors come from the same bytes, so the content a score
    is keyed by is exactly the content scored, and hashing, the finiteness check and the slot load share one read
    (the tensors are views into those bytes, never copied out). None for a larger file (hashed by mmap and loaded
    tensor by tensor, so memory stays bounded) or one that does not parse (validation names what is wrong with it)."""
    try:
        data = read_whole(path, max_bytes)
        if data is None:
            return None
        tensors, flat = _views(data)
        return LoadedWeights(tensors, hashlib.sha256(data).hexdigest(), flat)
    except Exception:  # noqa: BLE001 - unreadable or corrupt: the per-tensor path reports it by name
        return None
