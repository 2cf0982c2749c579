"""selection.json: the file selection writes and the merge reads, and the donor it lists.

It lives in the core because three stages share it: selection writes it from score rows, the checkpoint pool
(`engine/checkpoints.py`) writes it from a finetune run, and the merge (`engine/merge/streaming.py`) reads it;
none of them has to import another to agree on the file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel
from engine.core.errors import ConfigError


class SelectedDonor(StrictModel):
    """One donor from its score row to the merge: the same object is ranked, picked, weighted and written."""

    donor: str
    loss: float
    weight: float = 0.0  # set once the picks are weighted
    path: str | None = None
    token_accuracy: float | None = None
    fingerprint: str | None = None  # the content fingerprint of the files that were scored (engine.core.adapter)
    revision: str | None = None  # the Hub commit that was scored (its path is pinned to it too)
    step: float | None = None  # the checkpoint step from the donor's metadata, for mwa-steps

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SelectedDonor":
        """A stored score row (engine/core/scores.py) as a candidate; missing values read as None."""
        def text(value: object) -> str | None:
            return value if isinstance(value, str) and value else None

        return cls(donor=str(row["donor"]), loss=float(row["loss"]), token_accuracy=finite_float(row.get("token_accuracy")),
                   path=text(row.get("path")), fingerprint=text(row.get("donor_sha256")),
                   revision=text(row.get("revision")), step=donor_step(row.get("meta")))


class Selection(StrictModel):
    """selection.json (docs/contracts.md, "selection.json"); `path` and `token_accuracy` per donor, `metric` and
    `temperature` are our documented extensions."""

    k: int
    strategy: str
    metric: str = "loss"
    weighting: str
    penalty: float | None
    temperature: float | None = None
    base_loss: float | None
    sample_id: str | None = None  # the scope that was ranked (engine.core.pools): its sample and pool
    pool: str | None = None
    donors: list[SelectedDonor]

    def write(self, path: str | Path) -> Path:
        """Atomic, so a reader never sees half a selection."""
        return atomic_write_text(path, json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> "Selection":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"selection: file not found: {p}")
        try:
            return cls.model_validate_json(p.read_text())
        except ValueError as exc:
            raise ConfigError(f"selection: {p} is not a valid selection.json ({str(exc).splitlines()[0]})") from None


def donor_step(meta: object) -> float | None:
    """The checkpoint step from the manifest metadata JSON, if the donor carries one."""
    if not isinstance(meta, str) or not meta:
        return None
    try:
        step = json.loads(meta).get("step")
    except (ValueError, AttributeError):
        return None
    return float(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def finite_float(value: object) -> float | None:
    """A finite float, or None for a missing or NaN store value."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
