"""The Python API: one plain function per stage, the same validation and behaviour as the command line.

    from engine.api import merge, select
    selection = select("runs/x/score", k=2, out="sel.json")
    adapter = merge(selection="sel.json", out="merged")
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from engine.merge.config import MergeConfig
from engine.selection import select

__all__ = ["merge", "select"]


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
    from engine.core.config import validate
    from engine.merge.streaming import merge_with_config

    options = dict(donors=[str(d) for d in donors] if donors is not None else None, out=out,
                   weights=list(weights) if weights is not None else None, selection=selection, method=method,
                   dtype=dtype, density=density, majority_sign=majority_sign, seed=seed, svd_rank=svd_rank,
                   refactor_rank=refactor_rank, refactor_alpha=refactor_alpha, overwrite=overwrite, progress=progress)
    config = validate(MergeConfig, {k: v for k, v in options.items() if v is not None}, "merge")
    return merge_with_config(config)
