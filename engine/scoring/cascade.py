"""Cascade (successive-halving) scoring: every donor on a small slice, only the plausible best on the full sample.

Round r scores the survivors on examples [nᵣ₋₁, nᵣ) of a seeded shuffle of the sample and records, per donor, its
statistics over the whole prefix [0, nᵣ): earlier rounds' sums plus this increment, so no example is scored twice
for a donor. A prefix row has `sample_id = "<sample>@<nᵣ>"` and `round = r`; the final round covers the whole
sample and so carries the plain sample id, exactly as an exhaustive row does, which is what selection ranks on.

After a round that is not the last, donors are ranked on their prefix loss. The cut-off is the m-th best loss,
m = max(min_survivors, ⌈keep_fraction · survivors⌉); a donor survives if its loss is within z standard errors
(the standard error of the difference to the cut-off donor, from per-example moments) of the cut-off. The next
prefix is `growth` times longer, or the whole sample once no more than `min_survivors` are left.

Settling (`settle_k`): every donor is scored on the same examples, so two donors compare on their paired
per-example differences, whose standard error is far smaller than the two SEs combined when easy examples are easy
for both. Once a prefix has `settle_min_examples`, a survivor outside the best `settle_k` whose loss is worse than
each of them by `settle_z` paired SEs stops there; `min_survivors` no longer keeps it. Prefixes keep growing while
more than k survive; when every survivor outside the best k has stopped, the ranking is settled and only those k
are scored on the rest of the sample (so the rows selection ranks are still whole-sample rows).

Resume: a round's `ok` rows are never rescored, and the survivors of each round are recomputed from the stored
rows, so a rerun after a kill carries on where the cascade stopped. The base model's final-round row is written
last: its presence marks a finished cascade.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import Field, model_validator

from engine.core.config import StrictModel
from engine.core.scores import (  # noqa: F401 - PARTIAL, is_partial, prefix_id: re-exported, the grammar is the core's
    BASE_ROW as BASE, EXACT, PARTIAL, full_sample_id, is_partial, prefix_id, prefix_size, set_fields,
)

log = logging.getLogger("mashup.score")
SUMS = ("nll_sq_sum", "nll_tok_sum", "tok_sq_sum")
SUMMARY = "cascade.json"


class CascadeConfig(StrictModel):
    """The `cascade:` section of a score config; used only with `strategy: cascade`."""

    # Defaults measured at the paper's 256 examples on 8 bench targets (bench/bench_cascade_grid.py): the cheapest
    # setting whose top-2 stayed within one SE of exhaustive selection's everywhere, with a margin (z >= 1).
    first_slice: int = Field(4, ge=2, description="examples every donor is scored on in round 0")
    keep_fraction: float = Field(0.05, gt=0, le=1, description="share of a round's donors kept before the margin")
    z: float = Field(1.0, ge=0, description="safety margin: keep donors within z standard errors of the cut-off")
    growth: float = Field(2.0, gt=1, description="each round's prefix is this many times longer than the last")
    min_survivors: int = Field(4, ge=1, description="never prune below this many donors; set it ≥ the k you select")
    stop_after_round: int | None = Field(
        None, ge=0, description="stop after this round without finishing (a staged run); rerun without it to finish"
    )
    settle_k: int | None = Field(
        None, ge=1, description="stop a donor once the best settle_k are better than it by settle_z paired standard "
        "errors, and stop the cascade once that holds for every other survivor (min_survivors is then no floor); set "
        "it to the k you select (mashup run sets it to its arms' largest k). None: off")
    settle_z: float = Field(2.0, gt=0, description="the settling margin, in paired standard errors")
    settle_min_examples: int = Field(16, ge=2, description="examples a prefix needs before anything settles on it")

    @model_validator(mode="after")
    def _settle_within_the_floor(self) -> "CascadeConfig":
        if self.settle_k is not None and self.settle_k > self.min_survivors:
            raise ValueError(f"settle_k ({self.settle_k}) exceeds min_survivors ({self.min_survivors}): raise "
                             "min_survivors to at least the k you select")
        return self


@dataclass
class RoundStats:
    """One donor's prefix statistics; sums so that rounds add exactly."""

    nll: float = 0.0
    correct: float = 0.0
    tokens: int = 0
    examples: int = 0
    nll_sq: float = 0.0
    nll_tok: float = 0.0
    tok_sq: float = 0.0
    # per example, in the cascade's order (tuples: `+` concatenates, so earlier rounds come first); complete only when
    # they hold one entry per example (rows written before the columns existed have none)
    each_nll: tuple[float, ...] = ()
    each_tok: tuple[int, ...] = ()

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "RoundStats":
        tokens = int(row["n_tokens"])
        return cls(row["loss"] * tokens, row["token_accuracy"] * tokens, tokens, int(row["n_examples"]),
                   *(float(row.get(c) or 0.0) for c in SUMS),
                   *(tuple(v) if _is_list(v := row.get(c)) else () for c in ("example_nll", "example_tokens")))

    def __add__(self, other: "RoundStats") -> "RoundStats":
        """`self`'s examples then `other`'s: the earlier prefix goes on the left."""
        return RoundStats(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    @property
    def per_example(self) -> bool:
        return self.examples > 0 and len(self.each_nll) == len(self.each_tok) == self.examples

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def stderr(self) -> float:
        """Delta-method standard error of the token-weighted loss Σnllᵢ / Σtokᵢ over the examples scored."""
        n = self.examples
        if n < 2 or not self.tokens:
            return math.inf
        resid = self.nll_sq - 2 * self.loss * self.nll_tok + self.loss ** 2 * self.tok_sq
        return math.sqrt(max(resid, 0.0) * n / (n - 1)) / self.tokens

    def row_fields(self) -> dict[str, Any]:
        return {"loss": self.loss, "token_accuracy": self.correct / self.tokens if self.tokens else math.nan,
                "n_tokens": self.tokens, "n_examples": self.examples, "nll_sq_sum": self.nll_sq,
                "nll_tok_sum": self.nll_tok, "tok_sq_sum": int(self.tok_sq),
                "example_nll": list(self.each_nll) if self.per_example else None,
                "example_tokens": list(self.each_tok) if self.per_example else None}


def _is_list(value: Any) -> bool:
    return value is not None and not isinstance(value, float)  # a missing list reads as None or NaN


def paired_stderr(a: RoundStats, b: RoundStats) -> float:
    """Delta-method standard error of loss(a) − loss(b) from their per-example differences on the same examples
    (inf when either lacks per-example values or they were scored on different tokens)."""
    if not (a.per_example and b.per_example) or a.each_tok != b.each_tok or a.examples < 2:
        return math.inf
    tok = np.asarray(a.each_tok, dtype=np.float64)
    diff = np.asarray(a.each_nll) - np.asarray(b.each_nll)
    # the difference as one donor's statistics (same examples, same tokens): its stderr is the paired SE
    return RoundStats(float(diff.sum()), 0.0, int(tok.sum()), a.examples, float(diff @ diff), float(diff @ tok),
                      float(tok @ tok)).stderr


def separated(stats: dict[str, RoundStats], candidates: Iterable[str], k: int, z: float) -> set[str]:
    """The candidates outside the best k (by loss) that are worse than each of the best k by z paired SEs."""
    ranked = sorted(stats, key=lambda d: (stats[d].loss, d))
    top = ranked[:k]
    out = set()
    for d in candidates:
        if d in top:
            continue
        gaps = [(stats[d].loss - stats[j].loss, paired_stderr(stats[d], stats[j])) for j in top]
        if all(gap > 0 and gap >= z * se for gap, se in gaps):
            out.add(d)
    return out


def settle(stats: dict[str, RoundStats], keep: list[str], n: int, cfg: CascadeConfig) -> tuple[list[str], int]:
    """The survivors once the donors that have settled below the best `settle_k` stop, and how many stopped."""
    if cfg.settle_k is None or n < cfg.settle_min_examples:
        return keep, 0
    gone = separated(stats, keep, cfg.settle_k, cfg.settle_z)
    return [d for d in keep if d not in gone], len(gone)


def next_size(n: int, survivors: int, total: int, cfg: CascadeConfig) -> int:
    """Grow the prefix; jump to the whole sample once nothing can stop anybody: no more than `min_survivors` left,
    or with settling, no more than `settle_k` (nested prefixes score no example twice, so growing instead of
    jumping costs no compute, only rounds)."""
    if survivors <= (cfg.min_survivors if cfg.settle_k is None else cfg.settle_k):
        return total
    return min(total, max(n + 1, math.ceil(n * cfg.growth)))


def prune(stats: dict[str, RoundStats], cfg: CascadeConfig) -> tuple[list[str], float | None]:
    """Survivors (best first) and the cut-off loss; keeps every donor within the z-margin of the m-th best."""
    ranked = sorted(stats, key=lambda d: (stats[d].loss, d))
    m = max(cfg.min_survivors, math.ceil(cfg.keep_fraction * len(ranked)))
    if len(ranked) <= m:
        return ranked, None
    cut = stats[ranked[m - 1]]
    keep = [d for d in ranked if stats[d].loss <= cut.loss + cfg.z * math.hypot(stats[d].stderr, cut.stderr)]
    return keep, cut.loss


class RoundWriter:
    """Stands in for the store during one round: turns increment rows into prefix rows, holds back `held` donors."""

    def __init__(self, store, before: dict[str, RoundStats], held: Iterable[str] = ()):
        self.store, self.before = store, before
        self.held_ids, self.held = set(held), []

    def append(self, rows: list[dict[str, Any]]) -> None:
        out = []
        for row in rows:
            row = dict(row)
            if row["status"] == "ok":
                set_fields(row, **(self.before.get(row["donor"], RoundStats()) + RoundStats.from_row(row)).row_fields())
            (self.held if row["donor"] in self.held_ids else out).append(row)
        self.store.append(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)  # everything else (the folder, reads) is the store's

    def flush(self) -> None:
        self.store.append(self.held)
        self.held = []


def ok_stats(store, sample_id: str, round_: int, donors: Iterable[str]) -> dict[str, RoundStats]:
    """Prefix statistics of the given donors' `ok` rows of one round."""
    df = store.read()
    df = df[(df.status == "ok") & (df.sample_id == sample_id) & (df["round"] == round_) & df.donor.isin(set(donors))
            & (df.kind == EXACT)]
    return {r["donor"]: RoundStats.from_row(r) for r in df.to_dict("records")}


def moved_donors(catalog, store, sample_id: str) -> set[str]:
    """Hub donors whose pinned commit moved since any round scored them: every round of theirs is scored again."""
    from engine.scoring.catalog import stale_donors

    rows = store.read()
    rows = rows.assign(sample_id=rows.sample_id.map(full_sample_id))
    return stale_donors(catalog, rows, sample_id)


def cascade_order(sample, seed: int):
    """The sample in a seeded random order, so that every prefix is a uniform subsample of it."""
    from engine.core.data import EncodedSample

    order = list(range(len(sample.examples)))
    random.Random(f"cascade:{seed}").shuffle(order)
    return EncodedSample([sample.examples[i] for i in order], sample.fingerprint, sample.base_fingerprint)


def run_cascade(cfg, opts, sample, catalog, store, summary) -> None:
    """Score `catalog` by successive halving; rows go to `store`, per-round figures to summary.rounds and
    `<out>/cascade.json`."""
    from engine.core.atomic import atomic_write_text
    from engine.core.data import EncodedSample
    from engine.scoring.pool import ActorPoolRunner

    cc: CascadeConfig = cfg.cascade
    ordered = cascade_order(sample, cfg.seed)
    total = len(ordered.examples)
    if cc.first_slice >= total:
        log.warning("cascade.first_slice (%d) covers the whole sample (%d examples): one exhaustive round",
                    cc.first_slice, total)
    entries = {e.donor: e for e in catalog}
    ids = {e.donor: i + 1 for i, e in enumerate(catalog)}
    survivors, before = list(entries), {}
    prev_n, n, round_ = 0, min(cc.first_slice, total), 0
    record = {"sample_id": sample.fingerprint, "seed": cfg.seed, "examples": total, "donors": len(entries),
              "config": cc.model_dump(), "rounds": [], "finished": False}
    moved = moved_donors(catalog, store, sample.fingerprint)
    runner = ActorPoolRunner(cfg, opts.model_dump(), ordered, store)
    try:
        while True:
            sid, final = prefix_id(sample.fingerprint, n, total, cfg.seed), n >= total
            done = store.completed(sid, round_) - moved
            pending = [entries[d] for d in survivors if d not in done]
            with_base = BASE not in done
            summary.skipped_done += len(survivors) - len(pending)
            log.info("cascade round %d: %d donors on examples %d-%d (%d already scored)",
                     round_, len(survivors), prev_n, n, len(survivors) - len(pending))
            t0 = time.perf_counter()
            if pending or with_base:
                runner.sample, runner.round = EncodedSample(ordered.examples[prev_n:n], sid, sample.base_fingerprint), round_
                runner.store = RoundWriter(store, before, held=[BASE] if final else [])
                runner.run(pending, with_base, summary, ids=ids, keep_actors=True)
                runner.store.flush()
                summary.donor_examples += len(pending) * (n - prev_n)
            stats = ok_stats(store, sid, round_, [*survivors, BASE])
            base = stats.pop(BASE, None)
            kept, cutoff = (sorted(stats, key=lambda d: (stats[d].loss, d)), None) if final else prune(stats, cc)
            kept, settled = (kept, 0) if final else settle(stats, kept, n, cc)
            record["rounds"].append({"round": round_, "examples": n, "slice": [prev_n, n], "sample_id": sid,
                                     "scored": len(stats), "kept": len(kept), "cutoff_loss": cutoff, "final": final,
                                     "settled_out": settled,
                                     "donor_examples": len(stats) * (n - prev_n),
                                     "seconds": round(time.perf_counter() - t0, 3)})
            record["finished"] = final
            atomic_write_text(Path(cfg.out) / SUMMARY, json.dumps(record, indent=2) + "\n")
            if final or (cc.stop_after_round is not None and round_ >= cc.stop_after_round):
                break
            survivors, before = kept, {**stats, **({BASE: base} if base else {})}
            prev_n, n, round_ = n, next_size(n, len(kept), total, cc), round_ + 1
    finally:
        runner.close()
    summary.rounds = record["rounds"]
    if not record["finished"]:
        log.warning("cascade stopped after round %d (cascade.stop_after_round); rerun without it to finish", round_)
