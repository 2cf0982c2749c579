"""MergeConfig: `mashup merge` flags and the `merge:` section of `mashup run`.

`selection`/`donors` and `out` may be left to `mashup run`, which fills them in; `merge_with_config` checks them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from engine.core.config import StrictModel
from engine.merge.registry import METHODS, get_method

OPTION_FIELDS = ("density", "majority_sign", "svd_rank")


class MergeSettings(StrictModel):
    """How to merge: the `merge:` section of `mashup run` and an arm's overrides of it (what to merge and where to
    come from the run). Rules between fields are checked on the whole MergeConfig."""

    method: str = "linear"
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    density: float | None = Field(None, gt=0, le=1)
    majority_sign: Literal["total", "frequency"] | None = None
    seed: int = 0
    svd_rank: int | None = Field(None, ge=1)
    overwrite: bool = False
    progress: bool | None = None  # None: a bar for merges of 50+ donor reads
    accumulator_mb: float = Field(512, gt=0)  # float32 state held at once; modules beyond it take another pass
    refactor_rank: int | None = Field(None, ge=1, description="re-factor each merged module's ΔW to this rank by SVD "
                                                             "(e.g. the scratch LoRA's r, so every arm trains alike)")
    refactor_alpha: float | None = Field(None, gt=0, description="lora_alpha after refactor_rank (default: the rank)")


class MergeConfig(MergeSettings):
    """`mashup merge`: a selection.json, or donors with optional weights, into `out`."""

    selection: Path | None = None
    donors: list[str] | None = None
    weights: list[float] | None = None
    out: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "MergeConfig":
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.selection is not None and self.donors is not None:
            raise ValueError("selection and donors: give one, not both")
        if self.weights is not None:
            if self.donors is None:
                raise ValueError("weights: only with donors (a selection carries its own weights)")
            if len(self.weights) != len(self.donors):
                raise ValueError(f"weights: {len(self.weights)} values for {len(self.donors)} donors")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or not sum(self.weights) > 0:
                raise ValueError("weights: must be finite, >= 0, and not all zero")
        if self.refactor_alpha is not None and self.refactor_rank is None:
            raise ValueError("refactor_alpha: only with refactor_rank")
        method = get_method(self.method)
        for option in OPTION_FIELDS:
            if getattr(self, option) is not None and option not in method.options:
                raise ValueError(f"{option}: does not apply to method {self.method!r}")
        for option in method.required_options:
            if getattr(self, option) is None:
                raise ValueError(f"{option}: required for method {self.method!r}")
        return self
