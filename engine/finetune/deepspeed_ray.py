"""DeepSpeed ZeRO executor under Ray Train: one worker per process (gloo on CPU, NCCL on GPUs), several nodes allowed.

Ray Train creates the process group; `deepspeed.initialize` inside each worker reuses it. Rank 0 writes the outputs
straight into `cfg.out`, so on a multi-node cluster `out` must be on storage that every node shares.

Faults: every `save_every` steps each worker reports its part of a resumable state (engine/finetune/resume.py) to
Ray Train as one checkpoint. When a worker process or its node is lost, Ray Train (`FailureConfig`, up to
`deepspeed.max_failures` times) restarts the worker group, and each worker resumes from the last state. The run's
name and storage are fixed by its identity, so a rerun of a killed `mashup finetune` finds its states too. The
states live in `deepspeed.storage_path` (default `<out>/ray_train`): on several nodes, a shared file system path or
an object store URI (s3://, gs://) that every node can reach.

ZeRO-3 partitions the parameters as well: every rank then evaluates the whole held-out set (a forward pass is a
collective there), and the trainable tensors are gathered to save the adapter.

The per-worker body (`run_worker`) does not need Ray: `python -m engine.finetune.deepspeed_ray CONFIG.json`, under
`torchrun` or with the plain torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
runs the same loop in a process group it creates itself (see `torchrun_main`).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Any, ContextManager

import torch

from engine.core.errors import ConfigError, MashupError
from engine.core.fault_hooks import fault_hook_env
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
from engine.finetune.resume import (
    ResumeState,
    load_trainable,
    local_ray_train_folder,
    ray_train_name,
    ray_train_storage,
    read_state,
    rng_state,
    set_rng_state,
    write_state,
)
from engine.finetune.state_codec import fill_kept


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


COUNTERS = ("global_steps", "global_samples", "micro_steps")


class DeepSpeedStepper:
    def __init__(self, engine: Any, zero_stage: int):
        self.forward = engine
        self.module = engine.module
        self.engine = engine
        self.replicated_eval = zero_stage == 3
        self.named = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}

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

    def gathered(self) -> ContextManager[Any]:
        if not self.replicated_eval:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.named.values()), modifier_rank=None)

    def state_dict(self) -> dict[str, Any]:
        """This rank's ZeRO partition (moments and float32 master weights), the schedule, the RNG and the engine's
        counters; below ZeRO-3 also the trainable tensors, which every rank holds whole."""
        part = {"optimizer": self.engine.optimizer.state_dict(), "scheduler": self.engine.lr_scheduler.state_dict(),
                "rng": rng_state(), "counters": {k: getattr(self.engine, k) for k in COUNTERS}}
        if not self.replicated_eval:
            part["model"] = self.named
        return part

    def load_state_dict(self, parts: list[Any], rank: int) -> None:
        import inspect

        saved = parts[rank]
        if "model" in saved:
            load_trainable(self.named, saved["model"])
        optimizer = self.engine.optimizer
        live = optimizer.state_dict()
        every_rank = [fill_kept(part["optimizer"], live) for part in parts]
        if "load_from_fp32_weights" in inspect.signature(optimizer.load_state_dict).parameters:  # a ZeRO optimizer
            optimizer.load_state_dict(every_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(every_rank[rank])
        self.engine.lr_scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        for key, value in saved["counters"].items():
            setattr(self.engine, key, value)


class RayTrainStates:
    """A DeepSpeed run's states as Ray Train checkpoints: every rank writes its part into one checkpoint, and a
    restarted worker group reads the latest (`ray.train.get_checkpoint`)."""

    def __init__(self, rank: int, world_size: int, identity: dict[str, Any]):
        self.rank, self.world_size, self.identity = rank, world_size, identity

    def load(self) -> ResumeState | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read_state(Path(folder), self.identity)

    def save(self, step: int, part: Any) -> None:
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory(prefix="mashup-state-") as tmp:
            write_state(Path(tmp), step, self.rank, self.world_size, part, self.identity)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"state-{step:06d}")

    def finish(self) -> None:
        """Nothing: the driver removes the run's storage once every worker is done (`run_deepspeed`)."""


def run_worker(cfg: FinetuneConfig, rank: int, world_size: int, device: torch.device | None = None,
               states: RayTrainStates | None = None) -> None:
    """One worker's whole run, in a process group that already exists (Ray Train's, or `torchrun_main`'s). Under
    torchrun there are no `states`: such a run does not resume."""
    apply_deepspeed_env(cfg.deepspeed.use_gpu)
    import deepspeed
    import torch.distributed as dist

    if cfg.deepspeed.use_gpu and device is not None:
        torch.cuda.set_device(device)
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

    train(cfg, DeepSpeedStepper(engine, cfg.deepspeed.zero_stage), tokenizer, data, rank, world_size, all_sum,
          states=states)
    dist.barrier()


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    apply_deepspeed_env(cfg.deepspeed.use_gpu)
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.deepspeed.use_gpu else None
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    run_worker(cfg, rank, world_size, device, RayTrainStates(rank, world_size, cfg.identity()))


def torchrun_main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node=N -m engine.finetune.deepspeed_ray CONFIG.json`, without Ray.

    CONFIG.json is a FinetuneConfig (executor "deepspeed", `deepspeed.num_workers` equal to WORLD_SIZE). Rank 0
    runs the same pre-flight checks as `finetune()` (data, init adapter, out folder) before any worker trains.
    """
    import sys

    import torch.distributed as dist

    from engine.finetune.preflight import preflight

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torchrun --nproc_per_node=N -m engine.finetune.deepspeed_ray CONFIG.json")
    with open(args[0], encoding="utf-8") as fh:
        cfg = FinetuneConfig.model_validate_json(fh.read()).resolved()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cfg.world_size != world_size:
        raise ConfigError(f"deepspeed.num_workers is {cfg.world_size} but WORLD_SIZE is {world_size}")
    use_gpu = cfg.deepspeed.use_gpu
    device = torch.device("cuda", local_rank) if use_gpu else None
    if device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_gpu else "gloo", device_id=device)
    try:
        if rank == 0:
            preflight(cfg)
        dist.barrier()
        run_worker(cfg, rank, world_size, device)
    finally:
        dist.destroy_process_group()


def run_deepspeed(cfg: FinetuneConfig) -> None:
    """Blocks until every worker is done; a user error raised in a worker is re-raised here as itself."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from engine.core.ray_utils import WORKER_ENV, ensure_ray

    ds = cfg.deepspeed
    env = {**WORKER_ENV, **deepspeed_env(ds.use_gpu), **fault_hook_env()}
    storage, name = ray_train_storage(cfg), ray_train_name(cfg)
    apply_deepspeed_env(ds.use_gpu)
    ensure_ray(cfg.ray_address, include_dashboard=True)  # Ray Train's controller needs the State API
    resources = {"CPU": ds.cpus_per_worker, **({"GPU": 1} if ds.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=ds.num_workers, use_gpu=ds.use_gpu, resources_per_worker=resources,
                                     placement_strategy=ds.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if ds.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ds.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
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
    finished = local_ray_train_folder(cfg)
    if finished is not None:  # like the single executor's, a finished run keeps no state
        shutil.rmtree(finished, ignore_errors=True)


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


if __name__ == "__main__":
    torchrun_main()
