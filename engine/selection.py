"""Donor selection: read the scores store, keep the donors worth merging, weight them, write selection.json.

Selection is cheap and deterministic (random-k is seeded), so it is always recomputed from scores.parquet rather
than cached; the only state it produces is the small selection.json that `mashup merge --selection` reads.
Only full-sample losses are ranked. After a cascade only top-k is meaningful (the ablations need every donor's
full-sample loss, which a cascade does not measure), so the other strategies are an error there.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from engine.core.config import StrictModel
from engine.core.errors import ConfigError, DataError
from engine.core.scores import BASE_ROW, full_sample_id, is_partial
from engine.core.selection_file import (  # noqa: F401 - Selection, SelectedDonor, donor_step: re-exported
    SelectedDonor, Selection, donor_step, finite_float as _float,
)
from engine.weighting import Weighting, compute_weights

log = logging.getLogger(__name__)
Strategy = Literal["top-k", "random-k", "worst-k", "all"]
STRATEGIES: tuple[str, ...] = ("top-k", "random-k", "worst-k", "all")
Metric = Literal["loss", "token_accuracy"]
METRICS: tuple[str, ...] = ("loss", "token_accuracy")


class SelectSettings(StrictModel):
    """How to select: the `select:` section of `mashup run` and an arm's overrides of it. Rules between fields are
    checked on the whole SelectConfig, once the run's section and the arm's overrides are laid over each other."""

    k: int | None = Field(None, ge=1)
    strategy: Strategy = "top-k"
    metric: Metric = Field("loss", description="what ranks the donors: loss (lower first, our default) or "
                                               "token_accuracy (higher first, the Mashup authors' default); "
                                               "ties are broken by loss, then by name")
    below_base: bool = False
    seed: int = 0
    weighting: Weighting = "uniform"
    penalty: float | None = Field(None, ge=0)
    temperature: float | None = Field(None, gt=0)


class SelectConfig(SelectSettings):
    """`mashup select`; in `mashup run`, `scores` and `out` come from the run."""

    scores: Path | None = None
    out: Path | None = None
    sample: str | None = Field(None, description="the sample id to rank on, when the store holds several")
    pool: str | None = Field(None, description="the pool id (or a unique prefix) to rank, as `mashup score` printed it; "
                                               "needed when the store holds several scoring scopes")

    @model_validator(mode="after")
    def _options_fit_the_choices(self) -> "SelectConfig":
        if self.k is None and self.strategy != "all":
            raise ValueError(f"k: required for strategy {self.strategy!r}")
        if self.penalty is not None and self.weighting not in ("mwa", "mwa-steps"):
            raise ValueError(f"penalty: applies only to weighting mwa or mwa-steps, not {self.weighting!r}")
        if self.temperature is not None and self.weighting != "softmax":
            raise ValueError(f"temperature: applies only to weighting softmax, not {self.weighting!r}")
        return self


def read_score_rows(scores: str | Path):
    """The deduplicated store rows; `engine.core.scores.read_scores` also folds in the write-ahead journal."""
    from engine.core.scores import read_scores

    path = Path(scores)
    if not path.exists():
        raise DataError(f"scores: not found: {path}")
    rows = read_scores(path)
    if rows.empty:
        raise DataError(f"scores: no rows in {path}")
    return rows


def full_sample_rows(rows, source: object = "scores", scope=None):
    """The rows of one scope measured on its whole sample, and the pool's donors that have no such row but were
    scored on a cascade's partial slice or only screened (stopped early: ranked by nobody).

    `scope` (engine.core.pools.Scope) names the sample and the pool's donors; None resolves it from the folder
    `source` (its recorded pools), refusing to guess between several. A cascade's partial-slice rows
    (`sample_id` "<sample>@<n>…") are never ranked: their losses cover fewer examples than the full-sample rows.
    """
    from engine.core.scores import exact_rows

    scope = scope or scope_of(rows, source)
    partial = rows["sample_id"].map(is_partial).astype(bool)
    mine = rows["sample_id"].map(lambda s: isinstance(s, str) and full_sample_id(s) == scope.sample_id).astype(bool)
    if scope.donors is not None:
        mine &= rows["donor"].isin(scope.donors | {BASE_ROW})
    rows, partial = rows[mine], partial[mine]
    screened = set(rows.loc[(rows["kind"] == "screen") & (rows["donor"] != BASE_ROW), "donor"])
    rows = exact_rows(rows, source)
    partial = partial[rows.index]
    full = rows[~partial]
    cascade = rows[partial]
    if full.empty:
        raise DataError(f"{source}: the cascade has not reached the full sample yet for {scope.describe()} (only "
                        "partial rounds or screening rows are recorded); rerun `mashup score` with the same config "
                        "to finish it")
    if len(cascade) and not ((full["donor"] == BASE_ROW) & (full["status"] == "ok")).any():
        raise DataError(f"{source}: the cascade's final round is unfinished (no full-sample {BASE_ROW} row yet); "
                        "rerun `mashup score` with the same config to finish it")
    full_ok = set(full.loc[full["status"] == "ok", "donor"])
    stopped = (set(cascade.loc[cascade["status"] == "ok", "donor"]) | screened) - full_ok - {BASE_ROW}
    return full, stopped


def scope_of(rows, source: object, sample: str | None = None, pool: str | None = None):
    """The scope (engine.core.pools.Scope) a reader of the store at `source` asked for: the named pool or sample,
    else the folder's only one; several without a choice is a DataError listing them."""
    from engine.core.pools import resolve_scope

    folder = Path(str(source))
    folder = folder if folder.is_dir() else folder.parent
    whole = rows[~rows["sample_id"].map(is_partial).astype(bool)]
    exact = whole[whole["kind"].fillna("exact") == "exact"]
    full = exact if len(exact) else whole  # a store of screen rows only: exact_rows then says so, naming it
    samples = sorted(set(full.loc[full["donor"] == BASE_ROW, "sample_id"].dropna()) or set(full["sample_id"].dropna()))
    return resolve_scope(folder, samples, sample, pool)


