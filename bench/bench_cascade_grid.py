"""The cascade's knobs at the paper's 256 examples: first slice, keep fraction and margin, over every bench target.

Per target, one real cascade that keeps every donor (`keep_fraction: 1`, first slice 2, growth 2) stores each donor's
exact loss statistics on every prefix of the cascade's seeded order: 2, 4, 8, …, 256 examples. Any cascade with a
power-of-two first slice and growth 2 sees exactly these prefix rows, so it is replayed from them with the engine's
own rules (`engine.scoring.cascade.prune` and `next_size`); `tests/bench/test_bench_cascade_grid.py` checks a replay
against a real cascade run, picks and compute. Per grid point and target: the regret of its top-2 (exact loss, in
nats, against exhaustive selection's top-2), whether that is within one standard error of the 2nd best, top-2 recall
with near-ties counted (a donor within one SE of the 2nd best is as good as it), and its compute as a share of
exhaustive scoring (donor × example pairs, the increments each round adds).

Settling (`cascade.settle_k`, engine/scoring/cascade.py) is replayed the same way, from the per-example losses each
prefix row holds: the default cascade with and without settling on the top-2, over settle_z × settle_min_examples,
on each target's whole pool and on seeded 15-donor pools drawn from it (a small pool is where `min_survivors` cost
most).

Usage: python -m bench.bench_cascade_grid [--readme] [--targets a,b] → bench/results/cascade_grid.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from bench.readme import add_output_options, machine, publish, rendered_only
from engine.core.scores import BASE_ROW

RESULTS = Path("bench/results/cascade_grid.json")
README_BLOCK = "bench-cascade-grid"
OUT = Path(".cache/cascade_grid")
FIRST_SLICES = (2, 4, 8, 16, 32)
KEEP_FRACTIONS = (0.05, 0.1, 0.25, 0.5)
ZS = (0.0, 1.0, 2.0, 3.0)
MIN_SURVIVORS = (4, 8)
OLD_DEFAULT = (16, 0.25, 2.0, 8)  # the defaults set at 64 examples (first slice, keep fraction, z, min_survivors)
# The recommendation: the cheapest setting that is safe on every target while keeping a margin (z >= 1) and a first
# slice with a variance worth the name (>= 4 examples): the bench targets have clear winners, so settings without
# them look safe here and may not be on a pool with near-ties.
MIN_Z, MIN_FIRST_SLICE = 1.0, 4
SETTLE_K, SETTLE_ZS, SETTLE_MINS = 2, (1.0, 2.0, 3.0), (8, 16, 32)
SMALL_POOL, SMALL_DRAWS = 15, 5


def prefix_stats(out: Path) -> dict[int, dict[str, Any]]:
    """{prefix size: {donor: RoundStats}} from a keep-everyone cascade's store (exact ok rows, the base left out)."""
    from engine.scoring.cascade import PARTIAL, RoundStats, prefix_size
    from engine.scoring.store import read_scores

    df = read_scores(out)
    df = df[(df.status == "ok") & (df.kind == "exact") & (df.donor != BASE_ROW)]
    total = int(df[~df.sample_id.str.contains(PARTIAL, regex=False)].n_examples.max())
    by_n: dict[int, dict[str, Any]] = {}
    for row in df.to_dict("records"):
        sid = row["sample_id"]
        n = prefix_size(sid) or total
        by_n.setdefault(n, {})[row["donor"]] = RoundStats.from_row(row)
    return by_n


def replay(stats: dict[int, dict[str, Any]], first_slice: int, keep_fraction: float, z: float,
           min_survivors: int = 8, growth: float = 2.0, **settling: Any) -> tuple[list[str], int]:
    """A cascade run on stored prefix rows: (its final ranking, best first; donor × example pairs it scores).
    `settling`: the cascade's settle_k, settle_z and settle_min_examples."""
    from engine.scoring.cascade import CascadeConfig, next_size, prune, settle

    cfg = CascadeConfig(first_slice=first_slice, keep_fraction=keep_fraction, z=z, min_survivors=min_survivors,
                        growth=growth, **settling)
    total = max(stats)
    survivors, prev, n, compute = list(stats[total]), 0, min(first_slice, total), 0
    while True:
        if n not in stats:
            raise ValueError(f"no stored prefix of {n} examples (the grid needs power-of-two prefixes)")
        compute += len(survivors) * (n - prev)
        round_stats = {d: stats[n][d] for d in survivors}
        if n >= total:
            return sorted(round_stats, key=lambda d: (round_stats[d].loss, d)), compute
        survivors, _ = prune(round_stats, cfg)
        survivors, _ = settle(round_stats, survivors, n, cfg)
        prev, n = n, next_size(n, len(survivors), total, cfg)


