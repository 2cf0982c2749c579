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
from engine.core.scores import BASE_ROW

RESULTS = Path("bench/results/scoring.json")


def engine_run(root: Path, actors: int, donors_per_call: int) -> dict:
    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores

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
            "losses": {k: float(v) for k, v in df.loss.items() if k != BASE_ROW}}


def forward_flops(root: Path, sample) -> float:
    """Useful forward FLOPs for one donor over the sample: 2·(linear + LoRA params)·tokens, the LM head only at
    completion tokens (as our backend computes it), attention scores 4·layers·len²·hidden per sequence. Padding and
    recomputation are not counted, so they lower the efficiency, as they should."""
    import json as _json

    from safetensors import safe_open

    cfg = _json.loads((root / "base" / "config.json").read_text())
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    donor = next((root / "pool").iterdir()) / "adapter_model.safetensors"
    with safe_open(str(donor), "pt") as f:
        lora = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    lengths = [len(e.input_ids) for e in sample.examples]
    return (2.0 * (linear + lora) * sum(lengths) + 2.0 * h * cfg["vocab_size"] * sample.n_tokens
            + sum(4.0 * layers * n * n * h for n in lengths))


def matmul_flops_per_s(m: int, k: int, n: int, threads: int, repeats: int = 20) -> float:
    """The machine's reference: a plain fp32 torch matmul of a shape like the scorer's MLP, same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - t0
    torch.set_num_threads(before)
    return 2.0 * m * k * n * repeats / seconds


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
    from engine.core.ray_utils import ensure_ray

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
    flops = forward_flops(root, sample)
    cfg = json.loads((root / "base" / "config.json").read_text())
    tokens = sum(len(e.input_ids) for e in sample.examples) * args.donors_per_call
    reference = matmul_flops_per_s(tokens, cfg["hidden_size"], cfg["intermediate_size"], os.cpu_count() or 1)
    result["flops_per_donor"] = flops
    result["matmul_reference_flops_per_s"] = reference
    result["flop_efficiency"] = {
        f"{a}actor": flops * ours[a]["donors"] / ours[a]["seconds"] / reference for a in (1, 2)
    }
    result["flop_efficiency_note"] = (f"useful forward FLOP/s of the whole job (start-up included) / fp32 torch matmul "
                                      f"[{tokens}x{cfg['hidden_size']}]@[{cfg['hidden_size']}x{cfg['intermediate_size']}] "
                                      f"FLOP/s on {os.cpu_count()} threads")
    result["speedup_1actor"] = result["engine_1actor_donors_per_s"] / result["naive_donors_per_s"]
    result["speedup_2actors"] = result["engine_2actors_donors_per_s"] / result["naive_donors_per_s"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "world"}, indent=2))


if __name__ == "__main__":
    main()
