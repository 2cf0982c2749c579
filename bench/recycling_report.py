"""The benchmark's tables and figure, in the shape of the paper's: per target and averaged over targets.

Numbers come from `engine.report.collect`, the same function behind `mashup run`'s report, so the parity step,
best LR and wall-clock to parity mean the same thing in both. Averages: step-0 and parity are means over targets;
final ± std is the std over seeds of the per-seed mean over targets.
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from engine.analysis import better, mean_std
from engine.core.atomic import atomic_write_text

def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "never" if x is None else f"{x:.0f}%"


def per_target(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`collect` per target; a choose arm's row also carries its pick and the held-out rows' pick (`chosen`)."""
    from bench.merge_calls import HeldOut, chosen_summary
    from engine.report import collect

    data, helds = {}, {}  # one evaluator per base and cache file: the targets of a world share one base, loaded once
    for t, rc in runs.items():
        data[t] = collect(rc)
        key = (rc.base, rc.out.parent / "heldout.json")
        held = helds.get(key) or helds.setdefault(key, HeldOut(*key, margin=0))
        for row in data[t]["rows"]:
            arm = next(a for a in rc.arms if a.name == row["arm"])
            if arm.choose is not None:
                row["chosen"] = chosen_summary(rc, arm, held, generation=False)
    return data


