"""A finetune run's folder: its file names, and its checkpoints as a donor manifest (`<run>/checkpoints.jsonl`).

`mashup finetune --save-every N` leaves `checkpoints/step-N/`; the run writes the manifest beside them when it
ends (the DESIGN.md §2 manifest format), so the checkpoints can be read as donors with each one's step and
training loss. The finetune stage writes this folder (`engine/finetune/outputs.py`) and the top reads it
(`engine/checkpoints.py` weights the checkpoints, the report reads the run's info), so its layout lives in the
core: finetuning never imports the code above it, and reading a manifest never loads the finetune stage (torch).

Training loss of a checkpoint: the mean of the logged per-step training losses over the steps since the previous
checkpoint, (previous step, step] (the first checkpoint averages from step 1). One step's loss is one batch's loss
and noisy; the window mean is the smoothed loss a trainer's logger reports at that checkpoint (the paper weights by
the logged training loss; its exact window is not stated in what we could read).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel
from engine.core.errors import ConfigError, DataError

LOG_JSONL = "log.jsonl"
LOG_PARQUET = "log.parquet"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
INFO_FILE = "finetune_info.json"
MANIFEST_FILE = "checkpoints.jsonl"


def checkpoint_path(out_dir: Path, step: int) -> Path:
    """Where a run keeps the checkpoint of `step`: `checkpoints/step-NNNNNN` (the manifest reads the step back)."""
    return out_dir / CHECKPOINTS_DIR / f"step-{step:06d}"


class Checkpoint(StrictModel):
    """One manifest row: `id` and `path` (relative to the run folder) are what the catalog reads; the rest is metadata."""

    id: str
    path: str
    step: int = Field(ge=0)
    train_loss: float | None = Field(None, description="mean logged training loss over `window` (None: no train rows)")
    window: tuple[int, int] | None = Field(None, description="first and last step averaged into train_loss")
    eval_loss: float | None = None
    eval_accuracy: float | None = None


def _read_run_log(run_dir: Path) -> list[dict[str, Any]]:
    """log.parquet (a finished run), else log.jsonl (written as it goes, so a crashed run's checkpoints still count)."""
    parquet, jsonl = run_dir / LOG_PARQUET, run_dir / LOG_JSONL
    if parquet.exists():
        import pandas as pd

        frame = pd.read_parquet(parquet)
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                for row in frame.to_dict("records")]
    if jsonl.exists():
        return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    raise DataError(f"checkpoints: {run_dir} has no log.parquet or log.jsonl (not a `mashup finetune` run folder)")


def _checkpoint_folders(run_dir: Path) -> dict[int, Path]:
    """step → folder of every complete checkpoint, plus the final adapter when no checkpoint has its step."""
    found: dict[int, Path] = {}
    for folder in sorted((run_dir / CHECKPOINTS_DIR).glob("step-*")):
        if not (folder / "adapter_model.safetensors").exists():
            continue  # a half-written folder never has its final name (atomic_dir), but be safe with foreign runs
        try:
            found[int(folder.name.removeprefix("step-"))] = folder
        except ValueError:
            continue
    final = run_dir / ADAPTER_DIR
    if (final / "adapter_model.safetensors").exists() and (final / INFO_FILE).exists():
        step = json.loads((final / INFO_FILE).read_text()).get("step")
        if isinstance(step, int) and step not in found:
            found[step] = final
    return dict(sorted(found.items()))


def checkpoint_rows(run_dir: str | Path) -> list[Checkpoint]:
    """One row per checkpoint, in step order, with its step and its training loss read from the run's own log."""
    run_dir = Path(run_dir).resolve()
    folders = _checkpoint_folders(run_dir)
    if not folders:
        raise DataError(f"checkpoints: no checkpoints in {run_dir} (finetune with --save-every N)")
    log = _read_run_log(run_dir)
    train = {int(r["step"]): float(r["loss"]) for r in log if r.get("event") == "train" and r.get("loss") is not None}
    evals = {int(r["step"]): r for r in log if r.get("event") == "eval"}
    rows, previous = [], 0
    for step, folder in folders.items():
        window = [s for s in range(previous + 1, step + 1) if s in train]
        loss = sum(train[s] for s in window) / len(window) if window else None
        ev = evals.get(step, {})
        rows.append(Checkpoint(
            id=folder.name, path=folder.relative_to(run_dir).as_posix(),
            step=step, train_loss=loss, window=(window[0], window[-1]) if window else None,
            eval_loss=ev.get("loss"), eval_accuracy=ev.get("accuracy"),
        ))
        previous = step
    return rows


def write_manifest(run_dir: str | Path) -> Path:
    """`RUN/checkpoints.jsonl`, a donor manifest of the run's checkpoints (rebuilt from the log each time: cheap)."""
    run_dir = Path(run_dir).resolve()
    rows = checkpoint_rows(run_dir)
    text = "".join(json.dumps(r.model_dump(exclude_none=True)) + "\n" for r in rows)
    return atomic_write_text(run_dir / MANIFEST_FILE, text)


def read_manifest(source: str | Path) -> tuple[Path, list[Checkpoint]]:
    """(run folder, rows) from a run folder (its manifest is rebuilt from the log) or a checkpoints.jsonl."""
    path = Path(source)
    if path.is_dir():
        path = write_manifest(path)
    if not path.is_file():
        raise ConfigError(f"checkpoints: not a run folder or manifest: {source}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Checkpoint.model_validate_json(line))
        except ValueError as exc:
            raise DataError(f"{path}:{n}: not a checkpoint row ({str(exc).splitlines()[0]})") from None
    if not rows:
        raise DataError(f"checkpoints: {path} lists no checkpoints")
    return path.parent.resolve(), rows
