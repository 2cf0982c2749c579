"""What the tests showed, cell by cell, for README's support table (`python -m bench.support` renders it).

A test calls `record(...)` only after its assertions passed (or after checking a refusal's exact line), so a cell
says what was actually checked. The JSON holds no timestamps: rerunning the same tests rewrites the same bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.core.atomic import atomic_write_text

SUPPORT_JSON = Path(__file__).resolve().parents[2] / "bench" / "results" / "support.json"


def record(table: str, row: str, column: str, outcome: str) -> None:
    """Set one cell: `table` is "architectures" or "features"; `outcome` is "ok" or "refused: <reason>" etc."""
    path = Path(os.environ.get("MASHUP_SUPPORT_JSON", SUPPORT_JSON))
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(table, {}).setdefault(row, {})[column] = outcome
    ordered = {t: {r: dict(sorted(c.items())) for r, c in sorted(rows.items())} for t, rows in sorted(data.items())}
    atomic_write_text(path, json.dumps(ordered, indent=1) + "\n")
