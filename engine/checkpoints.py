"""A finetune run's checkpoints as a donor pool, weighted by Metrics-Weighted Averaging (arXiv 2504.18580).

`mashup finetune --save-every N` leaves `checkpoints/step-N/` and describes them in a donor manifest
(`checkpoints.jsonl`, engine/core/run_folder.py) with each checkpoint's step and training loss; this module
weights them as the MWA paper does: w_i ∝ train_loss_i^(-p) ("loss") or w_i ∝ step_i^p ("step"), normalised
to sum 1, one penalty p for any number of checkpoints; p = 0 is the uniform average. No scoring is needed: the
metrics come from the run's own log, so `mashup checkpoints RUN --metric loss` + `mashup merge --selection` merges a
run the way the paper does.

It sits above the stages (docs/architecture.md): it joins what finetuning wrote, selection's weighting and the
merge, as `mashup run` joins the stages, so no stage has to import another.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Sequence

from engine.core.errors import ConfigError, DataError
from engine.core.run_folder import (  # noqa: F401 - the manifest is the run folder's; re-exported for its readers
    MANIFEST_FILE, Checkpoint, checkpoint_rows, read_manifest, write_manifest,
)

Metric = Literal["loss", "step", "uniform"]
METRICS: tuple[str, ...] = ("loss", "step", "uniform")
# The paper's formula has one hyperparameter, the penalty p. Its text was not reachable from here, so the default is
# p = 1 (w ∝ 1/loss, w ∝ step: the plain inverse-metric / proportional weighting, and this project's existing `mwa`
# default); bench/bench_mwa.py sweeps p. See docs/mwa.md.
DEFAULT_PENALTY = 1.0
WEIGHTING_OF = {"loss": "mwa", "step": "mwa-steps", "uniform": "uniform"}


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
