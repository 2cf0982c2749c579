"""Merge I/O: read one donor file at a time, stream the output safetensors, publish the adapter atomically.

The writer lays out the safetensors header up front (every output shape is known before the first donor is
read), so merged modules go to disk as soon as they are final and the output never has to sit in memory whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import secrets
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engine.errors import ConfigError

SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


@contextlib.contextmanager
def open_donor(weight_file: str | Path) -> Iterator:
    """A lazy handle on one donor's safetensors: tensors are read (by mmap) only when asked for."""
    from safetensors import safe_open

    with safe_open(str(weight_file), framework="pt") as handle:
        yield handle


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class SafetensorsStreamWriter:
    """Writes tensors in a fixed, pre-declared order into a valid safetensors file, one at a time."""

    def __init__(self, path: str | Path, layout: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 metadata: dict[str, str] | None = None):
        self.dtype = dtype
        self.pending = list(reversed(layout))
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
        for key, shape in layout:
            nbytes = itemsize * _numel(shape)
            header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected_key, expected_shape = self.pending.pop()
        if key != expected_key or tuple(tensor.shape) != tuple(expected_shape):
            raise RuntimeError(f"writer expected {expected_key} {expected_shape}, got {key} {tuple(tensor.shape)}")
        data = tensor.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
        self.file.write(data.numpy().data)

    def close(self) -> None:
        if self.pending:
            raise RuntimeError(f"writer closed with {len(self.pending)} tensors unwritten")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def write_json(path: Path, payload: object) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(payload, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(target: Path) -> None:
    """Temp folders left by a merge that was killed (e.g. SIGKILL) beside the same target."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; rename it into place only if the block finishes.

    An exception removes the temp folder; a hard kill leaves only a hidden `.NAME.tmp-PID-*` folder, which the
    next merge to the same target removes. Either way `target` is never a half-written adapter.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConfigError(f"out: {target} already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(target)
    tmp = _make_temp_dir(target)
    try:
        yield tmp
        if target.exists():
            old = _make_temp_dir(target)
            os.rename(target, old / "replaced")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_temp_dir(target: Path) -> Path:
    """Like mkdtemp, but with the umask's permissions, since the folder becomes the user's adapter."""
    while True:
        candidate = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