def rank_key(metric: str):
    """Best first by `metric`; ties broken by loss, then by name, so every ranking is reproducible."""
    if metric == "token_accuracy":
        return lambda c: (-c.token_accuracy, c.loss, c.donor)
    return lambda c: (c.loss, c.donor)


def worst_key(metric: str):
    """Worst first by `metric` (the worst-k ablation); ties broken by the higher loss, then by name."""
    if metric == "token_accuracy":
        return lambda c: (c.token_accuracy, -c.loss, c.donor)
    return lambda c: (-c.loss, c.donor)


def better_than_base(candidate: SelectedDonor, base: dict, metric: str) -> bool:
    """`below_base` in the selection metric's direction: a lower loss, or a higher token accuracy."""
    if metric == "token_accuracy":
        return candidate.token_accuracy > base["token_accuracy"]
    return candidate.loss < base["loss"]


def pick(candidates: list[SelectedDonor], config: SelectConfig) -> list[SelectedDonor]:
    """Apply the strategy; candidates arrive best first by the metric (`rank_key`) so ties break reproducibly."""
    k = len(candidates) if config.strategy == "all" else min(config.k or 0, len(candidates))
    if config.strategy != "all" and (config.k or 0) > len(candidates):
        log.warning("k=%d but only %d donors qualify; selecting %d", config.k, len(candidates), k)
    if config.strategy in ("top-k", "all"):
        return candidates[:k]
    if config.strategy == "worst-k":
        return sorted(candidates, key=worst_key(config.metric))[:k]
    by_name = sorted(candidates, key=lambda c: c.donor)
    return random.Random(config.seed).sample(by_name, k)


