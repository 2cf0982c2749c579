"""Scale: exhaustive vs cascade scoring on 2,000 synthetic donors, and how cost grows with the pool, in one run.

(a) Exhaustive scoring of the whole pool is the reference. Cascades (one per k, `min_survivors = k`) are scored on
    the same pool and sample; for each: compute used (donor × example pairs, and wall-clock) as a share of the
    exhaustive run's, and top-k recall = |cascade top-k ∩ exhaustive top-k| / k.
(b) Cascades over the first 250, 500, 1,000 and 2,000 donors: wall-clock and driver peak RSS per pool size. The
    exhaustive run's own profile (time and driver RSS when 250, 500, … rows were stored) is recorded beside it.

Every job runs in its own process (its own local Ray, started before the clock), so each peak RSS is its own.
The pool: `bench/scale_pool.py` (mixes of the demo world's trained donors plus noise; cached in .cache/scale/).

Usage: python -m bench.bench_scale [--pool 2000] [--sizes 250,500,1000] [--samples 64] [--ks 2,8]
       → bench/results/scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.scale_pool import WORLD, build_pool, sub_manifest
from engine.core.scores import BASE_ROW

RESULTS = Path("bench/results/scale.json")
OUT = Path(".cache/scale/runs")
MARK = "BENCH_JOB_RESULT "


class RssSampler(threading.Thread):
    """The driver's resident memory, sampled every 50 ms: peak, and a timeline to read checkpoints from."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.stop, self.timeline = psutil.Process(), threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            self.timeline.append((time.time(), self.proc.memory_info().rss))
            time.sleep(0.05)


def job(spec: dict) -> dict:
    """One scoring job in this process; returns its cost, compute and memory figures."""
    import ray

    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores

    # address="local": a fresh Ray of our own, never another user's cluster that happens to run on this machine
    if spec["config"].get("executor", "ray") == "ray":
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    shutil.rmtree(spec["out"], ignore_errors=True)
    cfg = ScoreConfig.model_validate(spec["config"])
    sampler = RssSampler()
    baseline = sampler.proc.memory_info().rss
    sampler.start()
    t0 = time.time()
    summary = score(cfg)
    seconds = time.time() - t0
    sampler.stop.set()
    sampler.join()
    rows = read_scores(cfg.out)
    rss = [r for _, r in sampler.timeline]
    donors = rows[(rows.donor != BASE_ROW) & (rows["round"] == rows["round"].max())]
    stored = sorted(donors.written_at) if spec.get("profile") else []
    profile = {}
    for n in spec.get("profile", []):
        if n <= len(stored):
            at = stored[n - 1]
            profile[n] = {"seconds": at - t0, "rss_mb": max([r for t, r in sampler.timeline if t <= at] or [0]) / 2**20}
    return {"seconds": seconds, "donor_examples": summary.donor_examples, "failed": summary.failed,
            "rounds": summary.rounds, "rss_before_mb": baseline / 2**20, "rss_peak_mb": max(rss + [baseline]) / 2**20,
            "profile": profile}


def run_job(spec: dict) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--job", json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench job failed ({proc.returncode}): {spec['name']}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARK))
    return json.loads(line[len(MARK):])


def losses(out: Path) -> dict[str, float]:
    """Full-sample losses per donor, as selection ranks them (partial cascade rounds excluded)."""
    from engine.selection import full_sample_rows
    from engine.scoring.store import read_scores

    rows, _ = full_sample_rows(read_scores(out), out)
    rows = rows[(rows.status == "ok") & (rows.donor != BASE_ROW)]
    return dict(zip(rows.donor, rows.loss.astype(float)))


