"""Single-process executor: plain PyTorch + PEFT on the CPU or one GPU.

It mirrors DeepSpeed's conventions (divide the loss by grad_accum, clip the global norm, then step), which is why
the two executors give the same losses for the same seed.
"""
from __future__ import annotations

from typing import Any

import torch

from engine.core.device import resolve_device
from engine.finetune.common import build_model, load_task, load_tokenizer, make_optimizer, max_length_of
from engine.finetune.config import FinetuneConfig
from engine.finetune.loop import train
from engine.finetune.resume import StopRequest


class SingleStepper:
    def __init__(self, cfg: FinetuneConfig, model: Any):
        self.module = self.forward = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
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


def run_single(cfg: FinetuneConfig) -> None:
    """Everything in this process; the log, checkpoints and adapter land in `cfg.out`."""
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, dtype).to(device)
    data = load_task(cfg, tokenizer, max_length_of(model))
    with StopRequest() as stop:
        train(cfg, SingleStepper(cfg, model), tokenizer, data, stop=stop)
