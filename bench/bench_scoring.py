"""Scoring throughput: our engine vs the naive PEFT loop, side by side in one run on the same pool and data.

The naive loop is what people write by hand: load the base once, then per donor `PeftModel.from_pretrained`
→ one batched forward over the sample (full logits) → `unload`. Ours: `engine.scoring.score` with resident
actors, an adapter LRU, mixed-adapter batches and LM-head-at-completion-only.

Usage: python -m bench.bench_scoring [--donors 64] [--examples 32]   → bench/results/scoring.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from bench.common import build_pool_world, load_sample, naive_peft_loop

RESULTS = Path("bench/results/scoring.json")


def engine_run(root: Path, actors: int, donors_per_call: int) -> dict:
    from engine.scoring import ScoreConfig, score
    from engine.store import read_scores

    out = root / f"out_a{actors}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = ScoreConfig(base=str(root / "base"), donors=[str(root / "pool")], data=root / "task.jsonl", out=out,
                      samples=None, actors=actors, cpus_per_actor=max(1, (os.cpu_count() or 2) // actors),
                      donors_per_call=donors_per_call, backend_options={"max_resident": donors_per_call + 2})
    t0 = time.perf_counter()
    summary = score(cfg)
    seconds = time.perf_counter() - t0
    df = read_scores(out).set_index("donor")
    return {"seconds": seconds, "donors": summary.scored - 1, "actors": actors,
            "losses": {k: float(v) for k, v in df.loss.items() if k != "__base__"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--donors", type=int, default=64)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--donors-per-call", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from engine.ray_utils import ensure_ray

    root = build_pool_world(args.donors, args.examples, args.vocab, args.hidden, args.layers)
    sample = load_sample(root)
    torch.set_num_threads(os.cpu_count() or 1)
    _, naive_s, naive_losses = naive_peft_loop(root, sample, sorted((root / "pool").iterdir()))
    naive = {"seconds": naive_s, "donors": len(naive_losses), "losses": naive_losses}
    ensure_ray(include_dashboard=False)
    ours = {a: engine_run(root, a, args.donors_per_call) for a in (1, 2)}
    diff = max(abs(ours[1]["losses"][k] - v) for k, v in naive["losses"].items())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "world": {"donors": args.donors, "examples": args.examples, "completion_tokens": sample.n_tokens,
                  "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "lora": "r16 q/k/v/o"},
        "naive_donors_per_s": naive["donors"] / naive["seconds"],
        "engine_1actor_donors_per_s": ours[1]["donors"] / ours[1]["seconds"],
        "engine_2actors_donors_per_s": ours[2]["donors"] / ours[2]["seconds"],
        "max_abs_loss_diff_vs_naive": diff,
        "note": "engine time includes Ray actor start-up and base load; naive time excludes its single base load",
    }
    result["speedup_1actor"] = result["engine_1actor_donors_per_s"] / result["naive_donors_per_s"]
    result["speedup_2actors"] = result["engine_2actors_donors_per_s"] / result["naive_donors_per_s"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "world"}, indent=2))


if __name__ == "__main__":
    main()