def top(loss: dict[str, float], k: int, among: set[str] | None = None) -> list[str]:
    return sorted((d for d in loss if among is None or d in among), key=lambda d: (loss[d], d))[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--sizes", default="250,500,1000", help="smaller pool sizes for the sweep (the pool is added)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--ks", default="2,8")
    ap.add_argument("--first-slice", type=int, default=8)
    ap.add_argument("--keep-fraction", type=float, default=0.25)
    ap.add_argument("--z", type=float, default=2.0)
    ap.add_argument("--growth", type=float, default=2.0)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--executor", choices=("ray", "local"), default="ray", help="local: one scorer in the job's process")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--donors-per-call", type=int, default=16)
    args = ap.parse_args()
    if args.job:
        print(MARK + json.dumps(job(json.loads(args.job))), flush=True)
        return

    import torch

    started, load_before = time.time(), os.getloadavg()
    manifest = build_pool(args.pool)
    ks = [int(k) for k in args.ks.split(",")]
    sizes = sorted({int(n) for n in args.sizes.split(",") if n} | {args.pool})
    common = {"base": str(WORLD / "base"), "data": str(WORLD / "tasks" / "rev+dropf" / "train.jsonl"),
              "samples": args.samples, "actors": args.actors, "cpus_per_actor": 1, "executor": args.executor,
              "donors_per_call": args.donors_per_call,
              "backend_options": {"max_resident": 2 * args.donors_per_call + 2, "batch_tokens": 16384}}
    cascade = {"first_slice": args.first_slice, "keep_fraction": args.keep_fraction, "z": args.z,
               "growth": args.growth}

    def spec(name: str, n: int, **extra) -> dict:
        out = OUT / name
        donors = manifest if n == args.pool else sub_manifest(manifest, n)
        return {"name": name, "out": str(out),
                "config": {**common, "donors": [str(donors)], "out": str(out), **extra}}

    print(f"exhaustive: {args.pool} donors × {args.samples} examples", file=sys.stderr)
    exh = run_job({**spec("exhaustive", args.pool), "profile": sizes})
    ref = losses(OUT / "exhaustive")
    order = [json.loads(ln)["id"] for ln in manifest.read_text().splitlines()]
    cascades, sweep = {}, {}
    for k in ks:
        print(f"cascade k={k}: {args.pool} donors", file=sys.stderr)
        res = run_job(spec(f"cascade_k{k}", args.pool, strategy="cascade", cascade={**cascade, "min_survivors": k}))
        cascades[k] = res
    kmax = max(ks)
    for n in sizes:
        if n == args.pool:
            sweep[n] = cascades[kmax]
            continue
        print(f"cascade k={kmax}: first {n} donors", file=sys.stderr)
        sweep[n] = run_job(spec(f"cascade_k{kmax}_n{n}", n, strategy="cascade",
                                cascade={**cascade, "min_survivors": kmax}))

    full = args.pool * args.samples
    comparison = {}
    for k, res in cascades.items():
        got = losses(OUT / f"cascade_k{k}")
        truth = top(ref, k)
        comparison[f"k={k}"] = {
            "recall": len(set(top(got, k)) & set(truth)) / k,
            "top2_recall": len(set(top(got, 2)) & set(top(ref, 2))) / 2,
            "true_top_k_reached_full_sample": len(set(truth) & set(got)) / k,
            "compute_fraction": res["donor_examples"] / full,
            "wall_clock_fraction": res["seconds"] / exh["seconds"],
            "donor_examples": res["donor_examples"], "seconds": res["seconds"],
            "max_abs_loss_diff_vs_exhaustive": max(abs(got[d] - ref[d]) for d in got),
            "rounds": [{key: r[key] for key in ("round", "examples", "scored", "kept", "donor_examples", "seconds")}
                       for r in res["rounds"]],
            "rss_peak_mb": res["rss_peak_mb"],
        }
    scaling = {}
    for n, res in sweep.items():
        sub = set(order[:n])
        truth = top(ref, kmax, sub)
        got = losses(OUT / (f"cascade_k{kmax}" if n == args.pool else f"cascade_k{kmax}_n{n}"))
        scaling[n] = {"cascade_seconds": res["seconds"], "cascade_seconds_per_donor": res["seconds"] / n,
                      "cascade_donor_examples": res["donor_examples"],
                      "cascade_compute_fraction": res["donor_examples"] / (n * args.samples),
                      "cascade_recall": len(set(top(got, kmax)) & set(truth)) / kmax,
                      "cascade_rss_before_mb": res["rss_before_mb"], "cascade_rss_peak_mb": res["rss_peak_mb"],
                      "exhaustive_profile": exh["profile"].get(str(n)) or exh["profile"].get(n)}
    small, large = min(sweep), max(sweep)
    result = {
        "command": "python -m bench.bench_scale " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "world": {"pool": args.pool, "made_from": "12 trained demo-world donors (bench/scale_pool.py)",
                  "task": "rev+dropf", "samples": args.samples, "actors": args.actors,
                  "donors_per_call": args.donors_per_call},
        "cascade_config": cascade,
        "exhaustive": {"seconds": exh["seconds"], "donor_examples": exh["donor_examples"],
                       "rss_before_mb": exh["rss_before_mb"], "rss_peak_mb": exh["rss_peak_mb"]},
        "exhaustive_vs_cascade": comparison,
        "scaling": scaling,
        "growth_ratios": {
            "pool": large / small,
            "cascade_seconds": sweep[large]["seconds"] / sweep[small]["seconds"],
            "cascade_rss_peak": sweep[large]["rss_peak_mb"] / sweep[small]["rss_peak_mb"],
        },
        "bench_seconds": time.time() - started,
        "notes": "seconds exclude each job's Ray start-up but include actor start-up and base loading; compute is "
                 "donor × example pairs (the base row excluded); recall is against the exhaustive top-k of the same "
                 "donors; sweep cascades use min_survivors = max k.",
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("exhaustive", "exhaustive_vs_cascade", "growth_ratios")}, indent=2))


if __name__ == "__main__":
    main()
