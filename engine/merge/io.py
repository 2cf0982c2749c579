"""Merge I/O: read one donor file at a time, stream the output safetensors, publish the adapter atomically.

The writer lays out the safetensors header up front (every output shape is known before the first donor is
read), so merged modules go to disk as soon as they are final and the output never has to sit in memory whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
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
               staging: Float32Staging | None) -> Iterator[Callable[[Sequence[str]], list[torch.Tensor]]]:
    """A lazy reader on one donor's safetensors: `read(keys)` maps just those tensors in (as float32 with `staging`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weight_file), framework="pt") as handle:
            if staging is None:
                yield lambda keys: [handle.get_tensor(key) for key in keys]
            else:
                yield lambda keys: staging.cast(keys, [handle.get_tensor(key) for key in keys])
    except SafetensorError as exc:
        raise DonorError(name, f"cannot read {weight_file} ({exc})") from None


class DonorReads:
    """How a merge reads its donors' weight files and gets the digests merge_info.json records.

    A merge that reads every file once (one module group, one pass) and whose files are small reads each one whole:
    the digest is of the very bytes merged, hashed in a thread beside the merge, and each file is read once, where
    hashing apart read it twice (a sha256 costs more than the read). Otherwise tensors are mapped in by key, once
    per group and pass, and DonorHasher hashes the files beside the merge.

    `float32`: the method wants float32 factors (staged by Float32Staging); `linear` adds bf16 factors into its
    float32 state directly, which rounds the same and skips a copy of every donor.
    """

    def __init__(self, paths: Sequence[Path], whole: bool, float32: bool = True):
        from engine.core.weights import PRELOAD_MAX_BYTES

        self.paths = [Path(p) for p in paths]
        self.whole = whole and all(os.path.getsize(p) <= PRELOAD_MAX_BYTES for p in self.paths)
        self.staging = Float32Staging() if float32 else None
        self.digests: dict[Path, str] = {}
        self.hasher = None if self.whole else DonorHasher(self.paths)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="merge-sha256") if self.whole else None
        self.pending: Future | None = None

    def _cast(self, keys: Sequence[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.staging.cast(keys, tensors) if self.staging is not None else tensors

    @contextlib.contextmanager
    def open(self, name: str, weight_file: Path) -> Iterator[Callable[[Sequence[str]], list[torch.Tensor]]]:
        """`read(keys)`: those tensors of one donor (float32 when the method asks)."""
        tensors = self._read_whole(Path(weight_file)) if self.whole and Path(weight_file) not in self.digests else None
        if tensors is None:  # lazy reads, or a file that does not parse: the per-key reader names what is wrong
            with open_donor(name, weight_file, self.staging) as read:
                yield read
            return
        try:
            yield lambda keys: self._cast(keys, [tensors[key] for key in keys])
        except KeyError as exc:
            raise DonorError(name, f"{weight_file} has no tensor {exc}") from None

    def _read_whole(self, path: Path) -> dict[str, torch.Tensor] | None:
        """The file's tensors from one read; its bytes are hashed in a thread while the merge adds them (hashlib
        releases the GIL). At most two donors' bytes are alive: the previous hash is awaited before the next starts."""
        from engine.core.weights import read_whole, tensors_from_bytes

        try:
            data = read_whole(path)
            tensors = tensors_from_bytes(data)
        except Exception:  # noqa: BLE001 - corrupt: the per-key reader raises the donor's own error
            return None
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(lambda: self.digests.__setitem__(path, hashlib.sha256(data).hexdigest()))
        self.digests.setdefault(path, "")  # read: a second pass over this file (a retry) reads it by key
        return tensors

    def result(self) -> list[str]:
        """Each file's sha256, in the order given."""
        if self.hasher is not None:
            return self.hasher.result()
        if self.pending is not None:
            self.pending.result()
        return [self.digests.get(p) or sha256_file(p) for p in self.paths]

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.__exit__()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


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
    """Writes tensors in a fixed, pre-declared order into a valid safetensors file, one at a time.

    The file's sha256 (what `close` returns: merge_info.json's `adapter_sha256`) is computed from the bytes as they
    are written, so the output is never read back. Durability is the caller's: the merge writes inside
    `atomic_output_dir`, whose publish fsyncs every file once before the rename.
    """

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
        self.hash = hashlib.sha256()
        self._write(struct.pack("<Q", len(blob)))
        self._write(blob)

    def _write(self, data: bytes | memoryview) -> None:
        self.hash.update(data)
        self.file.write(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected_key, expected_shape = self.pending.pop()
        if key != expected_key or tuple(tensor.shape) != tuple(expected_shape):
            raise RuntimeError(f"writer expected {expected_key} {expected_shape}, got {key} {tuple(tensor.shape)}")
        data = tensor.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
        self._write(data.numpy().data)

    def close(self) -> str:
        """Closes the file and returns its sha256."""
        if self.pending:
            raise RuntimeError(f"writer closed with {len(self.pending)} tensors unwritten")
        self.file.close()
        return self.hash.hexdigest()

    def abort(self) -> None:
        self.file.close()


def write_json(path: Path, payload: object) -> None:
    """A JSON file inside the merge's atomic folder (its publish fsyncs it)."""
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`engine.core.atomic.atomic_dir`, with the merge's own error when `target` exists and `overwrite` is off.

    A hard kill leaves only a hidden `.NAME.tmp-PID-*` folder, which the next merge to the same target removes.
    """
    if Path(target).exists() and not overwrite:
        raise ConfigError(f"out: {target} already exists (pass --overwrite to replace it)")
    with atomic_dir(target) as tmp:
        yield tmp

