"""The one training loop both executors run; an executor only supplies how to backpropagate, step and all-reduce.

Step 0 is an evaluation before any update, so a run from a merged adapter visibly starts at that adapter's loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

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
from engine.finetune import resume
from engine.finetune.config import FinetuneConfig
from engine.finetune.outputs import ADAPTER_DIR, TrainLog, checkpoint_path, drop_checkpoints_after, save_adapter
from engine.core.fault_hooks import fault_gate
from engine.core.version import __version__

# Fault tests only (engine/core/fault_hooks.py): every rank waits at the gate after the train row of these steps.
STEP_GATE = "MASHUP_TEST_GATE_STEPS"

AllSum = Callable[[torch.Tensor], torch.Tensor]


class Stepper(Protocol):
    """How one executor turns losses into updates."""

    module: Any  # the PeftModel: evaluated and saved
    forward: Any  # what the training forward pass calls (the DeepSpeed engine, or the PeftModel itself)
    replicated_eval: bool  # every rank evaluates the whole held-out set (ZeRO-3: forwards are collectives)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None: ...

    def step(self) -> float | None:
        """Apply the accumulated update; return the gradient norm before clipping when known."""

    def lr(self) -> float: ...

    def gathered(self) -> ContextManager[Any]:
        """Inside it, the trainable parameters are whole on every rank (ZeRO-3 partitions them), for saving."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of a resumable state (engine/finetune/resume.py)."""

    def load_state_dict(self, parts: list[Any], rank: int) -> None:
        """Put back what `state_dict` saved; `parts` holds every rank's."""


class StateStore(Protocol):
    """Where an executor keeps its resumable states (resume.LocalStates, deepspeed_ray.RayTrainStates)."""

    identity: dict[str, Any]  # the run's (FinetuneConfig.identity), which every state records

    def load(self) -> resume.ResumeState | None: ...

    def save(self, step: int, part: Any) -> None: ...

    def finish(self) -> None: ...


def train(
    cfg: FinetuneConfig,
    stepper: Stepper,
    tokenizer: Any,
    data: TaskData,
    rank: int = 0,
    world_size: int = 1,
    all_sum: AllSum = lambda t: t,
    stop: resume.StopRequest | None = None,
    states: StateStore | None = None,
) -> None:
    """Train for `cfg.steps`; rank 0 writes the log, checkpoints and the final adapter under `cfg.out`. With
    `states`, the run resumes from the last state of this same run and saves one every `save_every` steps and on a
    stop request (engine/finetune/resume.py)."""
    out = cfg.out_path
    is_main = rank == 0
    identity = states.identity if states is not None else cfg.identity() if is_main else {}
    state = states.load() if states is not None else None
    if state is not None:
        stepper.load_state_dict(state.parts, rank)
        if is_main:
            drop_checkpoints_after(out, state.step)
    start = state.step if state else 0
    log = TrainLog(out, resume_step=start if state else None) if is_main else None
    plan = BatchPlan(data.train, cfg)
    pad_id = pad_token_id(tokenizer, stepper.module)

    def run_eval(step: int) -> None:
        if data.eval is None:
            return
        if stepper.replicated_eval:  # the same forwards on every rank; rank 0's result is the whole set's
            result = evaluate_shard(cfg, stepper.module, tokenizer, data.eval)
        else:
            shard = evaluate_shard(cfg, stepper.module, tokenizer, data.eval, rank, world_size)
            result = EvalResult.from_tensor(all_sum(shard.to_tensor()))
        if log:
            log.write(step, "eval", **result.summary())

    def save(path: Path, step: int) -> None:
        with stepper.gathered():  # every rank enters: under ZeRO-3 gathering is a collective
            if is_main:
                info = {"step": step, "init": cfg.init, "engine_version": __version__, "config": cfg.model_dump(),
                        **identity}
                save_adapter(stepper.module, path, info)

    def save_state(step: int) -> None:
        if states is not None:
            states.save(step, stepper.state_dict())

    if state is None:
        run_eval(0)
    for step in iter_steps(cfg.steps, show=cfg.progress and is_main, start=start):
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
        fault_gate(STEP_GATE, lambda steps: str(step) in steps.split(","), {"rank": rank, "step": step},
                   subfolder=f"step-{step}")
        if is_due(step, cfg.eval_every, cfg.steps):
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0:
            save(checkpoint_path(out, step), step)
            if step < cfg.steps:
                save_state(step)
        if stop is not None and stop.requested is not None and step < cfg.steps:
            save_state(step)
            raise resume.StoppedCleanly(stop.requested, step, out)
    save(out / ADAPTER_DIR, cfg.steps)
    if log:
        log.close()
    if states is not None:
        states.finish()
