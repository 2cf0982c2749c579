"""The adapter folder, and the one place that reads it: a PEFT LoRA adapter is a hostile file until proven otherwise.

Modelled on vLLM's `PEFTHelper`: every other module (validation, the merge, the LoRA slots, the vLLM backend,
finetuning, the score store's resume key) asks this module for the file names, the bounded safetensors header,
the key grammar, the config, the per-module rank and scale, and the content fingerprint. Nothing here reads
tensor data except `fingerprint` (which hashes bytes, never unpickles); `engine/core/weights.py` reads a small
weights file once, as views over a header checked here.

Per-module rank and alpha follow PEFT exactly: a module's `rank_pattern`/`alpha_pattern` entry is found with
PEFT's own `get_pattern_key` (a pattern matches a module whose dotted name ends with it), and the scale is
alpha/r, or alpha/√r with rsLoRA.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import DonorError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, *PICKLE_FILES)
MAX_HEADER_BYTES = 100 << 20
MAX_CONFIG_BYTES = 4 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FORBIDDEN_CONFIG_KEYS = ("trust_remote_code", "auto_map", "custom_code")
# <prefix>.<module>.<factor>[.<adapter name>][.weight|.bias]; some Hub uploads keep PEFT's adapter name ("default").
KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


# One reason, given alike by validation (score), the merge and `finetune --init`.
DORA_UNSUPPORTED = "DoRA adapters are not supported (their magnitude vectors do not merge as LoRA)"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LoraKey:
    """One tensor key, parsed: `kind` is lora_A, lora_B, lora_embedding_A/B or lora_magnitude_vector (DoRA)."""

    module: str
    kind: str
    param: str  # "weight" or "bias" (a LoRA bias, PEFT's lora_bias=True)

    @property
    def factor(self) -> str | None:
        """'A' or 'B' for a factor weight, None for a bias or a DoRA magnitude."""
        if self.param != "weight" or self.kind == "lora_magnitude_vector":
            return None
        return self.kind[-1]


def parse_key(key: str) -> LoraKey | None:
    """The LoRA grammar of a safetensors key, or None for a key that is not a LoRA tensor (modules_to_save…)."""
    m = KEY_RE.match(key)
    if m is None:
        return None
    return LoraKey(m["module"], m["kind"], m["param"] or "weight")


def read_header_bytes(path: str | Path) -> tuple[bytes, int]:
    """The raw JSON header and the size of the data after it; reads kilobytes, and a hostile length fails first."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ValueError("file too short to be safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header claims {length} bytes but the file has {size - 8}")
        return fh.read(length), size - 8 - length


def parse_header(raw: bytes, data_size: int) -> dict[str, TensorInfo]:
    """key → TensorInfo, after checking that every tensor has a known dtype and lies exactly inside the data."""
    return {key: info for key, info, _ in header_entries(raw, data_size)}


