"""What a scoring job pays before its first donor, and what `executor: local` saves: side by side in one run.

Each variant runs in a fresh Python process, as a user's `mashup score` does (imports included), on the same pools:
- `ray`: scoring actors, Ray started by the job (today's default);
- `ray, session reused`: a second job in that same process, after the first finished, so Ray is already up (what
  one Ray session shared by several jobs, e.g. the benchmark's targets, saves): its actors and base load again;
- `local`: one scorer in the driver's process (`executor: local`), no Ray and no actor process.
Per variant: the process's wall-clock, and from the job's own start-up record (ScoreSummary.startup) the seconds to
the sample being prepared, Ray being up, the scorer having its base loaded, and the first donor scored. Every
variant scores the same donors on the same sample; the loss difference to the `ray` run is recorded.

Usage: python -m bench.bench_startup [--readme] [--pools demo,bench] [--repeats 2]  → bench/results/startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.readme import add_output_options, machine, publish, rendered_only

RESULTS = Path("bench/results/startup.json")
README_BLOCK = "bench-startup"
VARIANTS = ("ray", "ray, session reused", "local")
POOLS = {  # world, target: the demo's 12 donors and one bench target's 75, both on the paper's 256 examples
    "demo": ("demo", "rev+dropf"),
    "bench": ("bench", "sort+swap"),
}
EVENTS = ("prepared", "ray_ready", "scorer_ready", "first_donor")


def pool_config(pool: str, out: Path, executor: str) -> dict[str, Any]:
    world, target = POOLS[pool]
    root = Path(".cache/worlds") / world
    if not (root / "world.json").exists():
        raise SystemExit(f"{root} is missing: build it with `python -m bench.world.build --scale {world}`")
    return {"base": str(root / "base"), "donors": [str(root / "donors" / f"manifest-{target}.jsonl")],
            "data": str(root / "tasks" / target / "train.jsonl"), "out": str(out), "samples": 256, "actors": 1,
            "donors_per_call": 8, "executor": executor}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the fresh process: one job (two for a reused session), each with its start-up record and losses."""
    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores

    jobs = []
    for out in spec["outs"]:
        summary = score(ScoreConfig(**{**spec["config"], "out": out}))
        rows = read_scores(out)
        jobs.append({"seconds": summary.seconds, "startup": summary.startup, "scored": summary.scored,
                     "losses": dict(zip(rows.donor, rows.loss.astype(float)))})
    return {"jobs": jobs}


def measure(pool: str, variant: str, scratch: Path) -> dict[str, Any]:
    """One variant in a fresh interpreter; the parent times the whole process."""
    executor = "local" if variant == "local" else "ray"
    outs = [str(scratch / f"{pool}-{executor}-{i}") for i in range(2 if "reused" in variant else 1)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    spec = {"config": pool_config(pool, Path(outs[0]), executor), "outs": outs}
    code = "import json,sys; from bench.bench_startup import child; print('RESULT'+json.dumps(child(json.loads(sys.argv[1]))))"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{pool}/{variant} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(line[len("RESULT"):])
    job = res["jobs"][-1]  # the reused-session variant reports its second job
    return {"pool": pool, "variant": variant, "process_seconds": wall if len(res["jobs"]) == 1 else None,
            "job_seconds": job["seconds"], "startup": job["startup"], "scored": job["scored"], "losses": job["losses"]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pool and variant: the median over repeats of each figure, and the loss gap to the `ray` variant."""
    import statistics

    out: dict[str, Any] = {}
    for pool in dict.fromkeys(r["pool"] for r in runs):
        ref = next(r["losses"] for r in runs if r["pool"] == pool and r["variant"] == "ray")
        out[pool] = {}
        for variant in VARIANTS:
            rs = [r for r in runs if r["pool"] == pool and r["variant"] == variant]
            if not rs:
                continue
            med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
            out[pool][variant] = {
                "repeats": len(rs), "donors": rs[0]["scored"] - 1,  # `scored` counts the base's row too
                "process_seconds": med([r["process_seconds"] for r in rs if r["process_seconds"] is not None]),
                "job_seconds": med([r["job_seconds"] for r in rs]),
                **{e: med([r["startup"][e] for r in rs if e in r["startup"]]) for e in EVENTS},
                "max_abs_loss_diff_vs_ray": max(abs(r["losses"][d] - ref[d]) for r in rs for d in ref),
            }
    return out


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}` (median of {meta['repeats']} "
             "repeats, each variant in a fresh process, interleaved). Seconds from the job's start; `process` adds "
             "Python's imports and exit.", "",
             "| pool | executor | process | job | sample ready | Ray up | scorer ready (base loaded) | first donor | "
             "scoring after the first donor | largest loss difference vs ray |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "–" if x is None else f"{x:.1f} s"  # noqa: E731
    for pool, variants in res["pools"].items():
        for variant, v in variants.items():
            after = v["job_seconds"] - v["first_donor"] if v["first_donor"] is not None else None
            lines.append(f"| {pool} ({v['donors']} donors, 256 ex.) | {variant} | {fmt(v['process_seconds'])} | "
                         f"{fmt(v['job_seconds'])} | {fmt(v['prepared'])} | {fmt(v['ray_ready'])} | "
                         f"{fmt(v['scorer_ready'])} | {fmt(v['first_donor'])} | {fmt(after)} | "
                         f"{v['max_abs_loss_diff_vs_ray']:.1e} |")
    lines.append("")
    for pool, variants in res["pools"].items():
        ray, local = variants.get("ray"), variants.get("local")
        if ray and local and ray["process_seconds"] and local["process_seconds"]:
            lines.append(f"- **{pool}**: first donor after {local['first_donor']:.1f} s in-process vs "
                         f"{ray['first_donor']:.1f} s with Ray; the whole command takes "
                         f"{local['process_seconds'] / ray['process_seconds']:.0%} of its Ray time.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", default="demo,bench")
    ap.add_argument("--repeats", type=int, default=2)
    add_output_options(ap, RESULTS)
    args = ap.parse_args(argv)
    if rendered_only(args, README_BLOCK, render):
        return

    runs = []
    with tempfile.TemporaryDirectory(prefix="mashup-startup-") as tmp:
        for _ in range(args.repeats):
            for pool in args.pools.split(","):
                for variant in VARIANTS:
                    runs.append(measure(pool, variant, Path(tmp)))
                    print(f"{pool:6s} {variant:22s} job {runs[-1]['job_seconds']:6.1f} s  {runs[-1]['startup']}",
                          flush=True)
    command = "python -m bench.bench_startup" + (f" --pools {args.pools}" if args.pools != "demo,bench" else "") + \
              (f" --repeats {args.repeats}" if args.repeats != 2 else "")
    res = {"meta": {"date": time.strftime("%Y-%m-%d"), "command": command, "repeats": args.repeats,
                    "machine": machine()},
           "pools": summarize(runs), "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs]}
    publish(res, args, README_BLOCK, render)


if __name__ == "__main__":
    main()
