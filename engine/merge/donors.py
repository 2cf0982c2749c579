"""Donor adapters as the merge sees them: config, scale, rank and tensor layout read from headers, no weights.

Everything a merge can reject is checked here, before any tensor is read, so a bad donor fails the merge in
seconds with one line naming it, instead of after streaming the other donors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.core.adapter import CONFIG_FILE, DORA_UNSUPPORTED, WEIGHTS_FILE, ModuleFactors, open_adapter, read_config
from engine.core.errors import ConfigError, DonorError
from engine.merge.base import ModuleSpec

log = logging.getLogger(__name__)

WEIGHT_FILE = WEIGHTS_FILE
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Config keys that select layers or modules: a merged adapter names its modules explicitly instead, so a donor's
# selectors can never hide another donor's modules when the merge is loaded.
LAYER_SELECTORS = ("layers_to_transform", "layers_pattern", "exclude_modules", "rank_pattern", "alpha_pattern")


@dataclass
class Donor:
    name: str
    path: Path
    rank: int
    dtype: torch.dtype
    target_modules: Any
    base_model: str | None
    modules: dict[str, ModuleFactors]  # each with PEFT's own rank and scale for that module
    config: dict[str, Any]

    @property
    def weight_file(self) -> Path:
        return self.path / WEIGHT_FILE

    @property
    def scales(self) -> tuple[tuple[str, float], ...]:
        return tuple((m, f.scale) for m, f in self.modules.items())


def read_adapter_config(name: str, path: Path) -> dict[str, Any]:
    return dict(read_config(name, path).raw)


def read_donor(name: str, path: str | Path, layouts: dict | None = None) -> Donor:
    """Validate one donor from its config and safetensors header; reads no tensor data.

    `layouts` caches parsed headers: donors of one shape have byte-identical headers, so a thousand of them are
    parsed once and share one module table (kilobytes, not megabytes, and no per-donor parsing cost).
    """
    adapter = open_adapter(name, path, layouts)
    if adapter.config.raw.get("use_dora"):
        raise DonorError(name, DORA_UNSUPPORTED)  # the same line validation and finetune --init give
    extras = adapter.config.extras() + [f"tensor {k}" for k in adapter.extra_keys[:3]]
    if extras:
        raise DonorError(name, f"{', '.join(extras)} is not supported by the merge (only LoRA A/B factors merge)")
    odd = sorted({f.rank for f in adapter.modules.values()} - {adapter.config.r})
    if odd:
        raise DonorError(name, f"rank_pattern gives modules ranks {odd} besides r={adapter.config.r}; "
                               "the merge needs one rank per donor")
    if len(adapter.dtypes) != 1:
        raise DonorError(name, f"tensors must share one float dtype, found {sorted(adapter.dtypes)}")
    return Donor(
        name=name, path=adapter.folder, rank=adapter.config.r, dtype=SAFETENSORS_DTYPES[next(iter(adapter.dtypes))],
        target_modules=adapter.config.target_modules, base_model=adapter.config.base_model,
        modules=adapter.modules, config=adapter.config.raw,
    )


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
            # Output keys in PEFT's saved form, whatever the donor's own spelling (some carry the adapter name).
            a_key, b_key = (f"base_model.model.{module}.lora_embedding_{f}" if keys.embedding
                            else f"base_model.model.{module}.lora_{f}.weight" for f in "AB")
            spec = ModuleSpec(module, a_key, b_key, keys.a_shape[1:], keys.b_shape[0], keys.b_shape[2:])
            known = specs.setdefault(module, spec)
            owners.setdefault(module, donor.name)
            if (known.a_tail, known.b_head, known.b_tail) != (spec.a_tail, spec.b_head, spec.b_tail):
                raise DonorError(donor.name, f"module {module} has shapes {keys.a_shape} / {keys.b_shape}, "
                                             f"which do not fit donor {owners[module]!r}")
    return list(specs.values())


def merged_target_modules(donors: Sequence[Donor], modules: Sequence[ModuleSpec]) -> Any:
    """The merged config's target_modules. Donors that agree on a list keep it (or its union); as soon as one
    donor narrows its targets (layers_to_transform, layers_pattern, exclude_modules) or uses a regex, every merged
    module is named by its full path instead, which PEFT matches exactly: no donor's selector can hide another
    donor's modules when the merge is loaded."""
    values = [d.target_modules for d in donors]
    narrowed = any(d.config.get(k) not in (None, [], "") for d in donors for k in LAYER_SELECTORS[:3])
    if not narrowed and all(isinstance(v, (list, tuple)) for v in values):
        return values[0] if all(v == values[0] for v in values) else sorted({m for v in values for m in v})
    return sorted(m.name for m in modules)


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
