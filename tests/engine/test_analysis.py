"""The README's headline figures (best LR, parity step, seconds to parity, mean ± std, the verdict) on logs
built by hand, with every expected number worked out below from the curves, not from the code under test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from engine.analysis import best_lr, load_runs, mean_std, parity_step, seconds_at
from engine.run import ArmSpec, RunConfig, SweepSpec, run_name

STEPS = (0, 10, 20, 30)
LRS = (0.001, 0.01)
SEEDS = (0, 1)
# Validation accuracy at STEPS, per arm / LR / seed.
ACCURACY = {
    ("scratch", 0.001): {0: [0.1, 0.2, 0.3, 0.4], 1: [0.1, 0.2, 0.3, 0.5]},  # final mean 0.45
    ("scratch", 0.01): {0: [0.1, 0.3, 0.5, 0.6], 1: [0.1, 0.3, 0.4, 0.5]},  # final mean 0.55: best LR
    ("mashup", 0.001): {0: [0.3, 0.5, 0.6, 0.7], 1: [0.3, 0.6, 0.7, 0.7]},  # final mean 0.70: best LR
    ("mashup", 0.01): {0: [0.3, 0.4, 0.5, 0.6], 1: [0.3, 0.4, 0.5, 0.6]},  # final mean 0.60
}


def seconds(step: int, seed: int) -> float:
    return 0.5 * step + 0.1 * seed


def write_log(folder: Path, accuracy: list[float] | None, loss: list[float], seed: int) -> None:
    """A finetune log.parquet as TrainLog writes it: train rows between eval rows at STEPS."""
    rows = []
    for i, step in enumerate(STEPS):
        if step:
            rows.append({"step": step, "event": "train", "seconds": seconds(step, seed) - 0.01, "loss": 9.0,
                         "accuracy": None})
        rows.append({"step": step, "event": "eval", "seconds": seconds(step, seed), "loss": loss[i],
                     "accuracy": None if accuracy is None else accuracy[i]})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "log.parquet", index=False)


def run_config(out: Path) -> RunConfig:
    return RunConfig(out=out, base="b", donors=["d"], train=Path("t.jsonl"), val=Path("v.jsonl"),
                     arms=[ArmSpec(name="mashup"), ArmSpec(name="scratch", init="none")],
                     sweep=SweepSpec(lrs=list(LRS), seeds=list(SEEDS)))


@pytest.fixture
def accuracy_run(tmp_path) -> RunConfig:
    cfg = run_config(tmp_path / "run")
    for (arm, lr), by_seed in ACCURACY.items():
        for seed, acc in by_seed.items():
            write_log(cfg.out / "arms" / arm / "runs" / run_name(lr, seed), acc, [2.0 - a for a in acc], seed)
    (cfg.out / "timings.json").write_text(json.dumps({"score": 3.0, "select+merge:mashup": 1.0}))
    return cfg


def candidates(cfg: RunConfig, arm: str):
    return [load_runs(arm, lr, {s: cfg.out / "arms" / arm / "runs" / run_name(lr, s) for s in SEEDS}) for lr in LRS]


def test_best_lr_parity_and_seconds_on_known_curves(accuracy_run):
    scratch, mashup = best_lr(candidates(accuracy_run, "scratch")), best_lr(candidates(accuracy_run, "mashup"))
    assert (scratch.lr, mashup.lr) == (0.01, 0.001)
    assert scratch.metric_name() == "accuracy"
    target, target_std = mean_std(scratch.final("accuracy"))
    assert target == pytest.approx(0.55, abs=1e-12)
    assert target_std == pytest.approx(math.sqrt(((0.6 - 0.55) ** 2 + (0.5 - 0.55) ** 2) / 1), abs=1e-12)
    # mashup's seed-mean curve is 0.30, 0.55, 0.65, 0.70: it reaches 0.55 at step 10, exactly on the target.
    assert parity_step(mashup, target, "accuracy") == 10
    # scratch's own mean curve 0.10, 0.30, 0.45, 0.55 reaches its final value only at the last step.
    assert parity_step(scratch, target, "accuracy") == 30
    assert parity_step(mashup, 0.71, "accuracy") is None
    assert seconds_at(mashup, 10) == pytest.approx((5.0 + 5.1) / 2, abs=1e-12)
    assert mean_std(mashup.final("accuracy")) == pytest.approx((0.7, 0.0), abs=1e-12)
    assert mean_std([1.0]) == (1.0, 0.0)


def test_report_numbers_and_verdict_on_known_curves(accuracy_run):
    from engine.report import collect, verdict

    data = collect(accuracy_run)
    rows = {r["arm"]: r for r in data["rows"]}
    assert data["metric"] == "accuracy" and data["target"] == pytest.approx(0.55, abs=1e-12)
    m, s = rows["mashup"], rows["scratch"]
    assert (m["lr"], m["step0"], m["final"], m["final_std"], m["parity_step"], m["steps"]) == pytest.approx(
        (0.001, 0.3, 0.7, 0.0, 10, 30), abs=1e-12)
    assert m["parity_pct"] == pytest.approx(100 * 10 / 30, abs=1e-9)
    assert m["seconds_to_parity"] == pytest.approx(3.0 + 1.0 + 5.05, abs=1e-12)  # scoring + merge + training
    assert m["final_loss"] == pytest.approx(2.0 - 0.7, abs=1e-12)
    assert (s["parity_step"], s["overhead_seconds"]) == (30, 0.0)
    assert s["seconds_to_parity"] == pytest.approx((15.0 + 15.1) / 2, abs=1e-12)
    assert verdict(data) == [
        "- **mashup: recycling helped.** It reached scratch's final accuracy at step 10 (33% of the budget), "
        "and ended +15.00 pp against scratch (final 0.700 vs 0.550)."]


def test_loss_metric_lower_is_better_everywhere(tmp_path):
    """Without choices the metric is loss: the best LR, parity and the verdict all prefer lower values."""
    from engine.report import collect, verdict

    cfg = run_config(tmp_path / "run")
    losses = {("scratch", 0.001): [3.0, 2.5, 2.0, 1.6], ("scratch", 0.01): [3.0, 2.6, 2.2, 1.9],
              ("mashup", 0.001): [2.0, 1.8, 1.6, 1.5], ("mashup", 0.01): [2.0, 1.9, 1.8, 1.7]}
    for (arm, lr), loss in losses.items():
        for seed in SEEDS:
            write_log(cfg.out / "arms" / arm / "runs" / run_name(lr, seed), None, [x + 0.1 * seed for x in loss], seed)
    data = collect(cfg)
    rows = {r["arm"]: r for r in data["rows"]}
    assert data["metric"] == "loss"
    assert (rows["scratch"]["lr"], rows["mashup"]["lr"]) == (0.001, 0.001)
    assert data["target"] == pytest.approx(1.65, abs=1e-12)  # scratch at 1e-3: (1.6 + 1.7) / 2
    assert rows["mashup"]["parity_step"] == 20  # mashup mean curve 2.05, 1.85, 1.65, 1.55
    assert verdict(data) == [
        "- **mashup: recycling helped.** It reached scratch's final loss at step 20 (67% of the budget), "
        "and ended -0.10 nats against scratch (final 1.550 vs 1.650)."]


def test_benchmark_counts_a_lower_loss_as_a_win(tmp_path):
    """bench/recycling_report: `beats scratch` follows the metric's direction (it counted final > baseline)."""
    from bench.recycling_report import average
    from engine.report import collect

    data = {}
    for target, gap in (("t1", 0.2), ("t2", 0.05)):
        cfg = run_config(tmp_path / target)
        for arm in ("scratch", "mashup"):
            for lr in LRS:
                for seed in SEEDS:
                    start = 3.0 if arm == "scratch" else 3.0 - gap
                    write_log(cfg.out / "arms" / arm / "runs" / run_name(lr, seed), None,
                              [start, start - 0.5, start - 0.8, start - 1.0], seed)
        data[target] = collect(cfg)
    avg = {r["arm"]: r for r in average(data, "scratch")}
    assert avg["mashup"]["wins"] == 2 and avg["scratch"]["wins"] == 0
    assert avg["mashup"]["delta_vs_baseline"] == pytest.approx(-(0.2 + 0.05) / 2, abs=1e-12)


