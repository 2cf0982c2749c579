"""Donor adapters as the merge sees them: config, scale, rank and tensor layout read from headers, no weights.

Everything a merge can reject is checked here, before any tensor is read, so a bad donor fails the merge in
seconds with one line naming it, instead of after streaming the other donors.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.errors import ConfigError, DonorError
from engine.merge.base import ModuleSpec
from engine.merge.io import parse_safetensors_header, read_safetensors_header

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILE = "adapter_model.safetensors"
FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<factor>[AB])(?:\.weight)?$")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
UNSUPPORTED_FLAGS = {"use_dora": "DoRA", "lora_bias": "lora_bias", "modules_to_save": "modules_to_save",
                     "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}


@dataclass(frozen=True, slots=True)
class ModuleKeys:
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]


@dataclass
class Donor:
    name: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    dtype: torch.dtype
    target_modules: Any
    base_model: str | None
    modules: dict[str, ModuleKeys]

    @property
    def weight_file(self) -> Path:
        return self.path / WEIGHT_FILE

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(name: str, path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise DonorError(name, f"adapter folder not found: {path}")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise DonorError(name, f"no {CONFIG_FILE} in {path}")
    try:
        return json.loads(config_file.read_text())
    except ValueError as exc:
        raise DonorError(name, f"{config_file} is not valid JSON ({exc})") from None


def read_donor(name: str, path: str | Path, layouts: dict | None = None) -> Donor:
    """Validate one donor from its config and safetensors header; reads no tensor data.

    `layouts` caches parsed headers: donors of one shape have byte-identical headers, so a thousand of them are
    parsed once and share one module table (kilobytes, not megabytes, and no per-donor parsing cost).
    """
    folder = Path(path)
    config = read_adapter_config(name, folder)
    if config.get("peft_type", "LORA") != "LORA":
        raise DonorError(name, f"unsupported adapter type {config.get('peft_type')!r} (only LORA merges)")
    for flag, label in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise DonorError(name, f"{label} is not supported by the merge")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise DonorError(name, f"{CONFIG_FILE} needs an integer r >= 1 and a numeric lora_alpha")
    weight_file = folder / WEIGHT_FILE
    if not weight_file.is_file():
        other = sorted(p.name for p in folder.glob("adapter_model.*"))
        if other:
            raise DonorError(name, f"weights are not safetensors ({', '.join(other)}); refusing to unpickle")
        raise DonorError(name, f"no {WEIGHT_FILE}")
    try:
        raw_header, data_size = read_safetensors_header(weight_file)
    except (OSError, ValueError) as exc:
        raise DonorError(name, f"corrupt weight file {weight_file} ({exc})") from None
    layouts = {} if layouts is None else layouts
    cache_key = (raw_header, data_size, rank)
    if cache_key not in layouts:
        layouts[cache_key] = parse_layout(name, weight_file, raw_header, data_size, rank)
    dtype, modules = layouts[cache_key]
    return Donor(
        name=name, path=folder, rank=rank, alpha=float(alpha), use_rslora=bool(config.get("use_rslora")),
        dtype=dtype, target_modules=config.get("target_modules"), base_model=config.get("base_model_name_or_path"),
        modules=modules,
    )


def parse_layout(name: str, weight_file: Path, raw_header: bytes, data_size: int,
                 rank: int) -> tuple[torch.dtype, dict[str, ModuleKeys]]:
    """(dtype, module -> keys and shapes) from a safetensors header, checked against the donor's rank."""
    try:
        header = parse_safetensors_header(raw_header, data_size)
    except (ValueError, KeyError, TypeError) as exc:
        raise DonorError(name, f"corrupt weight file {weight_file} ({exc})") from None
    factors: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    dtypes = set()
    for key, (dtype, shape) in header.items():
        match = FACTOR_KEY.match(key)
        if match is None:
            raise DonorError(name, f"unexpected tensor {key!r}; only lora_A/lora_B factors can be merged")
        dtypes.add(dtype)
        factors.setdefault(match["module"], {})[match["factor"]] = (key, shape)
    if not factors:
        raise DonorError(name, f"{weight_file} holds no LoRA factors")
    if len(dtypes) != 1 or next(iter(dtypes)) not in SAFETENSORS_DTYPES:
        raise DonorError(name, f"tensors must share one float dtype, found {sorted(dtypes)}")
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise DonorError(name, f"module {module} lacks lora_{'B' if 'A' in pair else 'A'}")
        (a_key, a_shape), (b_key, b_shape) = pair["A"], pair["B"]
        if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise DonorError(name, f"module {module}: factor shapes {a_shape} / {b_shape} do not match r={rank}")
        modules[module] = ModuleKeys(a_key, b_key, a_shape, b_shape)
    return SAFETENSORS_DTYPES[next(iter(dtypes))], modules


def check_equal_ranks(donors: Sequence[Donor], method: str) -> None:
    """Methods that add factors entry by entry need one rank; name who differs so the user can drop them."""
    by_rank: dict[int, list[str]] = {}
    for donor in donors:
        by_rank.setdefault(donor.rank, []).append(donor.name)
    if len(by_rank) > 1:
        groups = "; ".join(f"r={r}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
                           for r, names in sorted(by_rank.items()))
        raise ConfigError(f"method {method} needs donors of equal rank, got {groups}; use method cat or svd")


def union_modules(donors: Sequence[Donor]) -> list[ModuleSpec]:
    """Every module any donor adapts; a donor without a module contributes zero to it (as in PEFT)."""
    specs: dict[str, ModuleSpec] = {}
    owners: dict[str, str] = {}
    seen_layouts: set[int] = set()
    for donor in donors:
        if id(donor.modules) in seen_layouts:
            continue
        seen_layouts.add(id(donor.modules))
        for module, keys in donor.modules.items():
            spec = ModuleSpec(module, keys.a_key, keys.b_key, keys.a_shape[1:], keys.b_shape[0], keys.b_shape[2:])
            known = specs.setdefault(module, spec)
            owners.setdefault(module, donor.name)
            if (known.a_tail, known.b_head, known.b_tail) != (spec.a_tail, spec.b_head, spec.b_tail):
                raise DonorError(donor.name, f"module {module} has shapes {keys.a_shape} / {keys.b_shape}, "
                                             f"which do not fit donor {owners[module]!r}")
    return list(specs.values())


def union_target_modules(donors: Sequence[Donor]) -> Any:
    """The merged config's target_modules: the donors' own value if they agree, else the union of the lists."""
    values = [d.target_modules for d in donors]
    if all(v == values[0] for v in values):
        return values[0]
    if all(isinstance(v, (list, tuple)) for v in values):
        return sorted({m for v in values for m in v})
    raise ConfigError("donors mix regex and list target_modules; merge donors of one form")


def warn_on_base_mismatch(donors: Sequence[Donor]) -> None:
    bases = {d.base_model for d in donors}
    if len(bases) > 1:
        log.warning("donors name %d different base models (%s); the merge assumes they are the same model",
                    len(bases), ", ".join(sorted(str(b) for b in bases)[:3]))


def output_dtype(donors: Sequence[Donor], requested: str | None) -> torch.dtype:
    """The donors' dtype (promoted if they differ) unless the user chose one."""
    if requested:
        return getattr(torch, requested)
    dtype = donors[0].dtype
    for donor in donors[1:]:
        dtype = torch.promote_types(dtype, donor.dtype)
    return dtype
