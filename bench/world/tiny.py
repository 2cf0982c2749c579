"""Tiny, deterministic artifacts built locally: a byte-level BPE tokenizer, a random Llama, real PEFT adapters.

Model hubs are unreachable on our machines, so tests, the demo and the benches build their own world from these
(after mergekit's `make_picollama`). Everything is seeded: the same call always writes the same bytes.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
    "phi chi psi omega red green blue cyan magenta yellow black white one two three four five six seven eight "
    "nine zero add sub mul copy reverse sort upper lower first last count sum max min"
).split()
SPECIALS = ("<s>", "</s>", "<pad>")


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n_lines)]
    lines.append("0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ :;,.-+=()[]->")
    return lines


def train_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE trained on `texts`, wrapped for transformers, with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts if texts is not None else corpus()), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    tokenizer=None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
) -> Path:
    """Random-init Llama saved as safetensors with its tokenizer; a few MB, under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),  # larger than the tokenizer: a realistic LM-head cost
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def write_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    init_std: float = 0.05,
    base_model=None,
) -> Path:
    """A real PEFT LoRA on disk with non-zero B, so that it changes the base's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = base_model if base_model is not None else AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    peft_model.save_pretrained(str(out_dir))
    if base_model is not None:
        peft_model.unload()
    return Path(out_dir)


def write_task(path: str | Path, n: int, seed: int = 0, op: str = "reverse", choices: int = 0, shots: int = 0) -> Path:
    """A small synthetic prompt/completion JSONL; `choices` > 0 adds multiple-choice fields, `shots` > 0 puts
    solved demonstrations in each prompt (longer prompts, as in real few-shot tasks)."""
    rng = random.Random(seed)
    ops = {
        "reverse": lambda ws: list(reversed(ws)),
        "sort": sorted,
        "copy": list,
        "first": lambda ws: ws[:1],
    }
    rows = []
    for _ in range(n):
        ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        answer = " ".join(ops[op](ws))
        demos = []
        for _ in range(shots):
            dw = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            demos.append(f"{op}: {' '.join(dw)} -> {' '.join(ops[op](dw))}\n")
        row = {"prompt": "".join(demos) + f"{op}: {' '.join(ws)} ->", "completion": " " + answer}
        if choices:
            wrong = {" " + " ".join(rng.sample(WORDS, len(ws))) for _ in range(choices * 2)} - {row["completion"]}
            opts = [row["completion"], *sorted(wrong)[: choices - 1]]
            rng.shuffle(opts)
            row.update(choices=opts, answer=opts.index(row["completion"]))
        rows.append(row)
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p
