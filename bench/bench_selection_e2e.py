"""End to end: does the fast selection (screen + exact probe, in-process) bring `mashup` to parity sooner than
today's exhaustive scoring on Ray actors, selection and merge included? Side by side in one invocation.

Both variants are the recycling benchmark (`bench.bench_recycling`, the same world, targets, arms, LRs and seeds)
with only the `score` section changed:
- `exhaustive (ray)`: every donor on 256 examples, 2 Ray actors (configs/bench_recycling.yaml, today's run);
- `screen (local)`: `strategy: screen` with its defaults, `executor: local`.
Per variant the cross-target summary gives `mashup`'s final validation accuracy, held-out accuracy, parity step and
wall-clock to parity (its scoring, selection, merge and training up to parity) relative to scratch's time to reach
its own final accuracy. Results: bench/results/selection_e2e.json and a README block.

Usage: python -m bench.bench_selection_e2e [--readme] [--targets sort+swap,evens+dbl,rev+dropf]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from bench.readme import add_output_options, machine, publish, rendered_only

RESULTS = Path("bench/results/selection_e2e.json")
README_BLOCK = "bench-selection-e2e"
CONFIG = Path("configs/bench_recycling.yaml")
VARIANTS = {
    "exhaustive (ray)": "{samples: 256, actors: 2, donors_per_call: 8}",
    "screen (local)": "{samples: 256, strategy: screen, executor: local, donors_per_call: 8}",
}
ARMS = "[{name: scratch, init: none}, {name: mashup}]"


def run_variant(name: str, score: str, targets: str, lrs: str, seeds: str, out: Path) -> dict[str, Any]:
    from bench.bench_recycling import load_bench_config, run_bench

    home = out / name.split(" ")[0]
    cfg = load_bench_config(CONFIG, [f"targets=[{targets}]", f"arms={ARMS}", f"sweep.lrs=[{lrs}]",
                                     f"sweep.seeds=[{seeds}]", f"out={home}", f"results={home / 'recycling.json'}",
                                     "readme=false", f"score={score}"])
    t0 = time.perf_counter()
    summary = json.loads(run_bench(cfg).read_text())
    arms = {row["arm"]: row for row in summary["average"]}
    scoring = {t: v["timings"].get("score") for t, v in summary["targets"].items()}
    picks = {t: [d["donor"] for d in v["selections"].get("mashup", {}).get("donors", [])]
             for t, v in summary["targets"].items()}
    return {"score": score, "seconds": time.perf_counter() - t0, "scoring_seconds": scoring, "picks": picks,
            "arms": {a: {k: arms[a].get(k) for k in ("final", "final_std", "heldout", "parity_pct_mean",
                                                      "wallclock_to_parity_vs_baseline", "wins")} for a in arms}}


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}`: targets {meta['targets']}, "
             f"arms scratch and mashup (top-2, linear), LRs {meta['lrs']} (best per arm on validation), seeds "
             f"{meta['seeds']}, 60 steps × batch 16. Wall-clock to parity: mashup's scoring, selection, merge and "
             "training up to parity, over scratch's time to its own final accuracy (below 100 %: recycling paid).", "",
             "| selection | scoring per target | mashup final (val) | held-out | parity step | wall-clock to parity vs "
             "scratch | scratch final |", "|---|---|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        m, s = v["arms"]["mashup"], v["arms"]["scratch"]
        secs = [x for x in v["scoring_seconds"].values() if x is not None]
        lines.append(f"| {name} | {sum(secs) / max(len(secs), 1):.0f} s | {m['final']:.3f} ± {m['final_std']:.3f} | "
                     f"{m['heldout']:.3f} | {m['parity_pct_mean']:.0f}% | "
                     f"{100 * m['wallclock_to_parity_vs_baseline']:.0f}% | {s['final']:.3f} |")
    same = all(res["variants"][n]["picks"] == next(iter(res["variants"].values()))["picks"] for n in res["variants"])
    lines += ["", "Picks " + ("are the same in both variants." if same else "differ: " + "; ".join(
        f"{n}: " + ", ".join(f"{t} {'+'.join(p)}" for t, p in v["picks"].items()) for n, v in res["variants"].items()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="sort+swap,evens+dbl,rev+dropf")
    ap.add_argument("--lrs", default="0.003,0.01")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/selection_e2e"))
    add_output_options(ap, RESULTS)
    args = ap.parse_args(argv)
    if rendered_only(args, README_BLOCK, render):
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    variants = {name: run_variant(name, score, args.targets, args.lrs, args.seeds, args.out)
                for name, score in VARIANTS.items()}
    command = "python -m bench.bench_selection_e2e" + "".join(
        f" --{k} {getattr(args, k)}" for k, d in (("targets", "sort+swap,evens+dbl,rev+dropf"), ("lrs", "0.003,0.01"),
                                                  ("seeds", "0,1,2")) if getattr(args, k) != d)
    res = {"meta": {"date": time.strftime("%Y-%m-%d"), "command": command, "targets": args.targets, "lrs": args.lrs,
                    "seeds": args.seeds, "machine": machine()},
           "variants": variants}
    publish(res, args, README_BLOCK, render)


if __name__ == "__main__":
    main()
