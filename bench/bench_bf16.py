"""bfloat16 scoring on a CPU against float32: speed and ranking, side by side in one run (issue 22, item 4).

Each pool is scored exhaustively (`executor: local`) twice per repeat, once per dtype, interleaved, in fresh output
folders: `backend_options: {dtype: float32}` and `{dtype: bfloat16}` (the model and the LoRA slots in bf16; the
loss is reduced in float32). Per dtype: the scoring seconds once the base is loaded, per scored row (the donors and
the base), and the losses. Between the dtypes: the speed ratio, the Spearman correlation of the donors' losses, whether
the top-k is the same set, and the largest loss difference. The CPU's bf16 units are recorded (`avx512_bf16`, and
`amx_bf16`: AMX tiles); a float32 matmul and a bf16 matmul of the same shape set the hardware's own ratio.

Pools: `demo` (the demo world's 12 trained donors on rev+dropf, 256 examples: a ranking that means something) and
`wide` (the roofline's random Llama, hidden 512 × 8 layers, 24 random r16 donors, 64 examples: the forward dominates).

Usage: python -m bench.bench_bf16 [--readme] [--pools demo,wide] [--repeats 2]  → bench/results/bf16.json
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from bench.readme import add_output_options, machine, publish, rendered_only

RESULTS = Path("bench/results/bf16.json")
README_BLOCK = "bench-bf16"
CACHE = Path(".cache/bf16")
DTYPES = ("float32", "bfloat16")
TOP_K = 2


def pool(name: str) -> dict[str, Any]:
    """base, donor manifest, data and sample size of one pool (built deterministically and cached)."""
    if name == "demo":
        root = Path(".cache/worlds/demo")
        if not (root / "world.json").exists():
            raise SystemExit(f"{root} is missing: build it with `python -m bench.world.build --scale demo`")
        return {"base": root / "base", "manifest": root / "donors" / "manifest-rev+dropf.jsonl",
                "data": root / "tasks" / "rev+dropf" / "train.jsonl", "samples": 256}
    if name == "wide":
        from bench.bench_roofline import SAMPLES, world

        return {**world("wide", 24), "samples": SAMPLES}
    raise SystemExit(f"unknown pool {name!r}: use demo or wide")


def score_job(spec: dict[str, Any], dtype: str, out: Path) -> dict[str, Any]:
    """One exhaustive local job in a fresh folder: its scoring seconds after the base loaded, and the losses."""
    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores

    shutil.rmtree(out, ignore_errors=True)
    cfg = ScoreConfig(base=str(spec["base"]), donors=[str(spec["manifest"])], data=spec["data"], out=out,
                      samples=spec["samples"], executor="local", backend_options={"dtype": dtype})
    summary = score(cfg)
    rows = read_scores(out)
    ok = rows[rows.status == "ok"]
    return {"seconds": summary.seconds, "scoring_s": summary.seconds - summary.startup["scorer_ready"],
            "rows": int(len(ok)), "losses": dict(zip(ok.donor, ok.loss.astype(float)))}


def compare(reference: dict[str, float], other: dict[str, float], k: int = TOP_K) -> dict[str, Any]:
    """How far `other`'s donor ranking (lower loss first) is from `reference`'s: Spearman, the same top-k set,
    the largest loss difference. The base's row is compared for its loss, not ranked."""
    import pandas as pd

    from engine.core.scores import BASE_ROW

    donors = sorted(d for d in reference if d != BASE_ROW and d in other)
    a, b = pd.Series([reference[d] for d in donors]), pd.Series([other[d] for d in donors])
    top = lambda losses: set(sorted(donors, key=lambda d: (losses[d], d))[:k])  # noqa: E731
    ordered = sorted(reference[d] for d in donors)
    return {"donors": len(donors), "spearman": float(a.rank().corr(b.rank())),  # Pearson on ranks: no scipy needed
            "same_top_k": top(reference) == top(other), "k": k,
            "top_k_margin": ordered[k] - ordered[k - 1] if len(ordered) > k else None,  # the k-th vs the next, fp32
            "max_abs_loss_diff": max(abs(reference[d] - other[d]) for d in [*donors, BASE_ROW] if d in other)}


