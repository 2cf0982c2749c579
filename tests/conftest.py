"""Session-scoped tiny world: tokenizer, random Llama, real PEFT adapters on disk, task JSONL, one local Ray."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Hub code is exercised offline against a cache this session lays out (tests.helpers.publish_to_hf_cache).
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="mashup-hf-cache-")

POOL_SEEDS = (1, 2, 3, 4, 5)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from bench.world.tiny import build_tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("world")
    tok = train_tokenizer(root / "base")
    build_tiny_llama(root / "base", tok)
    return root


@pytest.fixture(scope="session")
def base_dir(world) -> Path:
    return world / "base"


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


@pytest.fixture(scope="session")
def pool_dir(world, base_dir) -> Path:
    """Five valid donors: two families (q/v r=8 and q/k/v/o r=4) so the pool is not uniform."""
    from transformers import AutoModelForCausalLM

    from bench.world.tiny import write_lora_adapter

    pool = world / "pool"
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    for seed in POOL_SEEDS:
        family = "qv" if seed % 2 else "qkvo"
        modules = ("q_proj", "v_proj") if family == "qv" else ("q_proj", "k_proj", "v_proj", "o_proj")
        r = 8 if family == "qv" else 4
        write_lora_adapter(
            base_dir, pool / family / f"donor{seed}", seed=seed, r=r, alpha=2 * r,
            target_modules=modules, init_std=0.2, base_model=base,
        )
    return pool


@pytest.fixture(scope="session")
def task_file(world) -> Path:
    from bench.world.tiny import write_task

    return write_task(world / "task.jsonl", 24, seed=0, op="reverse", choices=4)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
