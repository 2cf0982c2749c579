"""A finetune run's checkpoints as a donor pool, weighted by Metrics-Weighted Averaging (arXiv 2504.18580).

`mashup finetune --save-every N` leaves `checkpoints/step-N/`; this module describes them in a donor manifest
(`checkpoints.jsonl` beside them, the DESIGN.md §2 manifest format) with each checkpoint's step and training loss,
and weights them as the MWA paper does: w_i ∝ train_loss_i^(-p) ("loss") or w_i ∝ step_i^p ("step"), normalised
to sum 1, one penalty p for any number of checkpoints; p = 0 is the uniform average. No scoring is needed: the
metrics come from the run's own log, so `mashup checkpoints RUN --metric loss` + `mashup merge --selection` merges a
run the way the paper does.

Training loss of a checkpoint: the mean of the logged per-step training losses over the steps since the previous
checkpoint, (previous step, step] (the first checkpoint averages from step 1). One step's loss is one batch's loss
and noisy; the window mean is the smoothed loss a trainer's logger reports at that checkpoint (the paper weights by
the logged training loss; its exact window is not stated in what we could read).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field

from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel
from engine.core.errors import ConfigError, DataError

MANIFEST_FILE = "checkpoints.jsonl"
Metric = Literal["loss", "step", "uniform"]
METRICS: tuple[str, ...] = ("loss", "step", "uniform")
# The paper's formula has one hyperparameter, the penalty p. Its text was not reachable from here, so the default is
# p = 1 (w ∝ 1/loss, w ∝ step: the plain inverse-metric / proportional weighting, and this project's existing `mwa`
# default); bench/bench_mwa.py sweeps p. See docs/mwa.md.
DEFAULT_PENALTY = 1.0
WEIGHTING_OF = {"loss": "mwa", "step": "mwa-steps", "uniform": "uniform"}


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
    parquet, jsonl = run_dir / "log.parquet", run_dir / "log.jsonl"
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
    from engine.finetune.outputs import ADAPTER_DIR, CHECKPOINTS_DIR, INFO_FILE

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


def checkpoint_weights(rows: Sequence[Checkpoint], metric: str, penalty: float | None = None) -> list[float]:
    """The paper's weights: lower training loss, or a later step, gets more weight; p = 0 (or "uniform") is uniform."""
    from engine.weighting import compute_weights

    if metric not in METRICS:
        raise ConfigError(f"metric: unknown {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "loss":
        missing = [r.id for r in rows if r.train_loss is None]
        if missing:
            raise DataError(f"checkpoint {missing[0]!r}: no training loss in the run's log, so it cannot be loss-weighted")
    losses = [r.train_loss if r.train_loss is not None else 1.0 for r in rows]
    p = DEFAULT_PENALTY if penalty is None else penalty
    return compute_weights(WEIGHTING_OF[metric], losses, [r.step for r in rows], penalty=p if metric != "uniform" else None,
                           donor_names=[r.id for r in rows])


def checkpoint_selection(source: str | Path, metric: str = "loss", penalty: float | None = None,
                         out: str | Path | None = None, steps: Sequence[int] | None = None):
    """A selection.json over the run's checkpoints (optionally only `steps`), for `mashup merge --selection`.

    Each donor's `loss` is its training loss (not a scored loss) and `base_loss` is null: nothing was scored.
    """
    from engine.core.selection_file import SelectedDonor, Selection

    run_dir, rows = read_manifest(source)
    if steps is not None:
        wanted = set(steps)
        unknown = sorted(wanted - {r.step for r in rows})
        if unknown:
            raise ConfigError(f"steps: {unknown} are not checkpoints of {run_dir} ({[r.step for r in rows]})")
        rows = [r for r in rows if r.step in wanted]
    weights = checkpoint_weights(rows, metric, penalty)
    selection = Selection(
        k=len(rows), strategy="checkpoints", weighting=WEIGHTING_OF[metric],
        penalty=None if metric == "uniform" else (DEFAULT_PENALTY if penalty is None else penalty), base_loss=None,
        donors=[SelectedDonor(donor=r.id, loss=r.train_loss if r.train_loss is not None else math.nan, weight=w,
                              path=str(run_dir / r.path)) for r, w in zip(rows, weights)],
    )
    if out is not None:
        selection.write(out)
    return selection


def merge_checkpoints(source: str | Path, out: str | Path, metric: str = "loss", penalty: float | None = None,
                      method: str = "linear", steps: Sequence[int] | None = None, overwrite: bool = True) -> Path:
    """Merge a run's checkpoints with MWA weights into one PEFT adapter; skipped when `out` already holds this merge."""
    from engine.merge import MergeConfig
    from engine.merge.streaming import MERGE_INFO_FILE, merge_with_config

    selection = checkpoint_selection(source, metric, penalty, steps=steps)
    paths = [d.path for d in selection.donors]
    weights = [d.weight for d in selection.donors]
    from engine.core.adapter import fingerprint
    from engine.core.config import validate
    from engine.merge.streaming import merge_key

    config = validate(MergeConfig, {"donors": paths, "weights": weights, "method": method, "out": Path(out),
                                    "overwrite": overwrite}, "merge")
    info = Path(out) / MERGE_INFO_FILE
    if info.exists():  # reused only while its key (method, options, each checkpoint's content and weight) holds
        want = merge_key(config, paths, [w / sum(weights) for w in weights], [fingerprint(p) for p in paths])
        if json.loads(info.read_text()).get("key") == want:
            return Path(out)
    return merge_with_config(config)