def header_entries(raw: bytes, data_size: int) -> list[tuple[str, TensorInfo, int]]:
    """(key, TensorInfo, start offset in the data) of every tensor, each checked to lie exactly inside the data."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {key!r} has a malformed header entry") from None
        if dtype not in DTYPE_BYTES or end - start != math.prod(shape) * DTYPE_BYTES[dtype] \
                or not 0 <= start <= end <= data_size:
            raise ValueError(f"tensor {key!r} ({dtype} {list(shape)}) does not fit the file "
                             f"(offsets {start}..{end}, data {data_size} bytes)")
        out.append((key, TensorInfo(dtype, shape), start))
    return out


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    return parse_header(*read_header_bytes(path))


@dataclass
class AdapterConfig:
    """adapter_config.json, with PEFT's per-module rank and alpha rules."""

    raw: dict[str, Any]

    @property
    def r(self) -> int:
        return self.raw["r"]

    @property
    def alpha(self) -> float:
        return float(self.raw["lora_alpha"])

    @property
    def use_rslora(self) -> bool:
        return bool(self.raw.get("use_rslora"))

    @property
    def rank_pattern(self) -> dict[str, int]:
        return self.raw.get("rank_pattern") or {}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return self.raw.get("alpha_pattern") or {}

    @property
    def target_modules(self) -> Any:
        return self.raw.get("target_modules")

    @property
    def base_model(self) -> str | None:
        return self.raw.get("base_model_name_or_path")

    def rank_for(self, module: str) -> int:
        """PEFT's rank for `module` (its dotted path without the `base_model.model.` prefix)."""
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(self.rank_pattern.keys(), module)
        return int(self.rank_pattern.get(key, self.r))

    def alpha_for(self, module: str) -> float:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(self.alpha_pattern.keys(), module)
        return float(self.alpha_pattern.get(key, self.alpha))

    def scale_for(self, module: str) -> float:
        """alpha/r or alpha/√r (rsLoRA) with the module's own rank and alpha, as PEFT's LoraLayer computes it."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def global_scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def extras(self) -> list[str]:
        """Features beyond plain A/B factors: a merge or a slot must not silently drop them."""
        out = []
        if self.raw.get("use_dora"):
            out.append("DoRA (use_dora)")
        if self.raw.get("lora_bias"):
            out.append("lora_bias")
        if self.raw.get("modules_to_save"):
            out.append("modules_to_save")
        if self.raw.get("bias", "none") != "none":
            out.append(f"bias={self.raw.get('bias')!r}")
        return out


def read_config(name: str, folder: str | Path) -> AdapterConfig:
    """The checked config of a LoRA adapter, or `DonorError` naming what is wrong with it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DonorError(name, f"adapter folder not found: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise DonorError(name, f"missing {CONFIG_FILE}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise DonorError(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES >> 20} MiB; refusing to parse it")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DonorError(name, f"corrupt {CONFIG_FILE} (not JSON)") from None
    if not isinstance(raw, dict):
        raise DonorError(name, f"corrupt {CONFIG_FILE} (not an object)")
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise DonorError(name, f"unsupported adapter type {raw.get('peft_type')!r} (only LoRA)")
    for key in FORBIDDEN_CONFIG_KEYS:
        if raw.get(key):
            raise DonorError(name, f"adapter config asks for custom code ({key}); refusing to load it")
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        raise DonorError(name, f"{CONFIG_FILE} needs an integer r >= 1 and a numeric lora_alpha")
    raw.setdefault("lora_alpha", alpha)
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
            raise DonorError(name, f"{CONFIG_FILE}: {key} must map module patterns to positive numbers")
    return AdapterConfig(raw)


@dataclass(frozen=True)
class ModuleFactors:
    """One adapted module of one adapter: where its factors are, their shapes, and PEFT's rank and scale for it."""

    module: str
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    scale: float
    embedding: bool = False


@dataclass
class Adapter:
    """An adapter folder, checked from its config and safetensors header alone (no tensor data is read)."""

    name: str
    folder: Path
    config: AdapterConfig
    dtypes: frozenset[str]
    modules: dict[str, ModuleFactors]
    extra_keys: list[str] = field(default_factory=list)  # biases, DoRA magnitudes, modules_to_save weights

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_FILE

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def uniform_scale(self) -> bool:
        """Every module has the config's global scale (no pattern changes it): what scale-per-adapter engines need."""
        return all(math.isclose(m.scale, self.config.global_scale) for m in self.modules.values())

    @property
    def plain(self) -> bool:
        """Only A/B factor weights of linear layers: no embedding LoRA, bias, DoRA or saved modules."""
        return not self.extra_keys and not self.config.extras() and not any(m.embedding for m in self.modules.values())


def weights_path(name: str, folder: Path) -> Path:
    """The safetensors file, or a `DonorError` that refuses a pickle and names a missing file."""
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.name in PICKLE_FILES) if folder.is_dir() else []
    if pickles:
        raise DonorError(name, f"only pickle weight files ({', '.join(pickles)}); refusing to unpickle, "
                               "convert them to safetensors")
    raise DonorError(name, f"missing {WEIGHTS_FILE}")


LAYOUT_CACHE_MAX = 1024  # parsed headers a `layouts` cache holds