def matmul_ratio(size: int = 512, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of one float32 and one bf16 matmul of the same shape, on the scorer's threads: the hardware's ratio."""
    import torch

    out = {}
    for dtype in DTYPES:
        a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, 4 * size, dtype=getattr(torch, dtype))
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        out[dtype] = 2 * size * size * 4 * size * repeats / (time.perf_counter() - t0) / 1e9
    return {"gflops": out, "ratio": out["bfloat16"] / out["float32"]}


def cpu_bf16_units() -> dict[str, bool]:
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def summarize(jobs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per dtype the fastest of the repeats (the first job of a dtype in a process also pays its kernels' warm-up);
    bf16 against float32 on the first repeat's losses (scoring is deterministic per dtype)."""
    per = {dt: {"scoring_s": min(j["scoring_s"] for j in js), "rows": js[0]["rows"],
                "scoring_s_all": [j["scoring_s"] for j in js],
                "per_row_ms": 1000 * min(j["scoring_s"] / j["rows"] for j in js)} for dt, js in jobs.items()}
    return {"dtypes": per, "speedup": per["float32"]["per_row_ms"] / per["bfloat16"]["per_row_ms"],
            "ranking": compare(jobs["float32"][0]["losses"], jobs["bfloat16"][0]["losses"])}


def render(res: dict[str, Any]) -> str:
    meta, units, mm = res["meta"], res["cpu"], res["matmul"]
    has = ", ".join(k for k, v in units.items() if v) or "neither avx512_bf16 nor amx_bf16"
    lines = [f"Measured {meta['date']} on {meta['machine']} ({has}) with `{meta['command']}` (fastest of "
             f"{meta['repeats']} repeats, dtypes interleaved). A plain {mm['size']}×{mm['size']} @ "
             f"{mm['size']}×{4 * mm['size']} matmul: float32 {mm['gflops']['float32']:.0f} GFLOP/s, bf16 "
             f"{mm['gflops']['bfloat16']:.0f} GFLOP/s (**{mm['ratio']:.2f}×**).", "",
             "| pool | float32 per row | bf16 per row | bf16 speed-up | Spearman (donor losses) | same top-2 | "
             "float32 gap, 2nd to 3rd donor | largest loss difference |", "|---|---|---|---|---|---|---|---|"]
    for name, p in res["pools"].items():
        d, r = p["dtypes"], p["ranking"]
        gap = "–" if r.get("top_k_margin") is None else f"{r['top_k_margin']:.4f}"
        lines.append(f"| {name} ({r['donors']} donors, {p['samples']} ex.) | {d['float32']['per_row_ms']:.0f} ms | "
                     f"{d['bfloat16']['per_row_ms']:.0f} ms | **{p['speedup']:.2f}×** | {r['spearman']:.3f} | "
                     f"{'yes' if r['same_top_k'] else 'no'} | {gap} | {r['max_abs_loss_diff']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import datetime

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pools", default="demo,wide")
    ap.add_argument("--repeats", type=int, default=3)
    add_output_options(ap, RESULTS)
    args = ap.parse_args(argv)
    if rendered_only(args, README_BLOCK, render):
        return
    names = [n.strip() for n in args.pools.split(",") if n.strip()]
    specs = {n: pool(n) for n in names}
    jobs: dict[str, dict[str, list]] = {n: {dt: [] for dt in DTYPES} for n in names}
    for rep in range(args.repeats):
        for n in names:
            for dt in DTYPES if rep % 2 == 0 else reversed(DTYPES):
                jobs[n][dt].append(score_job(specs[n], dt, CACHE / f"{n}-{dt}"))
                print(f"{n} {dt} repeat {rep}: {jobs[n][dt][-1]['scoring_s']:.2f} s", flush=True)
    mm = {**matmul_ratio(), "size": 512}
    res = {"meta": {"date": datetime.date.today().isoformat(), "machine": machine(), "repeats": args.repeats,
                    "threads": torch.get_num_threads(), "command": "python -m bench.bench_bf16"},
           "cpu": cpu_bf16_units(), "matmul": mm,
           "pools": {n: {**summarize(jobs[n]), "samples": specs[n]["samples"]} for n in names}}
    publish(res, args, README_BLOCK, render)


if __name__ == "__main__":
    main()
