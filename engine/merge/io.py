"""Merge I/O: read one donor file at a time, stream the output safetensors, publish the adapter atomically.

The writer lays out the safetensors header up front (every output shape is known before the first donor is
read), so merged modules go to disk as soon as they are final and the output never has to sit in memory whole.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from engine.core.atomic import atomic_dir
from engine.core.errors import ConfigError, DonorError
from engine.core.adapter import sha256_file

HELPER_MIN_BYTES = 64 << 20
SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class Float32Staging:
    """Reusable float32 buffers, one per tensor key, that each donor's factors are cast into with one call.

    LoRA factors are small, so a merge of many donors pays per-call overhead rather than bandwidth; one
    `_foreach_copy_` per donor replaces a cast per tensor. The buffers are overwritten by the next donor.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.lists: dict[tuple[str, ...], list[torch.Tensor]] = {}

    def cast(self, keys: Sequence[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if all(t.dtype == torch.float32 for t in tensors):
            return tensors
        staged = self.lists.get(tuple(keys))
        if staged is not None and all(b.shape == t.shape for b, t in zip(staged, tensors)):
            torch._foreach_copy_(staged, tensors)
            return staged
        staged = self.lists[tuple(keys)] = []
        for key, tensor in zip(keys, tensors):
            buffer = self.buffers.get(key)
            if buffer is None or buffer.shape != tensor.shape:
                buffer = self.buffers[key] = torch.empty(tensor.shape, dtype=torch.float32)
            staged.append(buffer)
        torch._foreach_copy_(staged, tensors)
        return staged


@contextlib.contextmanager
def open_donor(name: str, weight_file: str | Path,
               staging: Float32Staging) -> Iterator[Callable[[Sequence[str]], list[torch.Tensor]]]:
    """A lazy reader on one donor's safetensors: `read(keys)` maps just those tensors in, as float32."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weight_file), framework="pt") as handle:
            yield lambda keys: staging.cast(keys, [handle.get_tensor(key) for key in keys])
    except SafetensorError as exc:
        raise DonorError(name, f"cannot read {weight_file} ({exc})") from None


class DonorHasher:
    """Hashes the donor files in a helper process (engine/merge/digest.py) while the merge runs.

    If the helper cannot run, the digests are computed here instead: slower, never missing.
    """

    def __init__(self, paths: Sequence[Path], helper_min_bytes: int = HELPER_MIN_BYTES):
        self.paths = [str(p) for p in paths]
        self.process: subprocess.Popen | None = None
        if sum(os.path.getsize(p) for p in self.paths) < helper_min_bytes:
            return  # starting a process would cost more than hashing here
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "engine.merge.digest"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.process.stdin.write(json.dumps(self.paths).encode())
            self.process.stdin.close()
        except OSError:  # no helper (or it died at once): hash in-process at result()
            self.__exit__()
            self.process = None

    def result(self) -> list[str]:
        if self.process is not None:
            output = self.process.stdout.read()
            if self.process.wait() == 0:
                with contextlib.suppress(ValueError):
                    digests = json.loads(output)
                    if isinstance(digests, list) and len(digests) == len(self.paths):
                        return digests
        return [sha256_file(p) for p in self.paths]

    def __enter__(self) -> "DonorHasher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()


class SafetensorsStreamWriter:
    """Writes tensors in a fixed, pre-declared order into a valid safetensors file, one at a time."""

    def __init__(self, path: str | Path, layout: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 metadata: dict[str, str] | None = None):
        self.dtype = dtype
        self.pending = list(reversed(layout))
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
        for key, shape in layout:
            nbytes = itemsize * math.prod(shape)
            header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
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


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`engine.core.atomic.atomic_dir`, with the merge's own error when `target` exists and `overwrite` is off.

    A hard kill leaves only a hidden `.NAME.tmp-PID-*` folder, which the next merge to the same target removes.
    """
    if Path(target).exists() and not overwrite:
        raise ConfigError(f"out: {target} already exists (pass --overwrite to replace it)")
    with atomic_dir(target) as tmp:
        yield tmp

