"""DeepSpeed ZeRO executor under Ray Train: one worker per process (gloo on CPU, NCCL on GPUs), several nodes allowed.

Ray Train creates the process group; `deepspeed.initialize` inside each worker reuses it. Rank 0 writes the outputs
straight into `cfg.out`, so on a multi-node cluster `out` must be on storage that every node shares.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch

from engine.errors import MashupError
from engine.finetune.common import (
    apply_deepspeed_env,
    build_model,
    deepspeed_env,
    load_task,
    load_tokenizer,
    make_optimizer,
    max_length_of,
)
from engine.finetune.config import FinetuneConfig
from engine.finetune.loop import train


def deepspeed_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config implied by the finetune config; `deepspeed.extra` is deep-merged over it."""
    generated = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(generated, cfg.deepspeed.extra)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedStepper:
    def __init__(self, engine: Any):
        self.forward = engine
        self.module = engine.module
        self.engine = engine

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.engine.backward(loss)
        if not last_micro_batch:
            self.engine.step()  # DeepSpeed counts micro-batches in step(); it updates only at the boundary

    def step(self) -> float | None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    apply_deepspeed_env(cfg.deepspeed.use_gpu)
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.deepspeed.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, torch.float32)
    data = load_task(cfg, tokenizer, max_length_of(model))
    optimizer, scheduler = make_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    device = next(engine.module.parameters()).device

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    train(cfg, DeepSpeedStepper(engine), tokenizer, data, rank, world_size, all_sum)
    dist.barrier()


def run_deepspeed(cfg: FinetuneConfig) -> None:
    """Blocks until every worker is done; a user error raised in a worker is re-raised here as itself."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from engine.ray_utils import WORKER_ENV, ensure_ray

    ds = cfg.deepspeed
    env = {**WORKER_ENV, **deepspeed_env(ds.use_gpu)}
    apply_deepspeed_env(ds.use_gpu)
    ensure_ray(cfg.ray_address, include_dashboard=True)  # Ray Train's controller needs the State API
    resources = {"CPU": ds.cpus_per_worker, **({"GPU": 1} if ds.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=ds.num_workers, use_gpu=ds.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if ds.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str(cfg.out_path / "ray_train"),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - unwrap the worker's own user error when there is one
        user_error = _find_user_error(exc)
        if user_error is not None:
            raise user_error from None
        raise


def _find_user_error(exc: BaseException) -> MashupError | None:
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MashupError):
            return e
        stack.extend(getattr(e, "worker_failures", {}).values())
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None
