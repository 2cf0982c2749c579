"""CI smoke test of the MWA checkpoint-merging benchmark: a tiny world (no donors), 1 target, 1 seed, a few steps.

It asserts only that the benchmark completes and writes its tables, never a particular result.
"""
import json

import pytest

from bench.bench_mwa import load_config, run_bench
from bench.world.build import WorldSpec, build


@pytest.fixture(scope="module")
def mwa_world(tmp_path_factory):
    spec = WorldSpec(name="smoke", hidden=32, layers=2, heads=2, pretrain_steps=20, pretrain_batch=16,
                     targets=["rev+dropf"], donor_tasks=[], train_rows=48, val_rows=12, eval_rows=12)
    return build(spec, tmp_path_factory.mktemp("world"))


@pytest.mark.slow
def test_bench_mwa_smoke_completes_and_writes_tables(mwa_world, tmp_path):
    cfg = load_config([f"world_dir={mwa_world}", f"out={tmp_path / 'runs'}", f"results={tmp_path / 'mwa.json'}",
                       "targets=[rev+dropf]", "seeds=[0]", "loss_penalties=[1.0]", "step_penalties=[1.0]",
                       "finetune.steps=4", "finetune.batch_size=4", "finetune.warmup_steps=0", "finetune.save_every=2"])
    summary = run_bench(cfg)
    data = json.loads(summary.read_text())
    assert [r["rule"] for r in data["summary"]] == ["final", "uniform", "loss p=1", "step p=1"]
    table = (tmp_path / "mwa.md").read_text()
    assert "| rule | val acc |" in table and "| loss p=1 |" in table
    assert run_bench(cfg) == summary  # cached: the second call reuses every run, merge and evaluation


def test_bad_override_is_named():
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match="seeds"):
        load_config(["seeds=oops"])


def test_the_prompt_format_is_set_once():
    """Training and the checkpoint evaluations share the top-level chat_template; the finetune recipe may not set it."""
    from engine.core.errors import ConfigError

    assert load_config(["chat_template=true"]).chat_template is True
    with pytest.raises(ConfigError, match="finetune: chat_template: set the prompt format once, as the top-level"):
        load_config(["finetune.chat_template=true"])


def test_language_world_needs_its_base_and_its_one_target(tmp_path):
    from bench.bench_mwa import ensure_world
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match="base"):
        ensure_world(load_config(["world=lang-cpu", f"world_dir={tmp_path}", "targets=[capital-city-name]"]))
    with pytest.raises(ConfigError, match="capital-city-name"):
        ensure_world(load_config(["world=lang-cpu", f"world_dir={tmp_path}", f"base={tmp_path}", "targets=[plural]"]))
    world = ensure_world(load_config(["world=lang-cpu", f"world_dir={tmp_path}", f"base={tmp_path}",
                                      "targets=[capital-city-name]"]))
    rows = [json.loads(line) for line in (world / "tasks" / "capital-city-name" / "eval.jsonl").read_text().splitlines()]
    assert rows and all(r["choices"] for r in rows)  # the target's multiple-choice splits, and nothing else built
    assert sorted(p.name for p in (world / "tasks").iterdir()) == ["capital-city-name"]
