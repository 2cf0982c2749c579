"""The score row: its schema, the one builder every writer uses, the base model's row name, and the reader.

A score row is what scoring produces and selection ranks: one donor on one sample (or one cascade prefix of it),
one kind. It is built on the actor (`actors/scorer.py`), completed on the driver (`engine/scoring/pool.py`, the
cascade's and the screen's stages), stored by `engine/scoring/store.py::ScoreStore` and read back here, so that
selection and the report read rows through the core without importing the scoring stage.

Importing this module stays cheap (no pandas, no pyarrow): they are imported by the functions that need them.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

# (column, arrow type) in file order. A store written before a column existed reads with that column null.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("donor", "string"),
    ("loss", "float64"),
    ("token_accuracy", "float64"),
    ("n_examples", "int64"),
    ("n_tokens", "int64"),
    ("nll_sq_sum", "float64"),
    ("nll_tok_sum", "float64"),
    ("tok_sq_sum", "int64"),
    ("status", "string"),
    ("error", "string"),
    ("backend", "string"),
    ("seconds", "float64"),
    ("sample_id", "string"),
    ("path", "string"),
    ("meta", "string"),
    ("revision", "string"),
    ("donor_sha256", "string"),
    ("donor_stat", "string"),
    ("base_fingerprint", "string"),
    ("round", "int64"),
    ("written_at", "float64"),
    # "exact": a forward-pass loss; "screen": a first-order prediction (engine.scoring.screen), never ranked as a loss.
    ("kind", "string"),
    ("alignment", "float64"),  # screen rows: cosine between -grad L and the donor's ΔW
    # exact rows: each example's NLL and completion tokens, in the sample's order (a cascade prefix row: the cascade's
    # order), so two donors are compared on paired differences (engine.scoring.cascade.paired_stderr)
    ("example_nll", "list<float64>"),
    ("example_tokens", "list<int32>"),
)
NAMES: tuple[str, ...] = tuple(name for name, _ in COLUMNS)
KEY = ["donor", "sample_id", "round", "kind"]  # a row's identity in the store: the last write of a key wins
EXACT, SCREEN = "exact", "screen"
SCORES = "scores.parquet"
JOURNAL = "scores.journal.jsonl"
BASE_ROW = "__base__"  # the donor id of the base model's own row; a catalog never hands it to a donor
PARTIAL = "@"  # "<sample>@<n>.s<seed>": a cascade row covering only the first n examples of the cascade's order
DEFAULTS: dict[str, Any] = {"round": 0, "kind": EXACT}  # every other column defaults to null


@functools.lru_cache(maxsize=1)
def arrow_schema():
    """The pyarrow schema of the store's parquet file, built from COLUMNS (the one place the schema is written)."""
    import pyarrow as pa

    def arrow_type(kind: str):
        return pa.list_(arrow_type(kind[5:-1])) if kind.startswith("list<") else getattr(pa, kind)()

    return pa.schema([(name, arrow_type(kind)) for name, kind in COLUMNS])


def _check(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - set(NAMES))
    if unknown:
        raise ValueError(f"not score-row columns: {', '.join(unknown)} (engine/core/scores.py COLUMNS)")


def score_row(donor: str, **fields: Any) -> dict[str, Any]:
    """A new row with every column present (its default unless given), so that every writer builds the same
    shape; a misspelt column is an error here rather than a silently dropped value in the store."""
    _check(fields)
    return {**{name: DEFAULTS.get(name) for name in NAMES}, "donor": donor, **fields}


def set_fields(row: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Edit a row in place (a driver stage completing what the actor built); only schema columns may be set."""
    _check(fields)
    row.update(fields)
    return row


def normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as stored: exactly the schema's columns (transport fields such as `placement` dropped), with its
    write time, round and kind filled in and `meta` as JSON text."""
    out = {name: row.get(name) for name in NAMES}
    out["round"] = int(out["round"] or 0)
    out["written_at"] = out["written_at"] or time.time()
    out["kind"] = out["kind"] or EXACT
    if isinstance(out["meta"], dict):
        out["meta"] = json.dumps(out["meta"], sort_keys=True)
    for name, cast in (("example_nll", float), ("example_tokens", int)):  # plain lists: a journal line is JSON
        if out[name] is not None:
            out[name] = [cast(v) for v in out[name]]
    return out


def prefix_id(sample_id: str, n: int, total: int, seed: int) -> str:
    """The sample id of a cascade prefix row, "<sample>@<n>.s<seed>": the first n examples of the order that `seed`
    shuffles, so a cascade resumed with another seed never sums prefixes taken in two orders. The plain id once
    the prefix is the whole sample (a sum over every example does not depend on the order)."""
    return sample_id if n >= total else f"{sample_id}{PARTIAL}{n}.s{seed}"


def prefix_size(sample_id: str) -> int | None:
    """n of a prefix id (None for a full-sample id)."""
    return int(sample_id.rsplit(PARTIAL, 1)[1].split(".s", 1)[0]) if is_partial(sample_id) else None


def is_partial(sample_id: object) -> bool:
    """Whether a row covers only a prefix of its sample (a cascade round before the last), so is never ranked."""
    return isinstance(sample_id, str) and PARTIAL in sample_id


def full_sample_id(sample_id: object) -> object:
    """The sample a (possibly partial) row's id belongs to; anything that is not a string is returned as is."""
    return sample_id.split(PARTIAL)[0] if isinstance(sample_id, str) else sample_id


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's rows; a torn final line from a killed writer is ignored."""
    rows = []
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn final line from a killed writer
    return rows


def rows_frame(rows: list[dict[str, Any]]):
    """Rows as a DataFrame of the store's schema (every column, typed as in the parquet file)."""
    import pyarrow as pa

    return pa.Table.from_pylist([normalise_row(r) for r in rows], schema=arrow_schema()).to_pandas()


def read_scores(path: str | Path):
    """All rows, deduplicated on (donor, sample_id, round, kind), last write wins; accepts the folder or the
    parquet file, and folds in the write-ahead journal, so a reader sees every row a live or killed run recorded."""
    import pandas as pd
    import pyarrow.parquet as pq

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    frames = []
    if (folder / SCORES).exists():
        # A store written before a column existed reads with that column null, so the schema can grow.
        frames.append(pq.read_table(folder / SCORES).to_pandas().reindex(columns=list(NAMES)))
    journal = read_journal(folder / JOURNAL)
    if journal:
        frames.append(rows_frame(journal))
    if not frames:
        return rows_frame([])
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["kind"] = df["kind"].astype(object).fillna(EXACT)  # rows written before the column existed are forward-pass losses
    df = df.sort_values("written_at", kind="stable").drop_duplicates(KEY, keep="last")
    return df.reset_index(drop=True)


def exact_rows(rows, source: object = "scores"):
    """Forward-pass rows only: a screening row's `loss` is a first-order prediction, and ranking it as a measured
    loss would let the screen's worst errors pick donors. Refuses a store that holds nothing else."""
    import pandas as pd

    from engine.core.errors import DataError

    kind = rows["kind"].fillna(EXACT) if "kind" in rows.columns else pd.Series(EXACT, index=rows.index)
    exact = rows[kind == EXACT]
    if exact.empty and len(rows):
        raise DataError(f"{source}: only screening rows (kind=screen, first-order predictions); selection never ranks "
                        "them as exact losses. Score with strategy: screen and screen.then: exhaustive or cascade")
    return exact
