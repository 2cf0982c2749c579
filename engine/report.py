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
    """Held-out evaluation of a finished run's adapter in the run's prompt format, cached beside it under a key of
    the adapter's content, the eval file's bytes, the base's fingerprint and the format (the plain format adds
    nothing, so older caches stay valid): a retrained run, an edited eval file or another format is evaluated again."""
    from engine.core.adapter import fingerprint, sha256_file
    from engine.core.identity import base_fingerprint, key_of

    parts = [fingerprint(run_dir / "adapter"), sha256_file(cfg.eval), base_fingerprint(cfg.base)[1]]
    key = key_of(parts + (["chat_template"] if cfg.chat_template else []))
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

    tok = AutoTokenizer.from_pretrained(cfg.base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32, use_safetensors=True),
                                      str(run_dir / "adapter"))
    result = evaluate(model, tok, load_jsonl(cfg.eval), chat_template=cfg.chat_template).summary()
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


RECYCLED, NULL_CONTROL, NO_DONORS = "recycled", "null control", "no donors"


def arm_role(cfg, spec) -> str:
    """What an arm can show: `recycled` (trained from a merge of the selected donors), `null control` (a merge
    with the donors' scale and none of their directions, e.g. random-norm) or `no donors` (init: none). Only a
    recycled arm can be credited with a gain from recycling."""
    from engine.merge.registry import NULL_CONTROLS

    if spec.init != "merge" or (spec.choose is not None and cfg.init_adapter(spec, None) is None):
        return NO_DONORS  # a choose arm that chose a fresh LoRA trains from no donor
    return NULL_CONTROL if cfg.merge_config(spec, cfg.draw_seeds(spec)[0]).method in NULL_CONTROLS else RECYCLED


def collect(cfg) -> dict[str, Any]:
    """Every number of the report (and results.json) from the run's folder: per arm at its best LR, the
    curves' finals, parity against the baseline, wall-clock, held-out scores, plus the run's encoding."""
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
            "arm": spec.name, "init": spec.init, "role": arm_role(cfg, spec), "lr": runs.lr, "seeds": len(runs.curves),
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
    from engine.merge_choice import read_choices

    return {"metric": metric, "baseline": cfg.baseline, "target": target, "rows": rows, "timings": timings,
            "encoding": {**cfg.encoding(), "score_sample": _ranked_sample(cfg)}, "selections": selections,
            "arms": arms, "scores": scores, "checkpoint_merge": report_rows(cfg, arms, rows),
            "resumed": resumed_runs(cfg), "choices": read_choices(cfg)}


def resumed_runs(cfg) -> list[dict[str, Any]]:
    """Every finetune run that was killed and resumed (its log's `resume` rows): from which step, how many steps
    the kill lost. Their wall-clock already counts the lost work (engine/finetune/resume.py)."""
    from engine.finetune.outputs import LOG_JSONL, read_log
    from engine.run_config import run_name

    out = []
    for arm in cfg.arms:
        for lr in cfg.lrs():
            for seed in cfg.sweep.seeds:
                folder = cfg.run_dir(arm, lr, seed)
                if (folder / LOG_JSONL).exists():
                    out += [{"run": f"{arm.name}/{run_name(lr, seed)}", "from_step": r["step"],
                             "lost_steps": r.get("lost_steps")} for r in read_log(folder) if r["event"] == "resume"]
    return out


