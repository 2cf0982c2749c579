"""bench_mwa's tables and verdict: every merge rule against the uniform average and against the final checkpoint.

Means are over every target × seed; ± is the std over seeds of the per-seed mean over targets. Δ are paired (the same
run's checkpoints under two rules), averaged over runs. The verdict lines are computed from the same numbers.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from engine.analysis import mean_std
from engine.core.atomic import atomic_write_text

README_BLOCK = "bench-mwa"
METRICS = ("val_accuracy", "val_loss", "eval_accuracy", "eval_loss", "weight_last")


def _pairs(runs: dict[str, dict[int, dict]]) -> list[dict[str, dict[str, float]]]:
    return [r["rules"] for per_seed in runs.values() for r in per_seed.values()]


def summarize(runs: dict[str, dict[int, dict]], rules: list[str]) -> list[dict[str, Any]]:
    pairs = _pairs(runs)
    seeds = sorted({s for per_seed in runs.values() for s in per_seed})
    out = []
    for rule in rules:
        row: dict[str, Any] = {"rule": rule}
        for m in METRICS:
            row[m] = mean_std([p[rule][m] for p in pairs])[0]
        per_seed = [mean_std([runs[t][s]["rules"][rule]["eval_accuracy"] for t in runs if s in runs[t]])[0] for s in seeds]
        row["eval_accuracy_std"] = mean_std(per_seed)[1]
        for ref in ("uniform", "final"):
            deltas = [p[rule]["eval_accuracy"] - p[ref]["eval_accuracy"] for p in pairs]
            row[f"delta_vs_{ref}_pp"] = 100 * mean_std(deltas)[0]
            row[f"wins_vs_{ref}"] = sum(d > 1e-12 for d in deltas)
            row[f"losses_vs_{ref}"] = sum(d < -1e-12 for d in deltas)
        row["runs"] = len(pairs)
        out.append(row)
    return out


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["rule"]: r for r in rows}
    loss_rules = [r for r in rows if r["rule"].startswith("loss")]
    step_rules = [r for r in rows if r["rule"].startswith("step")]
    lines = []
    if loss_rules:
        best = max(loss_rules, key=lambda r: r["eval_accuracy"])
        lo, hi = min(r["delta_vs_uniform_pp"] for r in loss_rules), max(r["delta_vs_uniform_pp"] for r in loss_rules)
        holds = all(r["delta_vs_uniform_pp"] > 0 for r in loss_rules)
        lines.append(f"- **Loss-weighted vs uniform: {lo:+.1f} to {hi:+.1f} pp** held-out accuracy over the p tried "
                     f"(best {best['rule']}: {best['eval_accuracy']:.3f} vs {by['uniform']['eval_accuracy']:.3f}, better on "
                     f"{best['wins_vs_uniform']}/{best['runs']} runs). The paper's claim (loss-weighted beats uniform, by up "
                     f"to 5 pp) {'holds' if holds else 'holds only for some p' if hi > 0 else 'does not hold'} here.")
    if step_rules:
        best = max(step_rules, key=lambda r: r["eval_accuracy"])
        lines.append(f"- **Step-weighted vs uniform:** best {best['rule']} {best['delta_vs_uniform_pp']:+.1f} pp "
                     f"({best['eval_accuracy']:.3f}).")
    merges = [r for r in rows if r["rule"] != "final"]
    winners = [r for r in merges if r["delta_vs_final_pp"] > 0]
    top = max(merges, key=lambda r: r["delta_vs_final_pp"])
    if winners:
        noise = all(r["delta_vs_final_pp"] < 1.0 for r in winners)
        lines.append(f"- **Merges that beat the final checkpoint (mean over runs):** "
                     + ", ".join(f"{r['rule']} ({r['delta_vs_final_pp']:+.1f} pp, {r['wins_vs_final']}/{r['runs']} runs)"
                                 for r in winners)
                     + (": by under 1 pp, within noise." if noise else "."))
    else:
        lines.append(f"- **No merge beats the final checkpoint** on average: the closest is {top['rule']} "
                     f"({top['delta_vs_final_pp']:+.1f} pp; better on {top['wins_vs_final']}/{top['runs']} runs, worse on "
                     f"{top['losses_vs_final']}). Final: {by['final']['eval_accuracy']:.3f}.")
    best_loss = min(merges, key=lambda r: r["eval_loss"])
    final_loss = by["final"]["eval_loss"]
    lines.append(f"- **Held-out loss:** final checkpoint {final_loss:.3f}; best merge {best_loss['rule']} "
                 f"{best_loss['eval_loss']:.3f} ({'better' if best_loss['eval_loss'] < final_loss else 'worse'} than final).")
    return lines


def _fmt(x: float | None, d: int = 3) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def render(cfg, rows: list[dict[str, Any]], per_target: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    ft = cfg.finetune
    lines = [f"Measured {meta['date']} on {meta['machine']}, {meta['cores']} cores, torch {meta['torch']}. Command: "
             f"`{meta['command']}` ({meta['seconds'] / 60:.1f} min for this invocation; cached runs, merges and "
             "evaluations are reused).", "",
             f"{len(cfg.targets)} targets ({', '.join(cfg.targets)}) × seeds {cfg.seeds}; each run: LoRA r{ft['lora']['r']} from "
             f"scratch, {ft['steps']} steps × batch {ft['batch_size']}, lr {ft['lr']:g} (cosine, {ft.get('warmup_steps', 0)} "
             f"warm-up), a checkpoint every {ft['save_every']} steps ({ft['steps'] // ft['save_every']} checkpoints); merges "
             f"`{cfg.method}` (mean of A, mean of B) over all of them. Accuracy: 4-way multiple choice; loss: nats per "
             "completion token. Δ: paired, held-out (eval split) accuracy.", "",
             "| rule | val acc | val loss | held-out acc ± std | held-out loss | Δ vs uniform (pp) | Δ vs final (pp) | "
             "beats final | weight on last ckpt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {_fmt(r['val_accuracy'])} | {_fmt(r['val_loss'])} | {_fmt(r['eval_accuracy'])} ± "
                     f"{_fmt(r['eval_accuracy_std'])} | {_fmt(r['eval_loss'])} | {r['delta_vs_uniform_pp']:+.1f} | "
                     f"{r['delta_vs_final_pp']:+.1f} | {r['wins_vs_final']}/{r['runs']} | {_fmt(r['weight_last'], 2)} |")
    lines += ["", *verdict(rows)]
    return "\n".join(lines)


def render_targets(per_target: dict[str, dict[str, float]], rules: list[str]) -> str:
    targets = list(per_target)
    lines = ["Held-out accuracy per target (mean over seeds):", "", "| rule | " + " | ".join(targets) + " |",
             "|---|" + "---|" * len(targets)]
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(_fmt(per_target[t][rule]) for t in targets) + " |")
    return "\n".join(lines)


def write_summary(cfg, runs: dict[str, dict[int, dict]], seconds: float,
                  command: str = "python -m bench.bench_mwa --readme") -> Path:
    """mwa.json (every run's numbers and the summary) and mwa.md; README's block when cfg.readme."""
    import torch

    rules = [name for name, _, _ in cfg.rules()]
    rows = summarize(runs, rules)
    per_target = {t: {rule: mean_std([r["rules"][rule]["eval_accuracy"] for r in per_seed.values()])[0] for rule in rules}
                  for t, per_seed in runs.items()}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "seconds": seconds, "command": command}
    text = render(cfg, rows, per_target, meta)
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": cfg.model_dump(mode="json"), "meta": meta, "summary": rows, "per_target": per_target,
               "verdict": verdict(rows), "runs": {t: {str(s): r for s, r in v.items()} for t, v in runs.items()}}
    atomic_write_text(results, json.dumps(payload, indent=1))
    atomic_write_text(results.with_suffix(".md"), "# MWA checkpoint merging (bench/bench_mwa.py)\n\n" + text + "\n\n"
                      + render_targets(per_target, rules) + "\n")
    if cfg.readme:
        from bench.readme import replace_block

        replace_block(getattr(cfg, "readme_block", README_BLOCK), text)
    return results
