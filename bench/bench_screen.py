"""Screening vs exhaustive vs cascade, side by side: quality, compute, wall-clock, and a break-even table.

Per pool, one `strategy: screen` run with `keep_fraction: 1` gives every donor its screen prediction, its exact
probe loss (`probe` examples) and its exact full-sample loss in one store; a cascade whose first slice is the
probe then reuses those probe rows (its round 0) and scores its later rounds. Every strategy is then evaluated on
the same rows: exhaustive (the reference), cascade (real run), screen → exact on the screen's survivors (the
screen alone gates), and the combined design (engine.scoring.screen.survivors: screen ∪ probe survivors → exact).

Quality: Spearman(screen, exact); recall of the exact top-k among the top M screened (M = k, 5 %, 10 %, 25 %; a
donor within one standard error of the k-th best counts as good as it); regret (mean exact loss of the picks
minus the exhaustive picks'). Compute in forward-token equivalents (a backward pass = 2 forwards; one donor's
screen ≈ r tokens through the adapted modules). Wall-clock: measured per stage; smaller pools (N = 250, 500, 1000)
are the first N donors of the same rows, their times scaled from measured per-donor seconds plus the run's fixed
start-up. Break-even: a recycled arm reaches parity sooner than scratch iff selection + its finetune to parity
< scratch's finetune to parity (parity fractions from bench/results/recycling.json).

Usage: python -m bench.bench_screen [--bench-world DIR] [--targets a,b] [--pool 2000] [--samples 256] [--probe 4]
       → bench/results/screen.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from engine.core.scores import BASE_ROW

RESULTS = Path("bench/results/screen.json")
OUT = Path(".cache/screen/runs")
KS = (1, 2, 4, 8)


def run_pool(name: str, base: str, data: str, donors: str, args) -> dict[str, Any]:
    """Score one pool every way at once (see the module docstring); returns its rows and stage timings."""
    import shutil

    from engine.scoring import ScoreConfig, score

    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    common = dict(base=base, donors=[donors], data=data, out=out, samples=args.samples, actors=args.actors,
                  cpus_per_actor=1, donors_per_call=args.donors_per_call,
                  backend_options={"max_resident": 2 * args.donors_per_call + 2, "batch_tokens": 16384})
    t0 = time.time()
    score(ScoreConfig(**common, strategy="screen", screen={"keep_fraction": 1.0, "probe": args.probe,
                                                            "then": "exhaustive"}))
    total = time.time() - t0
    from engine.scoring.store import read_scores

    first_row = float(read_scores(out).written_at.min()) - t0  # actor start-up + base load + gradient + a batch
    record = json.loads((out / "screen.json").read_text())
    t0 = time.time()
    cas = score(ScoreConfig(**common, strategy="cascade", cascade={
        "first_slice": args.probe, "keep_fraction": args.keep_fraction, "z": 2.0, "growth": 2.0,
        "min_survivors": max(KS)}))
    return {"out": out, "record": record, "seconds": total, "first_row_seconds": first_row, "cascade_rounds": cas.rounds,
            "cascade_seconds": time.time() - t0}


def analyse(run: dict[str, Any], n: int | None, args) -> dict[str, Any]:
    """Every strategy's picks, recall, regret, compute and wall-clock on the first `n` donors (None: all)."""
    import pandas as pd

    from engine.scoring.cascade import RoundStats, ok_stats, prefix_id
    from engine.scoring.screen import ScreenConfig, survivors
    from engine.scoring.store import ScoreStore

    store, rec = ScoreStore(run["out"]), run["record"]
    rows = store.read()
    sid = rec["sample_id"]
    order = [r["donor"] for r in rows[(rows.kind == "screen") & (rows.sample_id == sid)].sort_values("written_at")
             .to_dict("records")]
    donors = sorted(set(order))[:n] if n else sorted(set(order))
    full = rows[(rows.kind == "exact") & (rows.sample_id == sid) & (rows["round"] == 0) & (rows.status == "ok")]
    exact = {r["donor"]: RoundStats.from_row(r) for r in full.to_dict("records") if r["donor"] in set(donors)}
    scr = rows[(rows.kind == "screen") & (rows.sample_id == sid) & (rows.status == "ok") & rows.donor.isin(donors)]
    pred, align = dict(zip(scr.donor, scr.loss)), dict(zip(scr.donor, scr.alignment))
    probe = ok_stats(store, prefix_id(sid, args.probe, rec["examples"], rec.get("seed", 0)), 0, donors)
    unseen = [d for d in donors if d not in pred]
    loss = {d: s.loss for d, s in exact.items()}
    ranked = sorted(loss, key=lambda d: (loss[d], d))
    screened = sorted(pred, key=lambda d: (pred[d], d))
    both = [d for d in screened if d in loss]
    spearman = float(pd.Series([pred[d] for d in both]).rank().corr(pd.Series([loss[d] for d in both]).rank()))

    def good(k: int) -> set[str]:
        kth = exact[ranked[k - 1]]
        return {d for d in ranked if loss[d] <= kth.loss + kth.stderr}

    def recall(k: int, chosen: list[str]) -> float:
        return min(k, len(good(k) & set(chosen))) / k

    recall_table = {f"k={k}": {label: recall(k, screened[:m]) for label, m in (
        ("M=k", k), ("M=5%", max(k, math.ceil(0.05 * len(screened)))), ("M=10%", max(k, math.ceil(0.1 * len(screened)))),
        ("M=25%", max(k, math.ceil(0.25 * len(screened)))))} for k in KS if k <= len(ranked)}
    sc = ScreenConfig(keep_fraction=args.keep_fraction, min_keep=args.min_keep, probe=args.probe,
                      probe_keep_fraction=args.keep_fraction)
    screen_only = screened[:max(sc.min_keep, math.ceil(sc.keep_fraction * len(screened)))] + unseen
    combined, _, by_probe = survivors(pred, probe, unseen, sc)
    cas_rounds = run["cascade_rounds"]
    last = rows[(rows.kind == "exact") & (rows.sample_id == sid) & (rows["round"] == (cas_rounds[-1]["round"] if cas_rounds else -1))]
    cascade_final = [d for d in last.donor if d in loss] if n is None else None
    k = 2
    best = ranked[:k]

    def picks(pool: list[str]) -> dict[str, Any]:
        chosen = sorted((d for d in pool if d in loss), key=lambda d: (loss[d], d))[:k]
        regret = sum(loss[d] for d in chosen) / k - sum(loss[d] for d in best) / k
        return {"picks": chosen, "regret": regret, "within_one_se": regret <= exact[best[-1]].stderr,
                "top2_recall": recall(k, chosen), "survivors": len(pool)}

    tok = rec["tokens"] / rec["examples"]  # a donor's screen ≈ r tokens: r / tok example-forwards
    N, T = len(donors), rec["examples"]
    cost_exh = N * T
    per = run["per_donor_seconds"]
    fixed = run["fixed_seconds"]
    strategies = {"exhaustive": {**picks(ranked), "forward_example_equiv": cost_exh,
                                 "seconds": fixed + per["exact"] * N},
                  "screen+exact": {**picks(screen_only), "forward_example_equiv": 3 * T + N * args.rank / tok
                                   + len(screen_only) * T,
                                   "seconds": fixed + per["screen"] * N + per["exact"] * len(screen_only)},
                  "combined": {**picks(combined), "forward_example_equiv": 3 * T + N * args.rank / tok
                               + N * args.probe + len(combined) * T,
                               "seconds": fixed + per["screen"] * N + per["probe"] * N + per["exact"] * len(combined)}}
    if cascade_final is not None:
        strategies["cascade"] = {**picks(cascade_final), "forward_example_equiv": N * args.probe + sum(
            r["donor_examples"] for r in cas_rounds[1:]), "seconds": fixed + per["probe"] * N + sum(
            r["seconds"] for r in cas_rounds[1:])}
    for s in strategies.values():
        s["compute_fraction"] = s["forward_example_equiv"] / cost_exh
        s["wall_clock_fraction"] = s["seconds"] / strategies["exhaustive"]["seconds"]
    grid = []  # the combined design's knobs, evaluated offline on the same rows
    for kf in (0.025, 0.05, 0.1, 0.2):
        for z in (0.0, 1.0, 2.0):
            g = ScreenConfig(keep_fraction=kf, probe_keep_fraction=kf, z=z, min_keep=args.min_keep, probe=args.probe)
            pool, _, _ = survivors(pred, probe, unseen, g)
            grid.append({"keep_fraction": kf, "z": z, **{k: v for k, v in picks(pool).items() if k != "picks"},
                         "compute_fraction": (3 * T + N * args.rank / tok + N * args.probe + len(pool) * T) / cost_exh})
    worst = sorted(both, key=lambda d: (loss[d], d))[:3]
    return {"donors": N, "examples": T, "spearman": spearman, "recall_exact_top_k_in_screen_top_M": recall_table,
            "strategies": strategies, "combined_grid": grid, "rescued_by_probe": [d for d in by_probe if d not in set(screen_only)],
            "best_donors_screen_rank": {d: {"exact": loss[d], "screen": pred[d], "screen_rank": screened.index(d) + 1,
                                            "alignment": align[d]} for d in worst},
            "unscreenable": len(unseen)}


