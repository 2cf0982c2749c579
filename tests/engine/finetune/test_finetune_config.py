"""Config validation, the generated DeepSpeed config, and the batch plan every worker derives on its own."""
from __future__ import annotations

import pytest

from engine.core.config import build_config
from engine.core.errors import ConfigError
from engine.finetune import FinetuneConfig
from engine.finetune.common import BatchPlan
from engine.finetune.deepspeed_ray import deepspeed_config

REQUIRED = dict(base="b", data="d.jsonl", out="o")


@pytest.mark.parametrize("word", ["none", "None", "", None])
def test_init_none_means_a_fresh_lora(word):
    assert FinetuneConfig(**REQUIRED, init=word).init is None


def test_batch_must_split_evenly_over_workers_and_micro_batches():
    with pytest.raises(ConfigError, match="batch_size 6 must be a multiple of grad_accum"):
        build_config(FinetuneConfig, None, {**REQUIRED, "batch_size": 6, "grad_accum": 2, "executor": "deepspeed",
                                            "deepspeed": {"num_workers": 2}})
    cfg = FinetuneConfig(**REQUIRED, batch_size=8, grad_accum=2, executor="deepspeed")
    assert (cfg.world_size, cfg.micro_batch_size) == (2, 2)


def test_unknown_keys_are_errors_even_nested():
    with pytest.raises(ConfigError, match="lora.rank: unknown key"):
        build_config(FinetuneConfig, None, {**REQUIRED, "lora": {"rank": 4}})


def test_deepspeed_config_follows_the_finetune_config_and_extra_merges_deeply():
    cfg = FinetuneConfig(
        **REQUIRED, executor="deepspeed", batch_size=8, grad_accum=2, max_grad_norm=None,
        deepspeed={"num_workers": 2, "zero_stage": 1, "extra": {"zero_optimization": {"overlap_comm": True}}},
    )
    ds = deepspeed_config(cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}


def test_every_example_is_seen_once_per_epoch_and_ranks_split_each_step():
    from engine.core.data import Encoded

    examples = [Encoded(tuple(range(i + 3)), 2) for i in range(10)]
    cfg = FinetuneConfig(**REQUIRED, executor="deepspeed", batch_size=4, grad_accum=2, seed=3)
    plan = BatchPlan(examples, cfg)
    seen = [i for step in range(1, 6) for i in plan.global_batch(step)]
    assert sorted(seen[:10]) == sorted(seen[10:20]) == list(range(10)) and seen[:10] != seen[10:20]
    for step in (1, 4):
        parts = [plan.micro_batches(step, rank) for rank in (0, 1)]
        rows = [e for micro, _ in parts for mb in micro for e in mb]
        assert rows == [examples[i] for i in plan.global_batch(step)]
        assert {n for _, n in parts} == {sum(e.n_completion for e in rows)}
    assert BatchPlan(examples, cfg).global_batch(3) == plan.global_batch(3)


def test_a_workers_user_error_reaches_the_driver_as_itself():
    from ray.train import WorkerGroupError

    from engine.core.errors import DataError
    from engine.finetune.deepspeed_ray import _find_user_error

    cause = DataError("training diverged: loss is nan at step 3")
    try:
        raise RuntimeError("worker crashed") from cause
    except RuntimeError as wrapped:
        failure = WorkerGroupError("rank 1 failed", {0: ValueError("unrelated"), 1: wrapped})
    assert _find_user_error(failure) is cause
    assert _find_user_error(WorkerGroupError("x", {0: ValueError("engine bug")})) is None
