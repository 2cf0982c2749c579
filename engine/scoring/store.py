"""The append-only score store: `<out>/scores.parquet` plus a write-ahead journal beside it.

Every finished row is appended to `scores.journal.jsonl` at once (one line, flushed and fsynced), so a killed
driver loses nothing it has recorded. The parquet file is rewritten from journal + previous parquet through a
temporary file and `os.replace`, so readers never see a torn file. A torn last journal line is ignored.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from engine.core.atomic import atomic_file

SCHEMA = pa.schema(
    [
        ("donor", pa.string()),
        ("loss", pa.float64()),
        ("token_accuracy", pa.float64()),
        ("n_examples", pa.int64()),
        ("n_tokens", pa.int64()),
        ("nll_sq_sum", pa.float64()),
        ("nll_tok_sum", pa.float64()),
        ("tok_sq_sum", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("backend", pa.string()),
        ("seconds", pa.float64()),
        ("sample_id", pa.string()),
        ("path", pa.string()),
        ("meta", pa.string()),
        ("revision", pa.string()),
        ("donor_sha256", pa.string()),
        ("donor_stat", pa.string()),
        ("base_fingerprint", pa.string()),
        ("round", pa.int64()),
        ("written_at", pa.float64()),
        # "exact": a forward-pass loss; "screen": a first-order prediction (engine.scoring.screen), never ranked as a loss.
        ("kind", pa.string()),
        ("alignment", pa.float64()),  # screen rows: cosine between -grad L and the donor's ΔW
    ]
)
KEY = ["donor", "sample_id", "round", "kind"]
EXACT, SCREEN = "exact", "screen"
SCORES = "scores.parquet"
JOURNAL = "scores.journal.jsonl"


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    out = {name: row.get(name) for name in SCHEMA.names}
    out["round"] = int(out["round"] or 0)
    out["written_at"] = out["written_at"] or time.time()
    out["kind"] = out["kind"] or EXACT
    if isinstance(out["meta"], dict):
        out["meta"] = json.dumps(out["meta"], sort_keys=True)
    return out


def _read_journal(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn final line from a killed writer
    return rows


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pa.Table.from_pylist([_normalise(r) for r in rows], schema=SCHEMA).to_pandas()


def read_scores(path: str | Path) -> pd.DataFrame:
    """All rows, deduplicated on (donor, sample_id, round), last write wins; accepts the folder or the parquet file."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    frames = []
    if (folder / SCORES).exists():
        # A store written before a column existed reads with that column null, so the schema can grow.
        frames.append(pq.read_table(folder / SCORES).to_pandas().reindex(columns=SCHEMA.names))
    journal = _read_journal(folder / JOURNAL)
    if journal:
        frames.append(_frame(journal))
    if not frames:
        return _frame([])
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["kind"] = df["kind"].astype(object).fillna(EXACT)  # rows written before the column existed are forward-pass losses
    df = df.sort_values("written_at", kind="stable").drop_duplicates(KEY, keep="last")
    return df.reset_index(drop=True)


class ScoreStore:
    """Appends rows durably; `compact()` folds the journal into the parquet file atomically."""

    def __init__(self, out_dir: str | Path, compact_every_s: float = 5.0):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parquet = self.dir / SCORES
        self.journal = self.dir / JOURNAL
        self.compact_every_s = compact_every_s
        self._last_compact = time.monotonic()

    def read(self) -> pd.DataFrame:
        return read_scores(self.dir)

    def completed(self, sample_id: str, round_: int = 0, kind: str = EXACT) -> set[str]:
        """Donors already `ok` for this sample (rows of this kind): a resume never scores them again."""
        df = self.read()
        done = df[(df.status == "ok") & (df.sample_id == sample_id) & (df["round"] == round_) & (df.kind == kind)]
        return set(done.donor)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = [_normalise(r) for r in rows]
        if not rows:
            return
        with self.journal.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if time.monotonic() - self._last_compact >= self.compact_every_s:
            self.compact()

    def compact(self) -> None:
        df = self.read()
        with atomic_file(self.parquet) as tmp:
            pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), tmp)
        # Rows now live in the parquet file; truncating the journal after the replace keeps them exactly once.
        with self.journal.open("w", encoding="utf-8") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        self._last_compact = time.monotonic()


def exact_rows(rows: pd.DataFrame, source: object = "scores") -> pd.DataFrame:
    """Forward-pass rows only: a screening row's `loss` is a first-order prediction, and ranking it as a measured
    loss would let the screen's worst errors pick donors. Refuses a store that holds nothing else."""
    from engine.core.errors import DataError

    kind = rows["kind"].fillna(EXACT) if "kind" in rows.columns else pd.Series(EXACT, index=rows.index)
    exact = rows[kind == EXACT]
    if exact.empty and len(rows):
        raise DataError(f"{source}: only screening rows (kind=screen, first-order predictions); selection never ranks "
                        "them as exact losses. Score with strategy: screen and screen.then: exhaustive or cascade")
    return exact
