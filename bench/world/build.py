"""Build a world, resumably and deterministically: base (briefly pretrained), donor LoRAs, target splits.

Usage: python -m bench.world.build --scale demo|bench [--out DIR]

Every artifact is skipped when it already exists, so an interrupted build resumes where it stopped. Donors are
trained with `engine.finetune` (the same recipe users get), the base with `transformers.Trainer`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from pydantic import Field

from bench.world import tasks as T
from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel

log = logging.getLogger("mashup.world")


class WorldSpec(StrictModel):
    name: str
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vocab: int = 320
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    targets: list[str] = Field(min_length=1)
    donor_tasks: list[str] | None = Field(None, description="None: every task (each target's pool leaves its own task out)")
    donor_seeds: int = 1
    shared_init: bool = Field(False, description="donors share one LoRA init seed (pilot: merges better)")
    threads: int = Field(2, ge=1, description="torch threads while building, whatever the machine (determinism)")
    donor_steps: int = 120
    donor_batch: int = 16
    donor_lr: float = 3e-3
    rank: int = 8
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    train_rows: int = 512
    val_rows: int = 100
    eval_rows: int = 200
    choices: int = 4


SCALES = {
    "demo": WorldSpec(
        name="demo",
        targets=["rev+dropf"],
        donor_tasks=["rev+id", "rev+swap", "rev+dbl", "sort+dropf", "rotl+dropf", "evens+dropf", "shift+dropf",
                     "sort+id", "num+sum", "num+max", "num+revnum", "num+first2"],
    ),
    "bench": WorldSpec(
        name="bench",
        targets=["rev+dropf", "sort+swap", "rotl+id", "evens+dbl", "shift+dropf", "rev+dbl", "sort+id", "rotl+swap"],
        donor_seeds=3,
    ),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def build_base(spec: WorldSpec, out: Path) -> Path:
    base = out / "base"
    if (base / "config.json").exists():
        return base
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from bench.world.tiny import build_tiny_llama, train_tokenizer

    lines = T.pretraining_lines(20000, seed=0)
    corpus = lines + [r["prompt"] + r["completion"] for t in T.all_tasks().values() for r in T.rows(t, 20, seed=99)]
    tmp = out / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = train_tokenizer(tmp, corpus, vocab_size=spec.vocab)
    build_tiny_llama(tmp, tok, hidden_size=spec.hidden, num_layers=spec.layers, num_heads=spec.heads, seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp))
    data = [{"input_ids": tok(line + tok.eos_token)["input_ids"]} for line in lines]
    args = TrainingArguments(
        output_dir=str(out / "pretrain.tmp"), max_steps=spec.pretrain_steps, per_device_train_batch_size=spec.pretrain_batch,
        learning_rate=spec.pretrain_lr, lr_scheduler_type="cosine", warmup_steps=spec.pretrain_steps // 20,
        logging_steps=max(1, spec.pretrain_steps // 10), save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, weight_decay=0.01,
    )
    torch.manual_seed(0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    model.save_pretrained(str(tmp))
    shutil.rmtree(out / "pretrain.tmp", ignore_errors=True)
    tmp.replace(base)
    return base


def write_splits(spec: WorldSpec, out: Path) -> dict[str, Path]:
    tasks = T.all_tasks()
    folders = {}
    for name in set(spec.targets) | set(donor_task_names(spec)):
        task, folder = tasks[name], out / "tasks" / name
        sib = T.siblings(task, tasks)
        if not (folder / "eval.jsonl").exists():
            _write_jsonl(folder / "train.jsonl", T.rows(task, spec.train_rows, seed=0))
            _write_jsonl(folder / "val.jsonl", T.rows(task, spec.val_rows, seed=1, choices=spec.choices, siblings=sib))
            _write_jsonl(folder / "eval.jsonl", T.rows(task, spec.eval_rows, seed=2, choices=spec.choices, siblings=sib))
        folders[name] = folder
    return folders


def donor_task_names(spec: WorldSpec) -> list[str]:
    return list(spec.donor_tasks) if spec.donor_tasks is not None else sorted(T.all_tasks())


def train_donors(spec: WorldSpec, out: Path, base: Path, folders: dict[str, Path]) -> list[dict]:
    from engine.finetune import FinetuneConfig, finetune

    tasks = T.all_tasks()
    entries = []
    names = [(n, s) for n in donor_task_names(spec) for s in range(spec.donor_seeds)]
    for i, (name, seed) in enumerate(names):
        rel = f"{name}/s{seed}"
        final = out / "donors" / rel
        if not (final / "adapter_model.safetensors").exists():
            log.info("donor %d/%d: %s", i + 1, len(names), rel)
            run = out / "donor_runs" / rel
            shutil.rmtree(run, ignore_errors=True)
            result = finetune(FinetuneConfig(
                base=str(base), data=str(folders[name] / "train.jsonl"), out=str(run), init=None,
                seed=0 if spec.shared_init else 1000 + i, steps=spec.donor_steps, batch_size=spec.donor_batch,
                lr=spec.donor_lr, warmup_steps=spec.donor_steps // 10, progress=False,
                lora={"r": spec.rank, "alpha": 2 * spec.rank, "target_modules": spec.target_modules},
            ))
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(result.adapter, final.with_suffix(".tmp"), dirs_exist_ok=True)
            final.with_suffix(".tmp").replace(final)
            shutil.rmtree(run, ignore_errors=True)
        entries.append({"id": rel, "path": rel, "task": name, "family": tasks[name].family, "step": spec.donor_steps})
    return entries


def deterministic(threads: int) -> None:
    """A world's bytes must not depend on the machine's core count: a fixed number of torch threads (float sums are
    reduced in a thread-count-dependent order), deterministic kernels, a fixed global seed. What remains is the CPU's
    instruction set and the torch version, which README states as the spread to expect."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)


def build(spec: WorldSpec, out: Path) -> Path:
    """Everything a run needs; returns the world folder (with world.json describing it)."""
    deterministic(spec.threads)
    out.mkdir(parents=True, exist_ok=True)
    base = build_base(spec, out)
    folders = write_splits(spec, out)
    entries = train_donors(spec, out, base, folders)
    for target in spec.targets:
        pool = [e for e in entries if e["task"] != target]
        _write_jsonl(out / "donors" / f"manifest-{target}.jsonl", pool)
    (out / "world.json").write_text(json.dumps({"spec": spec.model_dump(), "donors": entries}, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="demo")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(build(SCALES[args.scale], args.out or Path(".cache/worlds") / args.scale))


if __name__ == "__main__":
    main()
