"""Single-process executor: plain PyTorch + PEFT on the CPU or one GPU.

It mirrors DeepSpeed's conventions (divide the loss by grad_accum, clip the global norm, then step), which is why
the two executors give the same losses for the same seed.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from engine.core.device import resolve_device
from engine.finetune.common import build_model, load_task, load_tokenizer, make_optimizer, max_length_of
from engine.finetune.config import FinetuneConfig
from engine.finetune.loop import train
from engine.finetune.resume import LocalStates, StopRequest, load_trainable, rng_state, set_rng_state


class SingleStepper:
    replicated_eval = False

    def __init__(self, cfg: FinetuneConfig, model: Any):
        self.module = self.forward = model
        self.cfg = cfg
        self.named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())
        self.optimizer, self.scheduler = make_optimizer(cfg, model)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> float | None:
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.named, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state()}

    def load_state_dict(self, parts: list[Any], rank: int) -> None:
        saved = parts[rank]
        load_trainable(self.named, saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])


def run_single(cfg: FinetuneConfig) -> None:
    """Everything in this process; the log, checkpoints and adapter land in `cfg.out`."""
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, dtype).to(device)
    data = load_task(cfg, tokenizer, max_length_of(model))
    with StopRequest() as stop:
        train(cfg, SingleStepper(cfg, model), tokenizer, data, stop=stop, states=LocalStates(cfg.out_path, cfg.identity()))
