"""Finetune fixtures: a merged init adapter (PEFT's own linear merge of two donors), a held-out file, a Ray for Ray Train."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def merged_init(world, base_dir, pool_dir) -> Path:
    """A merged adapter as the merge stage would hand over: one PEFT folder, made here by PEFT's add_weighted_adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(base, str(pool_dir / "qv" / "donor1"), adapter_name="d1")
    model.load_adapter(str(pool_dir / "qv" / "donor3"), adapter_name="d3")
    model.add_weighted_adapter(["d1", "d3"], [0.5, 0.5], adapter_name="merged", combination_type="linear")
    model.save_pretrained(str(world / "merged_for_finetune"), selected_adapters=["merged"])
    return world / "merged_for_finetune" / "merged"


@pytest.fixture(scope="session")
def eval_file(world) -> Path:
    from bench.world.tiny import write_task

    return write_task(world / "eval.jsonl", 12, seed=1, op="reverse", choices=4)


@pytest.fixture(scope="session")
def make_config(base_dir, task_file, eval_file):
    """A tiny run's config: 6 steps of 4 examples, evaluated and checkpointed every 3 steps; `over` changes fields."""
    from engine.finetune import FinetuneConfig

    def make(out: Path, **over) -> FinetuneConfig:
        fields = dict(
            base=str(base_dir), data=str(task_file), eval=str(eval_file), out=str(out),
            steps=6, batch_size=4, lr=2e-2, warmup_steps=1, eval_every=3, save_every=3, progress=False,
        )
        return FinetuneConfig(**{**fields, **over})

    return make


@pytest.fixture(scope="session")
def ray_train():
    """Reuses a Ray this session already started; otherwise starts one with the dashboard (Ray Train's State API)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
