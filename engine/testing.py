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


def write_bad_donors(good: str | Path, out_root: str | Path, other_base: str | Path) -> dict[str, str]:
    """Malformed and hostile donors made from one good donor: name → a phrase its error must contain.

    `other_base` is a base of a different width, for the wrong-base donor.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    good, root = Path(good), Path(out_root)
    expect: dict[str, str] = {}

    def clone(name: str) -> Path:
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    def edit_config(folder: Path, **changes) -> None:
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(changes)
        cfg_path.write_text(json.dumps(cfg))

    weights = "adapter_model.safetensors"
    write_lora_adapter(other_base, root / "wrong_base", seed=7)
    expect["wrong_base"] = "shape mismatch"
    edit_config(clone("missing_target"), target_modules=["q_proj", "v_proj", "w_proj"])
    expect["missing_target"] = "not found in the base model"
    edit_config(clone("rank_mismatch"), r=4)
    expect["rank_mismatch"] = "rank mismatch"
    f = clone("nan_weights") / weights
    tensors = load_file(str(f))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(f))
    expect["nan_weights"] = "non-finite"
    f = clone("truncated") / weights
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect["truncated"] = "corrupt"
    f = clone("huge_header") / weights
    f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:])
    expect["huge_header"] = "header claims"
    d = clone("bin_only")
    torch.save({"not": torch.zeros(1)}, d / "adapter_model.bin")
    (d / weights).unlink()
    expect["bin_only"] = "refusing to unpickle"
    (clone("missing_config") / "adapter_config.json").unlink()
    expect["missing_config"] = "missing adapter_config.json"
    edit_config(clone("not_lora"), peft_type="IA3")
    expect["not_lora"] = "unsupported adapter type"
    edit_config(clone("remote_code"), trust_remote_code=True)
    expect["remote_code"] = "custom code"
    return expect


def publish_to_hf_cache(cache_dir: str | Path, repo_id: str, folder: str | Path, revision: str = "main") -> Path:
    """Lay a folder out as `huggingface_hub` caches a model repo, so Hub code runs offline against it."""
    import hashlib
    import shutil

    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap, dirs_exist_ok=True)
    return snap


def peft_reference_loss(base_dir: str | Path, adapter: str | Path | None, sample) -> tuple[float, float]:
    """The independent check for every backend: one `PeftModel.from_pretrained` per donor, one example at a time,
    no padding, full logits. Returns (mean completion NLL in nats, token accuracy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for ex in sample.examples:
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
            sl = slice(ex.n_prompt - 1, None)
            nll -= logp[sl].double().sum().item()
            hits += (logits.argmax(-1)[sl] == targets[sl]).sum().item()
            n += ex.n_completion
    return nll / n, hits / n