NULL_AND_WIDE = {  # accuracy at STEPS for every LR and seed; scratch and mashup as in ACCURACY (scratch's final: 0.55)
    "random-norm": [0.2, 0.4, 0.55, 0.6],  # the null control reaches 0.55 at step 20 and ends at 0.60
    "scratch-r16": [0.1, 0.3, 0.6, 0.65],  # init none: reaches 0.55 at step 20, ends at 0.65
}


def control_run(out: Path, null_curve: list[float]) -> RunConfig:
    """ACCURACY's two arms plus a random-norm null control and a second init-none arm, logs written by hand."""
    cfg = RunConfig(out=out, base="b", donors=["d"], train=Path("t.jsonl"), val=Path("v.jsonl"),
                    arms=[ArmSpec(name="mashup"), ArmSpec(name="random-norm", merge={"method": "random-norm"}),
                          ArmSpec(name="scratch-r16", init="none"), ArmSpec(name="scratch", init="none")],
                    sweep=SweepSpec(lrs=list(LRS), seeds=list(SEEDS)))
    curves = {**ACCURACY, **{(arm, lr): {s: acc for s in SEEDS} for arm, acc in
                             {**NULL_AND_WIDE, "random-norm": null_curve}.items() for lr in LRS}}
    for (arm, lr), by_seed in curves.items():
        for seed, acc in by_seed.items():
            write_log(cfg.out / "arms" / arm / "runs" / run_name(lr, seed), acc, [2.0 - a for a in acc], seed)
    return cfg