def open_adapter(name: str, folder: str | Path, layouts: dict | None = None) -> Adapter:
    """Read and check one adapter's config and header. `layouts` caches parsed headers (donors of one shape have
    byte-identical headers, so a thousand donors are parsed once)."""
    folder = Path(folder)
    config = read_config(name, folder)
    weights = weights_path(name, folder)
    try:
        raw, data_size = read_header_bytes(weights)
        cache_key = (raw, data_size, json.dumps(config.raw, sort_keys=True, default=str))
        if layouts is None or cache_key not in layouts:
            parsed = _layout(name, parse_header(raw, data_size), config)
            if layouts is not None:
                if len(layouts) >= LAYOUT_CACHE_MAX:  # a pool of many shapes: start over, memory stays bounded
                    layouts.clear()
                layouts[cache_key] = parsed
        else:
            parsed = layouts[cache_key]
    except (OSError, ValueError) as exc:
        raise DonorError(name, f"corrupt {WEIGHTS_FILE}: {exc}") from None
    dtypes, modules, extra = parsed
    return Adapter(name, folder, config, dtypes, modules, list(extra))


def _layout(name: str, header: dict[str, TensorInfo], config: AdapterConfig):
    factors: dict[str, dict[str, tuple[str, TensorInfo, bool]]] = {}
    extra, dtypes = [], set()
    for key, info in header.items():
        parsed = parse_key(key)
        if parsed is None or parsed.factor is None:
            extra.append(key)
            continue
        dtypes.add(info.dtype)
        factors.setdefault(parsed.module, {})[parsed.factor] = (key, info, parsed.kind.startswith("lora_embedding"))
    if not factors:
        raise DonorError(name, f"{WEIGHTS_FILE} holds no LoRA tensors")
    if not dtypes <= set(FLOAT_DTYPES):
        raise DonorError(name, f"LoRA factors must be floating point, found {sorted(dtypes)}")
    modules = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise DonorError(name, f"module {module} lacks lora_{'B' if 'A' in pair else 'A'}")
        (a_key, a, emb), (b_key, b, _) = pair["A"], pair["B"]
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise DonorError(name, f"{a_key}: expected 2-D factors, got {list(a.shape)} / {list(b.shape)}")
        rank, b_rank = a.shape[0], b.shape[1]
        if rank != b_rank:
            raise DonorError(name, f"rank mismatch at {module}: lora_A has rank {rank}, lora_B has {b_rank}")
        expected = config.rank_for(module)
        if rank != expected:
            raise DonorError(name, f"rank mismatch at {module}: tensors have rank {rank}, adapter_config says "
                                   f"r={expected}" + (" (after rank_pattern)" if config.rank_pattern else ""))
        modules[module] = ModuleFactors(module, a_key, b_key, a.shape, b.shape, rank, config.scale_for(module), emb)
    return frozenset(dtypes), modules, tuple(extra)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, hashed from the page cache in place (mmap), never copied into a buffer."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def combine_fingerprint(config_sha256: str, weights_sha256: str) -> str:
    """An adapter's content fingerprint from its two files' sha256: what a score, a merge and a run are keyed by."""
    return hashlib.sha256(f"lora:{config_sha256}:{weights_sha256}".encode()).hexdigest()


def fingerprint(folder: str | Path, weights_sha256: str | None = None) -> str:
    """sha256 over the adapter's config bytes and weight bytes: equal fingerprints mean byte-identical adapters."""
    folder = Path(folder)
    weights_sha256 = weights_sha256 or sha256_file(folder / WEIGHTS_FILE)
    return combine_fingerprint(sha256_file(folder / CONFIG_FILE), weights_sha256)


def stat_signature(folder: str | Path) -> str | None:
    """(resolved path, size and mtime in ns of both files) as a short string; a stat, no file is opened.

    The driver compares it with the one recorded when the donor was scored: equal means the files were not
    rewritten since (the git index's rule), so the recorded content fingerprint still holds. None when the
    files cannot be seen from here (a path that only exists on the scoring nodes): such a donor is rescored.
    """
    folder = Path(folder)
    try:
        parts = [str(folder.resolve())]
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            st = (folder / name).stat()
            parts.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    except OSError:
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