def judge(stats: dict[int, dict[str, Any]], ranking: list[str], compute: int, k: int = 2) -> dict[str, Any]:
    """Regret, within-one-SE and near-tie recall of the top k of `ranking`, against exhaustive selection."""
    full = stats[max(stats)]
    exact = sorted(full, key=lambda d: (full[d].loss, d))
    kth = full[exact[k - 1]]
    good = {d for d in full if full[d].loss <= kth.loss + kth.stderr}
    picks = ranking[:k]
    regret = sum(full[d].loss for d in picks) / k - sum(full[d].loss for d in exact[:k]) / k
    return {"picks": picks, "regret": regret, "within_one_se": regret <= kth.stderr,
            "recall": sum(d in good for d in picks) / k, "compute_fraction": compute / (len(full) * max(stats))}


def grid(per_target: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for f, keep, z, m in itertools.product(FIRST_SLICES, KEEP_FRACTIONS, ZS, MIN_SURVIVORS):
        judged = {t: judge(s, *replay(s, f, keep, z, min_survivors=m)) for t, s in per_target.items()}
        rows.append({"first_slice": f, "keep_fraction": keep, "z": z, "min_survivors": m,
                     "targets_within_one_se": sum(j["within_one_se"] for j in judged.values()),
                     "min_recall": min(j["recall"] for j in judged.values()),
                     "worst_regret": max(j["regret"] for j in judged.values()),
                     "mean_compute_fraction": sum(j["compute_fraction"] for j in judged.values()) / len(judged),
                     "max_compute_fraction": max(j["compute_fraction"] for j in judged.values()),
                     "per_target": judged})
    return rows


def small_pools(stats: dict[int, dict[str, Any]], size: int, draws: int, seed: str) -> list[dict[int, dict[str, Any]]]:
    """`draws` seeded pools of `size` donors from one target's pool: every prefix restricted to them."""
    donors, rng = sorted(stats[max(stats)]), random.Random(f"small-pool:{seed}")
    return [{n: {d: s[d] for d in chosen} for n, s in stats.items()}
            for chosen in (sorted(rng.sample(donors, size)) for _ in range(draws))]


def settling_grid(per_target: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The default cascade without and with settling on the top-2, on the whole pools and on small pools."""
    from engine.scoring.cascade import CascadeConfig

    d = CascadeConfig()
    rows = []
    for size in ("all", SMALL_POOL):
        pools = [p for t, s in per_target.items()
                 for p in ([s] if size == "all" else small_pools(s, SMALL_POOL, SMALL_DRAWS, t))]
        for settle_z, settle_min in [(None, None), *itertools.product(SETTLE_ZS, SETTLE_MINS)]:
            opts = {} if settle_z is None else {"settle_k": SETTLE_K, "settle_z": settle_z,
                                                "settle_min_examples": settle_min}
            judged = [judge(p, *replay(p, d.first_slice, d.keep_fraction, d.z, d.min_survivors, d.growth, **opts))
                      for p in pools]
            rows.append({"pool": size, "pools": len(pools), "settle_z": settle_z, "settle_min_examples": settle_min,
                         "within_one_se": sum(j["within_one_se"] for j in judged),
                         "min_recall": min(j["recall"] for j in judged),
                         "worst_regret": max(j["regret"] for j in judged),
                         "mean_compute_fraction": sum(j["compute_fraction"] for j in judged) / len(judged),
                         "max_compute_fraction": max(j["compute_fraction"] for j in judged)})
    return rows


def render_settling(rows: list[dict[str, Any]], donors: int) -> str:
    lines = [f"Settling, replayed on the same rows: the default cascade (first slice 4, keep 0.05, z 1, min_survivors "
             f"4) without and with `settle_k: {SETTLE_K}`, on each target's whole pool and on {SMALL_DRAWS} seeded "
             f"{SMALL_POOL}-donor pools per target. Picks within one SE of exhaustive selection's top-2 (near-ties "
             "counted), and compute as a share of exhaustive scoring.", "",
             "| pool | settle_z | settle_min_examples | pools within 1 SE | worst regret (nats) | compute vs exhaustive: "
             "mean (max) |", "|---|---|---|---|---|---|"]
    for r in rows:
        off = r["settle_z"] is None
        lines.append(f"| {f'whole ({donors})' if r['pool'] == 'all' else str(r['pool']) + ' donors'} | "
                     f"{'off' if off else format(r['settle_z'], 'g')} | {'' if off else r['settle_min_examples']} | "
                     f"{r['within_one_se']}/{r['pools']} | {r['worst_regret']:.3f} | "
                     f"{100 * r['mean_compute_fraction']:.1f}% ({100 * r['max_compute_fraction']:.1f}%) |")
    lines += ["", f"Settling still scores its {SETTLE_K} picks on the whole sample, so that selection ranks whole-sample "
              f"rows: that alone is {SETTLE_K}/N of exhaustive scoring ({100 * SETTLE_K / SMALL_POOL:.1f}% at "
              f"{SMALL_POOL} donors, {100 * SETTLE_K / donors:.1f}% at {donors})."]
    return "\n".join(lines)


def settings(r: dict[str, Any]) -> tuple:
    return r["first_slice"], r["keep_fraction"], r["z"], r["min_survivors"]


def recommended(rows: list[dict[str, Any]], n_targets: int) -> dict[str, Any] | None:
    safe = [r for r in rows if r["targets_within_one_se"] == n_targets and r["min_recall"] == 1.0
            and r["z"] >= MIN_Z and r["first_slice"] >= MIN_FIRST_SLICE]
    return min(safe, key=lambda r: (r["mean_compute_fraction"], -r["z"], -r["min_survivors"]), default=None)


def render(res: dict[str, Any]) -> str:
    meta, rows = res["meta"], res["grid"]
    n = len(meta["targets"])
    safe = sorted((r for r in rows if r["targets_within_one_se"] == n and r["min_recall"] == 1.0),
                  key=lambda r: (r["mean_compute_fraction"], -r["z"]))
    old = next(r for r in rows if settings(r) == tuple(meta["old_default"]))
    rec = recommended(rows, n)
    cheapest = min(rows, key=lambda r: r["mean_compute_fraction"])
    lines = [f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}`: {n} bench targets × "
             f"{meta['donors']} donors, 256 examples; {len(rows)} settings replayed on the same prefix rows "
             f"(first slice {list(FIRST_SLICES)}, keep fraction {list(KEEP_FRACTIONS)}, z {list(ZS)}, min_survivors "
             f"{list(MIN_SURVIVORS)}; growth 2). Safe: the top-2 is within one SE of exhaustive selection's on every "
             "target, near-ties counted.", "",
             "| first slice | keep fraction | z | min_survivors | targets within 1 SE | worst regret (nats) | compute vs "
             "exhaustive: mean (max) |", "|---|---|---|---|---|---|---|"]

    def fmt(r: dict[str, Any], tag: str = "") -> str:
        return (f"| {r['first_slice']}{tag} | {r['keep_fraction']} | {r['z']:g} | {r['min_survivors']} | "
                f"{r['targets_within_one_se']}/{n} | {r['worst_regret']:.3f} | "
                f"{100 * r['mean_compute_fraction']:.1f}% ({100 * r['max_compute_fraction']:.1f}%) |")

    lines.append(fmt(old, " (old default)"))
    if rec is not None:
        lines.append(fmt(rec, " (new default)"))
    lines += [fmt(r) for r in safe[:6] if r is not rec]
    lines += ["", f"{len(safe)} of {len(rows)} settings are safe on every target; the cheapest of all (first slice "
              f"{cheapest['first_slice']}, keep {cheapest['keep_fraction']}, z {cheapest['z']:g}, min_survivors "
              f"{cheapest['min_survivors']}) costs {100 * cheapest['mean_compute_fraction']:.1f}% and is within one SE "
              f"on {cheapest['targets_within_one_se']}/{n}. The old default costs "
              f"{100 * old['mean_compute_fraction']:.1f}%."
              + (f" The new default is the cheapest safe setting that keeps a margin (z ≥ {MIN_Z:g}) and a first slice "
                 f"of at least {MIN_FIRST_SLICE} examples: {100 * rec['mean_compute_fraction']:.1f}%." if rec else "")]
    if res.get("settling"):
        lines += ["", render_settling(res["settling"], meta["donors"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=Path(".cache/worlds/bench"))
    ap.add_argument("--targets", default=None, help="comma-separated; default: every target of the world")
    ap.add_argument("--samples", type=int, default=256)
    add_output_options(ap, RESULTS)
    args = ap.parse_args(argv)
    if rendered_only(args, README_BLOCK, render):
        return

    from engine.scoring import ScoreConfig, score

    targets = args.targets.split(",") if args.targets else json.loads((args.world / "world.json").read_text())["spec"]["targets"]
    per_target, t0 = {}, time.perf_counter()
    for target in targets:
        out = OUT / f"{args.world.name}-{target}-{args.samples}"  # resumable: a rerun scores nothing twice
        score(ScoreConfig(base=str(args.world / "base"), donors=[str(args.world / "donors" / f"manifest-{target}.jsonl")],
                          data=args.world / "tasks" / target / "train.jsonl", out=out, samples=args.samples,
                          executor="local", donors_per_call=8, strategy="cascade",
                          cascade={"first_slice": 2, "keep_fraction": 1.0, "z": 0.0}))
        per_target[target] = prefix_stats(out)
    command = "python -m bench.bench_cascade_grid" + (f" --targets {args.targets}" if args.targets else "")
    res = {"meta": {"date": time.strftime("%Y-%m-%d"), "command": command, "targets": targets,
                    "donors": len(next(iter(per_target.values()))[args.samples]), "old_default": list(OLD_DEFAULT),
                    "seconds": time.perf_counter() - t0,
                    "machine": machine()},
           "grid": grid(per_target), "settling": settling_grid(per_target)}
    publish(res, args, README_BLOCK, render)


if __name__ == "__main__":
    main()
