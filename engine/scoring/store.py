"""The append-only score store: `<out>/scores.parquet` plus a write-ahead journal beside it.

Every finished row is appended to `scores.journal.jsonl` at once (one line, flushed and fsynced), so a killed
driver loses nothing it has recorded. The parquet file is rewritten from journal + previous parquet through a
temporary file and `os.replace`, so readers never see a torn file. A torn last journal line is ignored.

This module is the writer only: the row's schema, its builder and the reader `read_scores` live in
`engine/core/scores.py`, so that selection and the report read rows without importing the scoring stage.
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
from engine.core.scores import (  # noqa: F401 - the schema lives in the core; re-exported for the store's callers
    EXACT, JOURNAL, KEY, SCORES, SCREEN, arrow_schema, exact_rows, normalise_row, read_scores,
)

SCHEMA = arrow_schema()
COMPACT_SHARE = 0.02  # at most this share of a run's wall-clock goes to automatic compaction
# The journal is the durable record; compaction only keeps reads short, and a job compacts when it ends. Every 5 s,
# it was most of the driver's per-donor cost on the tiny world (3 rewrites of the parquet in a 200-donor job).
COMPACT_EVERY_S = 30.0


class ScoreStore:
    """Appends rows durably; `compact()` folds the journal into the parquet file atomically."""

    def __init__(self, out_dir: str | Path, compact_every_s: float = COMPACT_EVERY_S):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parquet = self.dir / SCORES
        self.journal = self.dir / JOURNAL
        self.compact_every_s = compact_every_s
        self._gap_s = compact_every_s  # grows with the store, so that compaction stays a small share of the run
        self._last_compact = time.monotonic()

    def read(self) -> pd.DataFrame:
        return read_scores(self.dir)

    def completed(self, sample_id: str, round_: int = 0, kind: str = EXACT) -> set[str]:
        """Donors already `ok` for this sample (rows of this kind): a resume never scores them again."""
        df = self.read()
        done = df[(df.status == "ok") & (df.sample_id == sample_id) & (df["round"] == round_) & (df.kind == kind)]
        return set(done.donor)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = [normalise_row(r) for r in rows]
        if not rows:
            return
        with self.journal.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if time.monotonic() - self._last_compact >= self._gap_s:
            self.compact()

    def compact(self) -> None:
        """Rewrite the parquet file from it and the journal; the next automatic compaction waits at least
        COMPACT_SHARE⁻¹ times as long as this one took, so rewriting a large store never dominates a run."""
        t0 = time.monotonic()
        df = self.read()
        with atomic_file(self.parquet) as tmp:
            pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), tmp)
        # Rows now live in the parquet file; truncating the journal after the replace keeps them exactly once.
        with self.journal.open("w", encoding="utf-8") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        self._last_compact = time.monotonic()
        self._gap_s = max(self.compact_every_s, (self._last_compact - t0) / COMPACT_SHARE)

