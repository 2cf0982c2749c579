"""Rewrite README's demo block from what `make demo` just produced (runs/demo/results.json), so the README shows
what a newcomer gets rather than figures typed in by hand.

Usage: python -m bench.demo_readme [--run runs/demo]   (`make demo` runs it last)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

README_BLOCK = "demo"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render(results: dict[str, Any], timings: dict[str, float]) -> str:
    """The demo's table (one row per arm) and the donors its recycled arm picked, from results.json."""
    metric, rows = results["metric"], results["rows"]
    seeds = rows[0]["seeds"]
    held = "heldout" in rows[0]
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores; "
             f"{sum(timings.values()):.0f} s of stages in `timings.json` (world build not included).", "",
             f"| arm | rank / alpha (trainable params) | step-0 val {metric} | final val {metric} ± std ({seeds} seeds) | "
             + (f"held-out {rows[0]['heldout_metric']} ± std | " if held else "") + "parity step (% of budget) |",
             "|---|---|---|---|" + ("---|" if held else "") + "---|"]
    for r in rows:
        shape = "—" if r.get("rank") is None else f"{r['rank']} / {r['alpha']:g} ({r['trainable_params']:,})"
        parity = "never" if r["parity_step"] is None else f"{r['parity_step']} ({r['parity_pct']:.0f} %)"
        ho = f"{_fmt(r['heldout'])} ± {_fmt(r['heldout_std'])} | " if held else ""
        lines.append(f"| {r['arm']} | {shape} | {_fmt(r['step0'])} | {_fmt(r['final'])} ± {_fmt(r['final_std'])} | "
                     f"{ho}{parity} |")
    for arm, sel in results["selections"].items():
        picked = ", ".join(f"`{d['donor']}` (loss {d['loss']:.3f}, token accuracy {_fmt(d.get('token_accuracy'))})"
                           for d in sel["donors"])
        base = "" if sel.get("base_loss") is None else f"; base model loss {sel['base_loss']:.3f}"
        lines += ["", f"`{arm}` selected ({sel['strategy']} by {sel.get('metric', 'loss')}, {sel['weighting']}): "
                      f"{picked}{base}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from bench.readme import replace_block

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--readme", type=Path, default=Path("README.md"))
    args = ap.parse_args(argv)
    results = json.loads((args.run / "results.json").read_text())
    timings = json.loads((args.run / "timings.json").read_text()) if (args.run / "timings.json").exists() else {}
    print(replace_block(README_BLOCK, render(results, timings), args.readme))


if __name__ == "__main__":
    main()