def timings(run: dict[str, Any], args) -> None:
    """Per-donor seconds per stage (actor-measured, divided over the actors) and the fixed start-up."""
    from engine.scoring.store import read_scores

    rows = read_scores(run["out"])
    rec = run["record"]
    stages = {s["stage"]: s for s in rec["stages"]}
    sid = rec["sample_id"]
    probe_sid = f"{sid}@{args.probe}"
    per = {}
    for name, mask in (("screen", rows.kind == "screen"), ("probe", (rows.kind == "exact") & (rows.sample_id == probe_sid)),
                       ("exact", (rows.kind == "exact") & (rows.sample_id == sid) & (rows["round"] == 0)
                        & (rows.donor != BASE_ROW))):
        sel = rows[mask & (rows.status == "ok")]
        per[name] = float(sel.seconds.sum()) / max(len(sel), 1) / args.actors
    screened = rows[(rows.kind == "screen") & (rows.status == "ok")]
    run["per_donor_seconds"] = per
    run["fixed_seconds"] = max(0.0, stages["screen"]["seconds"] - per["screen"] * len(screened))


def break_even(results: dict[str, Any], recycling: Path) -> dict[str, Any]:
    """Which pool sizes and finetune budgets let a recycled arm reach parity before scratch, per strategy."""
    rec = json.loads(recycling.read_text())
    avg = {a["arm"]: a for a in rec["average"]}
    ft = rec["config"]["finetune"]
    p_scratch, p_recycled = avg["scratch"]["parity_pct_mean"] / 100, avg["mashup"]["parity_pct_mean"] / 100
    scale = results["pools"].get("scale", {}).get("by_size", {})
    table = []
    for steps in (ft["steps"], 10 * ft["steps"], 100 * ft["steps"]):
        finetune = steps * ft["batch_size"] * 3  # forward-example equivalents of the finetune
        for n, res in sorted(scale.items(), key=lambda kv: int(kv[0])):
            row = {"finetune_steps": steps, "batch": ft["batch_size"], "pool": int(n)}
            for name, s in res["strategies"].items():
                saved = (p_scratch - p_recycled) * finetune
                row[name] = {"selection": round(s["forward_example_equiv"]), "saved": round(saved),
                             "recycled_sooner": s["forward_example_equiv"] < saved}
            table.append(row)
    return {"parity_fraction": {"scratch": p_scratch, "mashup": p_recycled}, "finetune": ft, "rows": table,
            "rule": "recycled sooner iff selection < (parity_scratch - parity_recycled) x steps x batch x 3, in "
                    "forward-example equivalents (an example's forward = 1)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-world", default=".cache/worlds/bench")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSON file this run adds its pools to")
    ap.add_argument("--targets", default="", help="bench-world targets (default: all; none: skip)")
    ap.add_argument("--pool", type=int, default=2000, help="scale-pool size (0: skip)")
    ap.add_argument("--sizes", default="250,500,1000")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--probe", type=int, default=4)
    ap.add_argument("--keep-fraction", type=float, default=0.1)
    ap.add_argument("--min-keep", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8, help="the donors' LoRA rank (a screen costs ~r tokens)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--donors-per-call", type=int, default=16)
    args = ap.parse_args()
    import ray
    import torch

    started, load_before = time.time(), os.getloadavg()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init = time.time() - started  # the fixed cost a `mashup score` command pays before any actor starts
    command = "python -m bench.bench_screen " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    # Runs add to the results file (a bench-world run and a scale-pool run can be made separately).
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {"pools": {}}
    results.update(date=time.strftime("%Y-%m-%d %H:%M"), ray_init_seconds=ray_init,
                   machine=f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}")
    results["commands"] = [*results.get("commands", []), command]
    results["command"] = " ; ".join(results["commands"])
    world = Path(args.bench_world)
    if args.targets != "none" and (world / "world.json").exists():
        targets = [t for t in args.targets.split(",") if t] or json.loads((world / "world.json").read_text())["spec"]["targets"]
        for t in targets:
            run = run_pool(f"bench-{t}", str(world / "base"), str(world / "tasks" / t / "train.jsonl"),
                           str(world / "donors" / f"manifest-{t}.jsonl"), args)
            timings(run, args)
            results["pools"][f"bench/{t}"] = {**analyse(run, None, args), "per_donor_seconds": run["per_donor_seconds"],
                                              "fixed_seconds": run["fixed_seconds"], "stages": run["record"]["stages"],
                                              "first_row_seconds": run["first_row_seconds"],
                                              "disagreements": len(run["record"]["disagreements"])}
            _write(results, args.results)
    if args.pool:
        from bench.scale_pool import WORLD, build_pool

        manifest = build_pool(args.pool)
        run = run_pool("scale", str(WORLD / "base"), str(WORLD / "tasks" / "rev+dropf" / "train.jsonl"), str(manifest),
                       args)
        timings(run, args)
        sizes = sorted({int(n) for n in args.sizes.split(",") if n} | {args.pool})
        results["pools"]["scale"] = {"per_donor_seconds": run["per_donor_seconds"], "fixed_seconds": run["fixed_seconds"],
                                     "first_row_seconds": run["first_row_seconds"],
                                     "stages": run["record"]["stages"],
                                     "by_size": {str(n): analyse(run, None if n == args.pool else n, args) for n in sizes}}
        results["break_even"] = break_even(results, Path("bench/results/recycling.json"))
    results["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    results["bench_seconds"] = time.time() - started
    _write(results, args.results)


def _write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
