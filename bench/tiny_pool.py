"""Build (once, deterministically) the tiny built-in world `make demo` scores: a base, a donor pool and a task.

Usage: python -m bench.tiny_pool OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = {"reverse": ("q_proj", "v_proj"), "sort": ("q_proj", "k_proj", "v_proj", "o_proj"), "copy": ("v_proj",)}


def build(out: Path, donors_per_family: int = 4) -> Path:
    from transformers import AutoModelForCausalLM

    from engine.testing import build_tiny_llama, train_tokenizer, write_lora_adapter, write_task

    done = out / "READY"
    if done.exists():
        return out
    base = out / "base"
    build_tiny_llama(base, train_tokenizer(base), hidden_size=64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    manifest = []
    seed = 0
    for family, modules in FAMILIES.items():
        for i in range(donors_per_family):
            seed += 1
            folder = out / "pool" / family / f"v{i}"
            write_lora_adapter(base, folder, seed=seed, r=8, alpha=16, target_modules=modules, init_std=0.1,
                               base_model=model)
            manifest.append({"id": f"{family}/v{i}", "path": f"{family}/v{i}", "family": family, "step": 100 * (i + 1)})
    (out / "pool" / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    write_task(out / "task.jsonl", 64, seed=0, op="reverse", choices=4)
    done.write_text("ok\n")
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo")))
