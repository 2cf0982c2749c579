"""What a finetune run leaves on disk: a per-step log that survives a crash, and adapters written atomically.

An adapter folder either holds a complete adapter or does not exist: it is written next to its final place and
renamed into it, so a killed run never leaves a half-written adapter for the next stage to load.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from engine.core.atomic import atomic_dir, atomic_file
from engine.core.run_folder import (  # noqa: F401 - the folder's layout is the core's; re-exported for the stage
    ADAPTER_DIR, CHECKPOINTS_DIR, INFO_FILE, LOG_JSONL, LOG_PARQUET, checkpoint_path,
)


class TrainLog:
    """Rows appended to log.jsonl as they happen (flushed each time); log.parquet is written by `close`.

    `seconds` is wall-clock time since the training loop began (after the model loaded), so runs compare fairly.
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None):
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._fh = (out_dir / LOG_JSONL).open("w", encoding="utf-8")
            return
        # resumed: keep the rows up to the saved state; the clock goes on from the killed run's last row, so the
        # steps it lost after that state count in the wall-clock (engine/finetune/resume.py)
        old = read_log(out_dir) if (out_dir / LOG_JSONL).exists() else []
        self.rows = [r for r in old if r["step"] <= resume_step]
        lost = max((r["step"] for r in old if r["event"] == "train"), default=resume_step) - resume_step
        self.t0 -= max((r["seconds"] for r in old), default=0.0)
        with atomic_file(out_dir / LOG_JSONL) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._fh = (out_dir / LOG_JSONL).open("a", encoding="utf-8")
        self.write(resume_step, "resume", lost_steps=lost)

    def write(self, step: int, event: str, **fields: Any) -> dict[str, Any]:
        row = {"step": step, "event": event, "seconds": round(time.perf_counter() - self.t0, 4), **fields}
        self.rows.append(row)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        return row

    def close(self) -> None:
        import pandas as pd

        self._fh.close()
        with atomic_file(self.out_dir / LOG_PARQUET) as tmp:
            pd.DataFrame(self.rows).to_parquet(tmp, index=False)


def read_log(out_dir: Path) -> list[dict[str, Any]]:
    """From log.jsonl, which every executor writes (rank 0 in DeepSpeed runs), so the driver needs no worker state."""
    path = out_dir / LOG_JSONL
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_adapter(model: Any, final: Path, info: dict[str, Any]) -> Path:
    """A PEFT adapter folder that `PeftModel.from_pretrained(base, final)` loads, plus what produced it."""
    with atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return final



def drop_checkpoints_after(out_dir: Path, step: int) -> None:
    """A resumed run rewrites the checkpoints after its saved state; older ones from the killed run are removed."""
    import shutil

    folder = out_dir / CHECKPOINTS_DIR
    for ckpt in folder.glob("step-*") if folder.is_dir() else []:
        tail = ckpt.name[len("step-"):]
        if tail.isdigit() and int(tail) > step:
            shutil.rmtree(ckpt, ignore_errors=True)
