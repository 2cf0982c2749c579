"""From finetune logs to the numbers a report needs: best LR per arm, curves, final scores, parity.

Shared by `mashup run`'s report and the benchmark, so both define 'parity step' the same way: the first
evaluation step at which an arm's mean validation metric reaches the baseline arm's final value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd


@dataclass
class ArmRuns:
    """One arm at one LR: the eval curve of each seed (rows: step, loss, accuracy, seconds)."""

    arm: str
    lr: float | None
    curves: dict[int, pd.DataFrame] = field(default_factory=dict)

    def metric_name(self) -> str:
        any_curve = next(iter(self.curves.values()))
        return "accuracy" if any_curve["accuracy"].notna().any() else "loss"

    def mean_curve(self) -> pd.DataFrame:
        frames = [c.set_index("step")[["loss", "accuracy", "seconds"]] for c in self.curves.values()]
        return pd.concat(frames).groupby(level=0).agg(["mean", "min", "max"])

    def final(self, metric: str) -> list[float]:
        return [float(c[metric].iloc[-1]) for c in self.curves.values()]


def eval_curve(log: pd.DataFrame) -> pd.DataFrame:
    ev = log[log["event"] == "eval"].copy()
    if "accuracy" not in ev:
        ev["accuracy"] = math.nan
    ev["accuracy"] = pd.to_numeric(ev["accuracy"], errors="coerce")
    return ev[["step", "loss", "accuracy", "seconds"]].sort_values("step").reset_index(drop=True)


def load_runs(arm: str, lr: float | None, run_dirs: dict[int, Path]) -> ArmRuns:
    runs = ArmRuns(arm, lr)
    for seed, folder in run_dirs.items():
        runs.curves[seed] = eval_curve(pd.read_parquet(folder / "log.parquet"))
    return runs


def better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "accuracy" else a < b


def best_lr(candidates: Sequence[ArmRuns]) -> ArmRuns:
    """The LR whose final validation metric, averaged over seeds, is best (the paper's per-arm LR choice)."""
    metric = candidates[0].metric_name()
    best = candidates[0]
    for c in candidates[1:]:
        if better(metric, _mean(c.final(metric)), _mean(best.final(metric))):
            best = c
    return best


def parity_step(arm: ArmRuns, target: float, metric: str) -> int | None:
    """First eval step whose seed-mean metric reaches `target`; None if never."""
    curve = arm.mean_curve()[(metric, "mean")]
    for step, value in curve.items():
        if value >= target - 1e-12 if metric == "accuracy" else value <= target + 1e-12:
            return int(step)
    return None


def seconds_at(arm: ArmRuns, step: int) -> float:
    return float(arm.mean_curve().loc[step, ("seconds", "mean")])


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = _mean(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