def test_verdict_never_credits_a_null_control_or_an_init_none_arm(tmp_path):
    """A null control at parity casts doubt on the recycled arm's gain; neither it nor an init-none arm that beats
    the baseline is "recycling helped" (the old verdict said so of every arm that beat scratch)."""
    from engine.report import collect, render, verdict

    cfg = control_run(tmp_path / "run", NULL_AND_WIDE["random-norm"])
    data = collect(cfg)
    assert {r["arm"]: r["role"] for r in data["rows"]} == {
        "mashup": "recycled", "random-norm": "null control", "scratch-r16": "no donors", "scratch": "no donors"}
    caution = "the null control random-norm also reaches parity: the gain may not come from the donors' directions"
    lines = verdict(data)
    assert lines == [
        "- **mashup: beat scratch, but not shown to be recycling.** It reached scratch's final accuracy at step 10 "
        "(33% of the budget), and ended +15.00 pp against scratch (final 0.700 vs 0.550). However, " + caution
        + "; mashup ends ahead of random-norm (0.700 vs 0.600).",
        "- **random-norm: null control, reaches parity.** It reached scratch's final accuracy at step 20 (67% of the "
        "budget), and ended +5.00 pp against scratch (final 0.600 vs 0.550). T" + caution[1:] + ".",
        "- **scratch-r16: no donors (init: none), not a recycling arm.** It reached scratch's final accuracy at step 20 "
        "(67% of the budget), and ended +10.00 pp against scratch (final 0.650 vs 0.550)."]
    report = render(cfg, data, [])
    assert all(line in report for line in lines)
    assert "recycling helped" not in report


def test_verdict_credits_recycling_when_the_null_control_stays_short(tmp_path):
    from engine.report import collect, render, verdict

    cfg = control_run(tmp_path / "run", [0.1, 0.2, 0.3, 0.4])  # the null control never reaches scratch's 0.55
    data = collect(cfg)
    lines = verdict(data)
    assert lines[0].startswith("- **mashup: recycling helped.** It reached scratch's final accuracy at step 10")
    assert lines[0].endswith("(final 0.700 vs 0.550).")
    assert lines[1].startswith("- **random-norm: null control, does not reach parity.** It never reached")
    assert "recycling helped" not in " ".join(lines[1:])
    assert lines[0] in render(cfg, data, [])
