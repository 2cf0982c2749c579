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

CACHE = Path(".cache/bench_scoring")
RESULTS = Path("bench/results/scoring.json")


def build_world(n_donors: int, n_examples: int, vocab: int, hidden: int, layers: int) -> Path:
    from transformers import AutoModelForCausalLM

    from engine.testing import build_tiny_llama, train_tokenizer, write_lora_adapter, write_task

    root = CACHE / f"d{n_donors}_e{n_examples}_v{vocab}_h{hidden}_l{layers}_shots3"
    if (root / "READY").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base"
    build_tiny_llama(base, train_tokenizer(base), hidden_size=hidden, num_layers=layers, vocab_size=vocab,
                     max_positions=512)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    for i in range(n_donors):
        write_lora_adapter(base, root / "pool" / f"d{i:04d}", seed=i, r=16, alpha=32,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), init_std=0.02, base_model=model)
    write_task(root / "task.jsonl", n_examples, seed=0, op="sort", shots=3)
    (root / "READY").write_text("ok")
    return root


def naive_loop(root: Path, sample) -> dict:
    """Load base once; per donor: PeftModel.from_pretrained → forward (full logits) → unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()
    donors = sorted((root / "pool").iterdir())
    length = max(len(e.input_ids) for e in sample.examples)
    ids = torch.zeros((len(sample.examples), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(sample.examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    losses = {}
    t0 = time.perf_counter()
    for d in donors:
        model = PeftModel.from_pretrained(base, str(d))
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        total, n = 0.0, 0
        for i, e in enumerate(sample.examples):
            total -= logp[i, e.n_prompt - 1: len(e.input_ids) - 1].double().sum().item()
            n += e.n_completion
        losses[d.name] = total / n
        base = model.unload()
    return {"seconds": time.perf_counter() - t0, "donors": len(donors), "losses": losses}


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
    from transformers import AutoTokenizer

    from engine.data import encode_sample, load_jsonl
    from engine.ray_utils import ensure_ray

    root = build_world(args.donors, args.examples, args.vocab, args.hidden, args.layers)
    sample = encode_sample(AutoTokenizer.from_pretrained(str(root / "base")), load_jsonl(root / "task.jsonl"))
    torch.set_num_threads(os.cpu_count() or 1)
    naive = naive_loop(root, sample)
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
