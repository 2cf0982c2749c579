"""Streaming LoRA merges with a method registry (docs/contracts.md, "Merge semantics").

`engine.merge(...)` is the Python API. It is also the name of this package, and importing a submodule makes
Python bind `engine.merge` to the package, so the package itself is made callable: both spellings keep working.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Sequence

from engine.merge.config import MergeConfig

__all__ = ["MergeConfig", "merge"]


def merge(
    donors: Sequence[str | Path] | None = None,
    *,
    out: str | Path | None = None,
    weights: Sequence[float] | None = None,
    selection: str | Path | None = None,
    method: str | None = None,
    dtype: str | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    seed: int | None = None,
    svd_rank: int | None = None,
    refactor_rank: int | None = None,
    refactor_alpha: float | None = None,
    overwrite: bool | None = None,
    progress: bool | None = None,
) -> Path:
    """Script-friendly `mashup merge`: options left as None take MergeConfig's defaults; returns the adapter folder."""
    from engine.config import validate
    from engine.merge.streaming import merge_with_config

    options = dict(donors=[str(d) for d in donors] if donors is not None else None, out=out,
                   weights=list(weights) if weights is not None else None, selection=selection, method=method,
                   dtype=dtype, density=density, majority_sign=majority_sign, seed=seed, svd_rank=svd_rank,
                   refactor_rank=refactor_rank, refactor_alpha=refactor_alpha, overwrite=overwrite, progress=progress)
    config = validate(MergeConfig, {k: v for k, v in options.items() if v is not None}, "merge")
    return merge_with_config(config)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Path:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
