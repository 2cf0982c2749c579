"""The one training loop both executors run; an executor only supplies how to backpropagate, step and all-reduce.

Step 0 is an evaluation before any update, so a run from a merged adapter visibly starts at that adapter's loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from engine.evaluate import EvalResult, pad_token_id
from engine.finetune.common import (
    BatchPlan,
    TaskData,
    check_finite,
    evaluate_shard,
    is_due,
    iter_steps,
    micro_batch_loss,
)
from engine.finetune.config import FinetuneConfig
from engine.finetune.outputs import ADAPTER_DIR, TrainLog, checkpoint_path, save_adapter
from engine.core.version import __version__

AllSum = Callable[[torch.Tensor], torch.Tensor]


class Stepper(Protocol):
    """How one executor turns losses into updates."""

    module: Any  # the PeftModel: evaluated and saved
    forward: Any  # what the training forward pass calls (the DeepSpeed engine, or the PeftModel itself)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None: ...

    def step(self) -> float | None:
        """Apply the accumulated update; return the gradient norm before clipping when known."""

    def lr(self) -> float: ...


def train(
    cfg: FinetuneConfig,
    stepper: Stepper,
    tokenizer: Any,
    data: TaskData,
    rank: int = 0,
    world_size: int = 1,
    all_sum: AllSum = lambda t: t,
) -> None:
    """Train for `cfg.steps`; rank 0 writes the log, checkpoints and the final adapter under `cfg.out`."""
    out = cfg.out_path
    is_main = rank == 0
    log = TrainLog(out) if is_main else None
    plan = BatchPlan(data.train, cfg)
    pad_id = pad_token_id(tokenizer, stepper.module)
    identity = cfg.identity() if is_main else {}

    def run_eval(step: int) -> None:
        if data.eval is None:
            return
        shard = evaluate_shard(cfg, stepper.module, tokenizer, data.eval, rank, world_size)
        result = EvalResult.from_tensor(all_sum(shard.to_tensor()))
        if log:
            log.write(step, "eval", **result.summary())

    def save(path: Path, step: int) -> None:
        if is_main:
            info = {"step": step, "init": cfg.init, "engine_version": __version__, "config": cfg.model_dump(), **identity}
            save_adapter(stepper.module, path, info)

    run_eval(0)
    for step in iter_steps(cfg.steps, show=cfg.progress and is_main):
        micro, n_tokens = plan.micro_batches(step, rank)
        lr = stepper.lr()
        nll = 0.0
        for j, rows in enumerate(micro):
            loss, nll_rows = micro_batch_loss(stepper.forward, rows, n_tokens, world_size, cfg.grad_accum, pad_id)
            stepper.backward(loss, last_micro_batch=j == len(micro) - 1)
            nll += nll_rows
        train_loss = float(all_sum(torch.tensor([nll], dtype=torch.float64))[0]) / n_tokens
        check_finite(train_loss, step)
        grad_norm = stepper.step()
        if log:
            log.write(step, "train", loss=train_loss, lr=lr, grad_norm=grad_norm, n_tokens=n_tokens)
        if is_due(step, cfg.eval_every, cfg.steps):
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0:
            save(checkpoint_path(out, step), step)
    save(out / ADAPTER_DIR, cfg.steps)
    if log:
        log.close()
