"""Write the screening tables into README.md and docs/screening.md from bench/results/screen.json.

Usage: python -m bench.screen_report [--results bench/results/screen.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.readme import replace_block

STRATEGIES = ("exhaustive", "cascade", "screen+exact", "combined")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def quality_table(res: dict[str, Any]) -> list[str]:
    """Per bench target: Spearman, the screen's rank of the exact best, and each strategy's top-2 picks."""
    lines = ["| pool | donors | Spearman | exact best 3: screen rank | top-2 recall in screen top 25% | regret (nats) / within 1 SE: "
             + " · ".join(STRATEGIES[1:]) + " | compute (fwd-example equiv.) vs exhaustive: " + " · ".join(STRATEGIES[1:]) + " |",
             "|---|---|---|---|---|---|---|"]
    pools = {k: v for k, v in res["pools"].items() if k != "scale"}
    for size, v in res["pools"].get("scale", {}).get("by_size", {}).items():
        pools[f"scale N={size}"] = v
    for name, p in pools.items():
        s = p["strategies"]
        ranks = ", ".join(str(b["screen_rank"]) for b in p["best_donors_screen_rank"].values())
        regret = " · ".join(f"{s[k]['regret']:.3f}{'' if s[k]['within_one_se'] else ' ✗'}" if k in s else "–"
                            for k in STRATEGIES[1:])
        compute = " · ".join(_pct(s[k]["compute_fraction"]) if k in s else "–" for k in STRATEGIES[1:])
        rec = p["recall_exact_top_k_in_screen_top_M"].get("k=2", {}).get("M=25%")
        lines.append(f"| {name} | {p['donors']} | {p['spearman']:.2f} | {ranks} | "
                     f"{'–' if rec is None else f'{rec:.2f}'} | {regret} | {compute} |")
    return lines


def wall_table(res: dict[str, Any]) -> list[str]:
    lines = ["| pool size | " + " | ".join(f"{k}: wall-clock (share of exhaustive), top-2 recall" for k in STRATEGIES) + " |",
             "|---" * (len(STRATEGIES) + 1) + "|"]
    for size, p in res["pools"].get("scale", {}).get("by_size", {}).items():
        s = p["strategies"]
        cells = [f"{s[k]['seconds']:.0f} s ({_pct(s[k]['wall_clock_fraction'])}), {s[k]['top2_recall']:.2f}"
                 if k in s else "–" for k in STRATEGIES]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def break_even_table(res: dict[str, Any]) -> list[str]:
    be = res.get("break_even")
    if not be:
        return []
    names = [k for k in STRATEGIES if any(k in r for r in be["rows"])]
    lines = [f"Parity at {_pct(be['parity_fraction']['mashup'])} of the finetune (recycled) vs "
             f"{_pct(be['parity_fraction']['scratch'])} (scratch). {be['rule']}.", "",
             "| finetune steps × batch | pool | finetune saved | " + " | ".join(f"{k}: selection" for k in names) + " |",
             "|---" * (len(names) + 3) + "|"]
    for r in be["rows"]:
        saved = next(iter(r[k]["saved"] for k in names if k in r))
        cells = [f"{r[k]['selection']:,} {'✓' if r[k]['recycled_sooner'] else '✗'}" if k in r else "–" for k in names]
        lines.append(f"| {r['finetune_steps']} × {r['batch']} | {r['pool']} | {saved:,} | " + " | ".join(cells) + " |")
    return lines


def render(res: dict[str, Any]) -> str:
    parts = [f"Measured {res['date']} on {res['machine']} (`{res['command']}`); ✗ marks a miss. Compute in forward-"
             "example equivalents (backward = 2 forwards), wall-clock from measured per-donor seconds per stage.", "",
             *quality_table(res), ""]
    wall = wall_table(res)
    if len(wall) > 2:
        parts += [*wall, ""]
    parts += break_even_table(res)
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("bench/results/screen.json"))
    args = ap.parse_args()
    text = render(json.loads(args.results.read_text()))
    for path in (Path("README.md"), Path("docs/screening.md")):
        replace_block("bench-screen", text, path)
        print(f"rewrote the bench-screen block of {path}")


if __name__ == "__main__":
    main()