def average(data: dict[str, dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """One row per arm over all targets; wall-clock is relative to the baseline's time to its own final value.

    A "win" is a target where the arm's final value is better than the baseline's in the metric's own direction
    (higher accuracy, lower loss), as `engine.analysis.better` defines it for the report's parity.
    """
    arms = [r["arm"] for r in next(iter(data.values()))["rows"]]
    base = {t: next(r for r in d["rows"] if r["arm"] == baseline) for t, d in data.items()}
    base_final = mean_std([r["final"] for r in base.values()])[0]
    out = []
    for arm in arms:
        rows = {t: next(r for r in d["rows"] if r["arm"] == arm) for t, d in data.items()}
        per_seed: dict[int, list[float]] = {}
        for t, d in data.items():
            runs = d["arms"][arm]
            for seed, value in zip(runs.curves, runs.final(d["metric"])):
                per_seed.setdefault(seed, []).append(value)
        final_m, final_s = mean_std([sum(v) / len(v) for v in per_seed.values()])
        reached = [r["parity_pct"] for r in rows.values() if r["parity_pct"] is not None]
        clock = [rows[t]["seconds_to_parity"] / base[t]["seconds_to_parity"] for t in rows
                 if rows[t]["seconds_to_parity"] is not None and base[t]["seconds_to_parity"]]
        held = [r["heldout"] for r in rows.values() if "heldout" in r]
        out.append({
            "arm": arm, "targets": len(rows), "step0": mean_std([r["step0"] for r in rows.values()])[0],
            "final": final_m, "final_std": final_s,
            "delta_vs_baseline": final_m - base_final,
            "heldout": mean_std(held)[0] if held else None,
            "wins": sum(_wins(data[t]["metric"], rows[t]["final"], base[t]["final"]) for t in rows),
            "parity_reached": len(reached), "parity_pct_mean": sum(reached) / len(reached) if reached else None,
            "wallclock_to_parity_vs_baseline": sum(clock) / len(clock) if clock else None,
            "lrs": {t: r["lr"] for t, r in rows.items()},
            **{key: _same([r.get(key) for r in rows.values()]) for key in ("rank", "alpha", "trainable_params")},
        })
    return out


def _same(values: list[Any]) -> Any:
    """The one value every target shares, else the list (an arm whose rank differs by target, e.g. `cat`)."""
    return values[0] if len(set(map(str, values))) == 1 else values


def _shape(r: dict[str, Any]) -> str:
    if r.get("rank") is None or isinstance(r["rank"], list) or isinstance(r.get("trainable_params"), list):
        return "varies" if isinstance(r.get("rank"), list) else "—"
    return f"{r['rank']} / {r['alpha']:g} ({r['trainable_params']:,})"


def _wins(metric: str, final: float, baseline_final: float) -> bool:
    """Better than the baseline by more than rounding noise, in the metric's direction."""
    return better(metric, final, baseline_final) and abs(final - baseline_final) > 1e-9


def plot_curves(data: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data) + ["average"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    metric = next(iter(data.values()))["metric"]
    sums: dict[str, Any] = {}
    for ax, name in zip(axes.flat, names):
        for arm in next(iter(data.values()))["arms"]:
            if name == "average":
                curve = sums[arm] / len(data)
            else:
                curve = data[name]["arms"][arm].mean_curve()[(metric, "mean")]
                sums[arm] = curve if arm not in sums else sums[arm] + curve
            ax.plot(curve.index, curve.values, marker="o", ms=2, lw=1.2, label=arm)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(f"val {metric}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(cfg, avg: list[dict[str, Any]], data: dict[str, dict[str, Any]], curves: Path,
           calls: list[dict[str, Any]] = ()) -> str:
    from bench.merge_calls import render_calls, render_choices

    metric = next(iter(data.values()))["metric"]
    unit = "pp" if metric == "accuracy" else "nats"
    scale = 100.0 if metric == "accuracy" else 1.0
    n = len(data)
    lines = [f"Validation {metric} of {n} leave-one-out target(s), seeds {cfg.sweep.seeds}, LRs "
             f"{cfg.sweep.lrs or [cfg.finetune.lr]} (best per arm and target on validation), "
             f"{cfg.finetune.steps} steps. Parity: % of the budget at which the arm first reaches "
             f"`{cfg.baseline}`'s final value (mean over the targets where it does). Wall-clock to parity includes "
             f"scoring and merge, relative to `{cfg.baseline}`'s time to reach its own final value.", "",
             f"| arm | rank / alpha (trainable params) | step-0 | final ± std | Δ vs {cfg.baseline} ({unit}) | held-out | "
             f"beats {cfg.baseline} | parity step | wall-clock to parity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in avg:
        clock = "—" if r["wallclock_to_parity_vs_baseline"] is None else f"{100 * r['wallclock_to_parity_vs_baseline']:.0f}%"
        lines.append(f"| {r['arm']} | {_shape(r)} | {_fmt(r['step0'])} | {_fmt(r['final'])} ± {_fmt(r['final_std'])} | "
                     f"{r['delta_vs_baseline'] * scale:+.1f} | {_fmt(r['heldout'])} | {r['wins']}/{n} | "
                     f"{_pct(r['parity_pct_mean'])} ({r['parity_reached']}/{n}) | {clock} |")
    lines += render_calls(list(calls)) + render_choices(data)
    lines += ["", f"![curves]({curves.name})", "", "### Per target", "",
              "| target | arm | LR | step-0 | final ± std | held-out | parity step | wall-clock to parity |",
              "|---|---|---|---|---|---|---|---|"]
    for t, d in data.items():
        for r in d["rows"]:
            secs = "—" if r["seconds_to_parity"] is None else f"{r['seconds_to_parity']:.1f}s"
            lines.append(f"| {t} | {r['arm']} | {r['lr']} | {_fmt(r['step0'])} | {_fmt(r['final'])} ± "
                         f"{_fmt(r['final_std'])} | {_fmt(r.get('heldout'))} | {_pct(r['parity_pct'])} | {secs} |")
    lines += ["", "### Donors selected", "", "| target | arm | donors (loss, weight) |", "|---|---|---|"]
    for t, d in data.items():
        for arm, sel in d["selections"].items():
            if sel["strategy"] == "all":
                continue
            picked = ", ".join(f"{x['donor']} ({x['loss']:.2f}, {x['weight']:.2f})" for x in sel["donors"])
            lines.append(f"| {t} | {arm} | {picked} |")
    return "\n".join(lines) + "\n"


def write_summary(cfg, runs: dict[str, Any]) -> Path:
    """recycling.json (numbers), recycling.md (tables), recycling_curves.png; the README block when asked."""
    from bench.merge_calls import merge_calls, recycling_arms

    data = per_target(runs)
    avg = average(data, cfg.baseline)
    calls = merge_calls(data, cfg.baseline, recycling_arms(cfg.arms))
    stem = cfg.results.with_suffix("")
    curves = plot_curves(data, stem.parent / f"{stem.name}_curves.png")
    text = render(cfg, avg, data, curves, calls)
    import torch

    summary = {
        "date": time.strftime("%Y-%m-%d"), "command": f"python -m bench.bench_recycling --config <config> ({cfg.world})",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}",
        "config": json.loads(cfg.model_dump_json()), "average": avg, "merge_calls": calls,
        "targets": {t: {k: v for k, v in d.items() if k not in ("arms", "scores")} for t, d in data.items()},
    }
    atomic_write_text(cfg.results, json.dumps(summary, indent=1, default=str))
    atomic_write_text(stem.parent / f"{stem.name}.md", text)
    if cfg.readme:
        from bench.readme import replace_block

        table = text.split("### Per target")[0].replace(f"]({curves.name})", f"]({curves.as_posix()})")
        replace_block(cfg.readme_block, f"Measured {summary['date']} on {summary['machine']}.\n\n{table}")
    return cfg.results
