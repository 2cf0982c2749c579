"""The run report: selected donors, per-arm results with parity against the baseline, stage timings, plots.

Written atomically (temp file + rename) as `report.md` beside `results.json` and `plots/*.png`, so a person
sees, honestly, whether recycling helped: the verdict line is computed from the same numbers as the table.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from engine.analysis import ArmRuns, best_lr, load_runs, mean_std, parity_step, seconds_at
from engine.core.atomic import atomic_write_text
from engine.core.scores import BASE_ROW


def _final_eval(cfg, run_dir: Path) -> dict[str, Any]:
    """Held-out evaluation of a finished run's adapter, cached beside it under a key of the adapter's content,
    the eval file's bytes and the base's fingerprint: a retrained run or an edited eval file is evaluated again."""
    from engine.core.adapter import fingerprint, sha256_file
    from engine.core.identity import base_fingerprint, key_of

    key = key_of([fingerprint(run_dir / "adapter"), sha256_file(cfg.eval), base_fingerprint(cfg.base)[1]])
    cache = run_dir / "final_eval.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["result"]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.core.data import load_jsonl
    from engine.evaluate import evaluate

    from engine.finetune.outputs import INFO_FILE

    info = run_dir / "adapter" / INFO_FILE
    ft = json.loads(info.read_text()).get("config", {}) if info.exists() else {}
    tok = AutoTokenizer.from_pretrained(cfg.base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32, use_safetensors=True),
                                      str(run_dir / "adapter"))
    result = evaluate(model, tok, load_jsonl(cfg.eval), chat_template=bool(ft.get("chat_template", False))).summary()
    atomic_write_text(cache, json.dumps({"key": key, "result": result}))
    return result


def trainable_shape(adapter: Path) -> dict[str, Any]:
    """r, lora_alpha and the number of trainable parameters of a finished run's adapter (every LoRA factor is
    trained, from a merge or from scratch), read from its config and safetensors header; None when it is absent."""
    from safetensors import safe_open

    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not (config.is_file() and weights.is_file()):
        return {"rank": None, "alpha": None, "trainable_params": None}
    settings = json.loads(config.read_text())
    with safe_open(str(weights), framework="pt") as f:
        params = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return {"rank": settings.get("r"), "alpha": settings.get("lora_alpha"), "trainable_params": params}


def _merge_overhead(timings: dict[str, float], cfg, spec) -> float:
    """Seconds of select+merge behind one run of the arm (one draw's, for arms drawn per seed)."""

    spent = [timings.get(cfg.merge_timing_key(spec.name, seed), 0.0) for seed in cfg.draw_seeds(spec)]
    return sum(spent) / len(spent)


def collect(cfg) -> dict[str, Any]:
    from engine.core.scores import read_scores

    arms: dict[str, ArmRuns] = {}
    for arm in cfg.arms:
        candidates = [load_runs(arm.name, lr, {s: cfg.run_dir(arm, lr, s) for s in cfg.sweep.seeds})
                      for lr in cfg.lrs()]
        arms[arm.name] = best_lr(candidates)
    metric = arms[cfg.baseline].metric_name()
    target = mean_std(arms[cfg.baseline].final(metric))[0]
    timings = json.loads((cfg.out / "timings.json").read_text()) if (cfg.out / "timings.json").exists() else {}
    scores = read_scores(cfg.out / "score") if (cfg.out / "score").exists() else None
    rows = []
    for spec in cfg.arms:
        runs = arms[spec.name]
        curve = runs.mean_curve()
        step = parity_step(runs, target, metric)
        overhead = timings.get("score", 0.0) + _merge_overhead(timings, cfg, spec) if spec.init == "merge" else 0.0
        final_m, final_s = mean_std(runs.final(metric))
        row = {
            "arm": spec.name, "init": spec.init, "lr": runs.lr, "seeds": len(runs.curves),
            "metric": metric, "step0": float(curve[(metric, "mean")].iloc[0]),
            "final": final_m, "final_std": final_s, "final_loss": mean_std(runs.final("loss"))[0],
            "steps": int(curve.index.max()), "parity_step": step,
            "parity_pct": None if step is None else 100.0 * step / max(1, int(curve.index.max())),
            "seconds_to_parity": None if step is None else overhead + seconds_at(runs, step),
            "overhead_seconds": overhead,
            **trainable_shape(cfg.run_dir(spec, runs.lr, next(iter(runs.curves))) / "adapter"),
        }
        if cfg.eval is not None:
            evals = [_final_eval(cfg, cfg.run_dir(spec, runs.lr, s)) for s in runs.curves]
            key = "accuracy" if evals[0].get("accuracy") is not None else "loss"
            row["heldout_metric"] = key
            row["heldout"], row["heldout_std"] = mean_std([e[key] for e in evals])
        rows.append(row)
    selections = {}
    for a in cfg.arms:
        for seed in cfg.draw_seeds(a):
            path = cfg.merge_home(a, seed) / "selection.json"
            if a.init == "merge" and path.exists():
                selections[a.name if seed is None else f"{a.name} (draw for seed {seed})"] = json.loads(path.read_text())
    from engine.checkpoint_arm import report_rows

    return {"metric": metric, "baseline": cfg.baseline, "target": target, "rows": rows, "timings": timings,
            "selections": selections, "arms": arms, "scores": scores, "checkpoint_merge": report_rows(cfg, arms, rows)}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def plot(data: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("accuracy", "loss"):
        if metric == "accuracy" and data["metric"] != "accuracy":
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, runs in data["arms"].items():
            c = runs.mean_curve()[metric]
            ax.plot(c.index, c["mean"], marker="o", ms=3, label=f"{name} (lr {runs.lr})" if runs.lr else name)
            ax.fill_between(c.index, c["min"], c["max"], alpha=0.15)
        if metric == data["metric"]:
            ax.axhline(data["target"], ls="--", lw=1, color="gray", label=f"{data['baseline']} final")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {metric}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"val_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def verdict(data: dict[str, Any]) -> list[str]:
    base = next(r for r in data["rows"] if r["arm"] == data["baseline"])
    lines = []
    for r in data["rows"]:
        if r["arm"] == data["baseline"]:
            continue
        delta = r["final"] - base["final"]
        sign = 100.0 if data["metric"] == "accuracy" else 1.0
        gain = delta if data["metric"] == "accuracy" else -delta
        reached = (f"reached {data['baseline']}'s final {data['metric']} at step {r['parity_step']} "
                   f"({r['parity_pct']:.0f}% of the budget)") if r["parity_step"] is not None else (
                   f"never reached {data['baseline']}'s final {data['metric']}")
        helped = "helped" if gain > 0 and r["parity_step"] is not None and r["parity_step"] < base["steps"] else "did not help"
        unit = "pp" if data["metric"] == "accuracy" else "nats"
        lines.append(f"- **{r['arm']}: recycling {helped}.** It {reached}, and ended {delta * sign:+.2f} {unit} "
                     f"against {data['baseline']} (final {_fmt(r['final'])} vs {_fmt(base['final'])}).")
    return lines


def ranking_table(donors, top: int = 12) -> list[str]:
    """The pool ranked both ways: by loss (our default) and by token accuracy (the Mashup authors' default)."""
    if donors.empty:
        return []
    by_loss = donors.sort_values(["loss", "donor"]).reset_index(drop=True)
    acc_rank = {d: i + 1 for i, d in enumerate(donors.assign(neg=-donors.token_accuracy)
                                               .sort_values(["neg", "loss", "donor"]).donor)}
    lines = [f"Donors ranked by loss and by token accuracy (best {min(top, len(by_loss))} by loss; "
             "`select.metric` chooses which ranking selects):", "",
             "| donor | loss | rank by loss | token accuracy | rank by token accuracy |", "|---|---|---|---|---|"]
    for i, row in by_loss.head(top).iterrows():
        lines.append(f"| {row.donor} | {_fmt(row.loss)} | {i + 1} | {_fmt(row.token_accuracy)} | "
                     f"{acc_rank[row.donor]} |")
    return lines + [""]


def render(cfg, data: dict[str, Any], plots: list[Path]) -> str:
    m = data["metric"]
    out = [f"# mashup run report", "", f"*{time.strftime('%Y-%m-%d %H:%M')}* — base `{cfg.base}`, task `{cfg.train}`, "
           f"validation `{cfg.val}`, held-out `{cfg.eval}`.", "", "## Verdict", "", *verdict(data), ""]
    scores = data["scores"]
    if scores is not None and len(scores):
        from engine.selection import full_sample_rows

        ok = full_sample_rows(scores)[0]
        ok = ok[ok.status == "ok"]
        base = ok[ok.donor == BASE_ROW]
        out += ["## Scoring", "", f"{len(ok) - len(base)} donors scored, {int((scores.status == 'failed').sum())} failed; "
                f"base loss {_fmt(float(base.loss.iloc[0]) if len(base) else None)} nats/token.", ""]
        out += ranking_table(ok[ok.donor != BASE_ROW])
    for arm, sel in data["selections"].items():
        out += [f"### Selected for `{arm}` ({sel['strategy']} by {sel.get('metric', 'loss')}, k={sel['k']}, "
                f"{sel['weighting']})", "",
                "| donor | loss | token accuracy | weight |", "|---|---|---|---|",
                *[f"| {d['donor']} | {_fmt(d['loss'])} | {_fmt(d.get('token_accuracy'))} | {_fmt(d['weight'])} |"
                  for d in sel["donors"]], ""]
    held = "heldout" in data["rows"][0]
    out += ["## Results", "", f"Validation {m}, mean ± std over seeds at each arm's best LR. Parity: the first evaluation "
            f"at which the arm's mean reaches `{data['baseline']}`'s final value. Wall-clock to parity includes scoring and "
            "merge for recycled arms.", "",
            "| arm | rank / alpha | trainable params | best LR | step-0 | final ± std | final loss | "
            + ("held-out ± std | " if held else "") + "parity step (% budget) | wall-clock to parity |",
            "|---|---|---|---|---|---|---|" + ("---|" if held else "") + "---|---|"]
    for r in data["rows"]:
        parity = "never" if r["parity_step"] is None else f"{r['parity_step']} ({r['parity_pct']:.0f}%)"
        secs = "—" if r["seconds_to_parity"] is None else f"{r['seconds_to_parity']:.1f}s"
        ho = f"{_fmt(r['heldout'])} ± {_fmt(r['heldout_std'])} | " if held else ""
        shape = "—" if r.get("rank") is None else f"{r['rank']} / {r['alpha']:g}"
        params = "—" if r.get("trainable_params") is None else f"{r['trainable_params']:,}"
        out.append(f"| {r['arm']} | {shape} | {params} | {r['lr'] if r['lr'] is not None else 'config'} | {_fmt(r['step0'])} | "
                   f"{_fmt(r['final'])} ± {_fmt(r['final_std'])} | {_fmt(r['final_loss'])} | {ho}{parity} | {secs} |")
    from engine.checkpoint_arm import render_rows

    out += ["", *render_rows(data.get("checkpoint_merge", [])),
            "## Wall-clock per stage", "", "| stage | seconds |", "|---|---|",
            *[f"| {k} | {v:.1f} |" for k, v in data["timings"].items()], "", "## Curves", "",
            *[f"![{p.stem}](plots/{p.name})" for p in plots], ""]
    return "\n".join(out)


def write_report(cfg) -> Path:
    data = collect(cfg)
    plots = plot(data, cfg.out / "plots")
    text = render(cfg, data, plots)
    results = {k: v for k, v in data.items() if k not in ("arms", "scores")}
    for path, content in ((cfg.out / "results.json", json.dumps(results, indent=1, default=str)),
                          (cfg.out / "report.md", text)):
        atomic_write_text(path, content)
    return cfg.out / "report.md"