def select_with_config(config: SelectConfig) -> Selection:
    """Config-driven selection shared by the CLI, the Python API and `mashup run`."""
    if config.scores is None:
        raise ConfigError("scores: required (path to scores.parquet or its folder)")
    stored = read_score_rows(config.scores)
    scope = scope_of(stored, config.scores, config.sample, config.pool)
    rows, stopped = full_sample_rows(stored, config.scores, scope)
    if stopped and config.strategy != "top-k":
        raise DataError(f"strategy: {config.strategy} needs every donor's full-sample loss, but the cascade or the "
                        f"screen in {config.scores} stopped {len(stopped)} donors early; use top-k, or score with "
                        "strategy: exhaustive")
    ok = rows[rows["status"] == "ok"].drop_duplicates(subset="donor", keep="last")
    base = ok[ok["donor"] == BASE_ROW]
    base_loss = float(base["loss"].iloc[-1]) if len(base) else None
    base_row = {"loss": base_loss, "token_accuracy": _float(base["token_accuracy"].iloc[-1]) if len(base) else None}
    if base_loss is None:
        if config.below_base:
            raise DataError(f"scores: no ok {BASE_ROW} row, so below_base cannot be applied")
        log.warning("scores: no ok %s row; base_loss will be null", BASE_ROW)

    candidates = []
    for row in ok[ok["donor"] != BASE_ROW].to_dict("records"):
        candidate = SelectedDonor.from_row(row)
        if not math.isfinite(candidate.loss) or (config.metric == "token_accuracy" and candidate.token_accuracy is None):
            continue
        if config.below_base and not better_than_base(candidate, base_row, config.metric):
            continue
        candidates.append(candidate)
    if not candidates:
        why = f" better than the base by {config.metric}" if config.below_base else ""
        raise DataError(f"scores: no donor with status ok{why} in {config.scores}")
    candidates.sort(key=rank_key(config.metric))
    full_donors = int((ok["donor"] != BASE_ROW).sum())
    cascaded = stored["sample_id"].map(lambda x: is_partial(x) and full_sample_id(x) == scope.sample_id).any()
    if stopped and cascaded and config.k is not None and config.k > full_donors:
        raise DataError(f"k: {config.k} exceeds the {full_donors} donors the cascade scored on the full sample; "
                        f"rerun `mashup score` with cascade.min_survivors and cascade.settle_k >= {config.k} "
                        "(it resumes)")

    chosen = pick(candidates, config)
    weights = compute_weights(
        config.weighting, [c.loss for c in chosen], [c.step for c in chosen],
        config.penalty, config.temperature, [c.donor for c in chosen],
    )
    penalty = (1.0 if config.penalty is None else config.penalty) if config.weighting in ("mwa", "mwa-steps") else None
    temperature = (1.0 if config.temperature is None else config.temperature) if config.weighting == "softmax" else None
    selection = Selection(
        k=len(chosen), strategy=config.strategy, metric=config.metric, weighting=config.weighting, penalty=penalty,
        temperature=temperature, base_loss=base_loss, sample_id=scope.sample_id, pool=scope.pool,
        donors=[c.model_copy(update={"weight": w}) for c, w in zip(chosen, weights)],
    )
    if config.out is not None:
        selection.write(config.out)
    return selection


def select(
    scores: str | Path,
    *,
    sample: str | None = None,
    pool: str | None = None,
    k: int | None = None,
    strategy: str | None = None,
    metric: str | None = None,
    below_base: bool | None = None,
    seed: int | None = None,
    weighting: str | None = None,
    penalty: float | None = None,
    temperature: float | None = None,
    out: str | Path | None = None,
) -> Selection:
    """Script-friendly `mashup select`: options left as None take SelectConfig's defaults; writes `out` if given."""
    from engine.core.config import validate

    options = dict(scores=scores, sample=sample, pool=pool, k=k, strategy=strategy, metric=metric, below_base=below_base, seed=seed, weighting=weighting,
                   penalty=penalty, temperature=temperature, out=out)
    return select_with_config(validate(SelectConfig, {k_: v for k_, v in options.items() if v is not None}, "select"))
