"""`mashup finetune`: train a LoRA from a merged adapter (or from scratch, the baseline) and log its evaluations."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA-finetune the base from a merged adapter or from scratch", description=__doc__)
    p.add_argument("--config", help="YAML file (engine.finetune:FinetuneConfig); flags override it")
    p.add_argument("--base", help="base model folder")
    p.add_argument("--data", help="training JSONL with prompt/completion")
    p.add_argument("--init", help="merged PEFT adapter folder to start from, or 'none' for a fresh LoRA")
    p.add_argument("--eval", help="held-out JSONL (loss, token accuracy, multiple-choice accuracy)")
    p.add_argument("--out", help="output folder (adapter/, checkpoints/, log.jsonl, log.parquet)")
    p.add_argument("--executor", choices=("single", "deepspeed"), help="single process (default) or DeepSpeed on Ray Train")
    p.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="examples per step over all workers (default 8)")
    p.add_argument("--grad-accum", type=int, dest="grad_accum", help="micro-batches per step per worker (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, help="seed for the LoRA init and the data order (default 0)")
    p.add_argument("--eval-every", type=int, dest="eval_every", help="evaluate every N steps (default: start and end)")
    p.add_argument("--save-every", type=int, dest="save_every", help="checkpoint every N steps (default: none)")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (deepspeed executor; default: local Ray)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a run already in --out")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.core.config import build_config
    from engine.finetune import FinetuneConfig, finetune
    from engine.core.paths import check_paths

    keys = (
        "base", "data", "init", "eval", "out", "executor", "steps", "batch_size", "grad_accum", "lr", "seed",
        "eval_every", "save_every", "overwrite", "ray_address",
    )
    cfg = build_config(FinetuneConfig, args.config, {k: getattr(args, k) for k in keys})
    check_paths(cfg, {"base": "base", "data": "file", "eval": "file", "init": "adapter"})
    result = finetune(cfg)
    losses = result.train_losses()
    print(f"finetuned {len(losses)} steps in {result.seconds:.1f}s -> {result.adapter}")
    print(f"  train loss {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)})")
    evals = result.evals()
    if evals:
        first, last = evals[0], evals[-1]
        acc = "" if last["accuracy"] is None else f", choice accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}"
        print(f"  eval loss {first['loss']:.4f} (step 0) -> {last['loss']:.4f} (step {last['step']}){acc}")
    return 0
