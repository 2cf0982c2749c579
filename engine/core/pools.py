"""Which donors and which sample a scoring call was about: the scope every reader of the store is given.

A scores folder is append-only and may hold rows of several pools and samples over time (a donor removed from the
manifest keeps its old row; a sample of 4 examples and one of 8 live side by side). Ranking "every ok row" or "the
latest sample" would then select a donor this run does not have, or rank on another sample. So each `mashup score`
call records its scope, `<scores>/pools/<pool>.json`: the sample id it scored and the ids of every donor of its
catalog. The pool id is a content key of the two, so a rerun of the same call finds the same record. Selection,
the cascade check and the report read only the rows of one scope; `mashup run` passes the scope its scoring
returned, and `mashup select` refuses to guess when the folder holds several (docs/contracts.md, "Scope").
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydantic import Field

from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel
from engine.core.errors import DataError

POOLS_DIR = "pools"


class PoolRecord(StrictModel):
    """One scoring call's scope: what `mashup select --pool` names."""

    pool: str
    sample_id: str
    donors: list[str] = Field(description="every donor id of the call's catalog, in catalog order")
    strategy: str = "exhaustive"
    examples: int | None = None
    created: float = Field(default_factory=time.time)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        return (f"pool {self.pool} (sample {self.sample_id}, {len(self.donors)} donors, {self.strategy}, "
                f"recorded {when})")


def pool_id(sample_id: str, donors: Iterable[str]) -> str:
    """A content key of the scope: the same sample and the same donor ids give the same pool, in any order."""
    from engine.core.identity import key_of

    return key_of({"sample_id": sample_id, "donors": sorted(donors)})[:16]


def write_pool(scores_dir: str | Path, sample_id: str, donors: list[str], strategy: str = "exhaustive",
               examples: int | None = None) -> PoolRecord:
    """Record (atomically) the scope of a scoring call; an existing record of the same pool keeps its date."""
    pid = pool_id(sample_id, donors)
    path = Path(scores_dir) / POOLS_DIR / f"{pid}.json"
    if path.exists():
        try:
            old = PoolRecord.model_validate_json(path.read_text())
            if old.strategy == strategy:
                return old
        except ValueError:
            pass  # a torn or foreign file: rewrite it
    record = PoolRecord(pool=pid, sample_id=sample_id, donors=list(donors), strategy=strategy, examples=examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, record.model_dump_json(indent=1) + "\n")
    return record


def read_pools(scores_dir: str | Path) -> list[PoolRecord]:
    """Every scope recorded in a scores folder, oldest first; unreadable records are skipped."""
    folder = Path(scores_dir) / POOLS_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(PoolRecord.model_validate_json(path.read_text()))
        except ValueError:
            continue
    return sorted(out, key=lambda r: (r.created, r.pool))


@dataclass(frozen=True)
class Scope:
    """The rows a reader may use: one sample id, and the pool's donors (None: every donor of that sample, only for
    a store with no recorded pools, written before scopes were recorded or built by hand)."""

    sample_id: str
    donors: frozenset[str] | None = None
    pool: str | None = None

    def describe(self) -> str:
        who = f"pool {self.pool}" if self.pool else "all donors"
        return f"{who}, sample {self.sample_id}"


def resolve_scope(scores_dir: str | Path, samples: list[str], sample: str | None = None,
                  pool: str | None = None) -> Scope:
    """The one scope a reader asked for, or a DataError that lists what the folder holds and how to choose.

    `samples`: the full-sample ids present in the store's rows (for stores without pool records). Nothing is chosen
    by recency: several pools or samples without a choice is an error, never "the latest".
    """
    folder = Path(scores_dir)
    pools = read_pools(folder)
    if pool is not None:
        hits = [r for r in pools if r.pool == pool or r.pool.startswith(pool)]
        if len(hits) != 1:
            found = "; ".join(r.describe() for r in pools) or "none"
            raise DataError(f"pool: {pool!r} {'matches several pools' if hits else 'not found'} in {folder} "
                            f"(recorded: {found})")
        record = hits[0]
        if sample is not None and sample != record.sample_id:
            raise DataError(f"sample: {sample!r} is not the sample of pool {record.pool} ({record.sample_id})")
        return Scope(record.sample_id, frozenset(record.donors), record.pool)
    if sample is not None:
        hits = [r for r in pools if r.sample_id == sample]
        if len(hits) > 1:
            raise DataError(f"scores in {folder} hold {len(hits)} pools scored on sample {sample}: "
                            + "; ".join(r.describe() for r in hits) + ". Choose one with --pool (select.pool)")
        if hits:
            return Scope(sample, frozenset(hits[0].donors), hits[0].pool)
        if sample not in samples:
            raise DataError(f"sample: {sample!r} has no full-sample rows in {folder} (found: "
                            f"{', '.join(samples) or 'none'})")
        return Scope(sample)
    if len(pools) == 1:
        return Scope(pools[0].sample_id, frozenset(pools[0].donors), pools[0].pool)
    if len(pools) > 1:
        raise DataError(f"scores in {folder} hold {len(pools)} scoring scopes: "
                        + "; ".join(r.describe() for r in pools)
                        + ". Choose one with --pool ID (select.pool), or --sample ID for a sample scored once")
    if len(samples) == 1:
        return Scope(samples[0])
    raise DataError(f"scores in {folder} hold {len(samples)} data samples ({', '.join(samples) or 'none'}) and no "
                    "recorded pools; choose one with --sample ID (select.sample)")