def _ranked_sample(cfg) -> str | None:
    """The sample id the donors were ranked on (its token ids carry the prompt format), as the run recorded it."""
    scope = run_scope(cfg)
    return None if scope is None else scope.sample_id


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
    """One line per arm against the baseline, from the table's numbers. Only a recycled arm is ever credited
    ("recycling helped"): an init-none arm has no donors, and a null control (the merge's scale, none of the donors'
    directions) that also reaches parity means a recycled arm's gain may not come from the donors at all."""
    rows, baseline, metric = data["rows"], data["baseline"], data["metric"]
    base = next(r for r in rows if r["arm"] == baseline)
    nulls = [r for r in rows if r.get("role") == NULL_CONTROL and r["arm"] != baseline and r["parity_step"] is not None]
    caution = (f"the null control{'s' if len(nulls) > 1 else ''} {', '.join(r['arm'] for r in nulls)} also "
               f"reach{'' if len(nulls) > 1 else 'es'} parity: the gain may not come from the donors' directions")
    sign, unit = (100.0, "pp") if metric == "accuracy" else (1.0, "nats")
    lines = []
    for r in rows:
        if r["arm"] == baseline:
            continue
        delta = r["final"] - base["final"]
        gain = delta if metric == "accuracy" else -delta
        reached = (f"reached {baseline}'s final {metric} at step {r['parity_step']} "
                   f"({r['parity_pct']:.0f}% of the budget)") if r["parity_step"] is not None else (
                   f"never reached {baseline}'s final {metric}")
        beats = gain > 0 and r["parity_step"] is not None and r["parity_step"] < base["steps"]
        role = r.get("role", RECYCLED)
        if role == NO_DONORS:
            head, note = "no donors (init: none), not a recycling arm", ""
        elif role == NULL_CONTROL:
            head = "null control" + (", reaches parity" if r["parity_step"] is not None else ", does not reach parity")
            note = f" {caution[0].upper()}{caution[1:]}." if r in nulls else ""
        elif not beats:
            head, note = "recycling did not help", ""
        elif nulls:
            head, note = f"beat {baseline}, but not shown to be recycling", f" However, {caution}{_versus(r, nulls, metric)}."
        else:
            head, note = "recycling helped", ""
        lines.append(f"- **{r['arm']}: {head}.** It {reached}, and ended {delta * sign:+.2f} {unit} "
                     f"against {baseline} (final {_fmt(r['final'])} vs {_fmt(base['final'])}).{note}")
    return lines


def _versus(arm: dict[str, Any], nulls: list[dict[str, Any]], metric: str) -> str:
    """How a recycled arm's final compares with each null control's, so a reader sees the margin over scale alone."""
    from engine.analysis import better

    return "".join(f"; {arm['arm']} ends {'ahead of' if better(metric, arm['final'], n['final']) else 'not ahead of'} "
                   f"{n['arm']} ({_fmt(arm['final'])} vs {_fmt(n['final'])})" for n in nulls)


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


def run_scope(cfg):
    """The scope (sample and pool) this run scored, as `engine.run.prepare` recorded it; None for a run that scored
    nothing (then there is no scoring section)."""
    from engine.core.pools import resolve_scope

    path = cfg.out / "scope.json"
    if not path.exists():
        return None
    scope = json.loads(path.read_text())
    return resolve_scope(cfg.out / "score", [], scope.get("sample"), scope.get("pool"))


def render(cfg, data: dict[str, Any], plots: list[Path]) -> str:
    m = data["metric"]
    fmt = "the tokenizer's chat template" if cfg.chat_template else "plain (no chat template)"
    out = [f"# mashup run report", "", f"*{time.strftime('%Y-%m-%d %H:%M')}* — base `{cfg.base}`, task `{cfg.train}`, "
           f"validation `{cfg.val}`, held-out `{cfg.eval}`. Prompt format: {fmt}, one for scoring, training and "
           "every evaluation.", "", "## Verdict", "", *verdict(data), ""]
    scores = data["scores"]
    if scores is not None and len(scores) and (cfg.out / "scope.json").exists():
        from engine.selection import full_sample_rows

        full = full_sample_rows(scores, cfg.out / "score", run_scope(cfg))[0]
        ok = full[full.status == "ok"]
        base = ok[ok.donor == BASE_ROW]
        out += ["## Scoring", "", f"{len(ok) - len(base)} donors scored, {int((full.status == 'failed').sum())} failed; "
                f"base loss {_fmt(float(base.loss.iloc[0]) if len(base) else None)} nats/token.", ""]
        out += ranking_table(ok[ok.donor != BASE_ROW])
    for arm, sel in data["selections"].items():
        out += [f"### Selected for `{arm}` ({sel['strategy']} by {sel.get('metric', 'loss')}, k={sel['k']}, "
                f"{sel['weighting']})", "",
                "| donor | loss | token accuracy | weight |", "|---|---|---|---|",
                *[f"| {d['donor']} | {_fmt(d['loss'])} | {_fmt(d.get('token_accuracy'))} | {_fmt(d['weight'])} |"
                  for d in sel["donors"]], ""]
    from engine.merge_choice import render_choices

    out += render_choices(data.get("choices", {}))
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

    if data.get("resumed"):
        out += ["", "Resumed after a kill (their wall-clock counts the lost steps): " + "; ".join(
            f"`{r['run']}` from step {r['from_step']} ({r['lost_steps']} steps lost)" for r in data["resumed"]) + "."]
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
