"""CI smoke test of the BIG-bench benchmark: configs/bigbench_ci.yaml end to end on the real SmolLM2 and real
BIG-bench rows (world build → score → select → merge → Tune trials → held-out exact match → tables).

It asserts only that the run completes, writes its tables and refuses the broken donors by name; at this size the
numbers mean nothing. The world is cached in .cache/worlds/bigbench-ci (built once per machine, a few minutes)."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_ci_scale_completes_and_refuses_the_broken_donors(tmp_path, ray_local, monkeypatch, bigbench_sdist):
    from bench.bench_bigbench import load_config, run_bigbench

    monkeypatch.chdir(REPO)  # the model and world caches are repo-relative, shared with `--scale ci`
    cfg = load_config(REPO / "configs" / "bigbench_ci.yaml",
                      [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'bigbench_ci.json'}", "readme=false"])
    summary = json.loads(run_bigbench(cfg, "ci").read_text())

    arms = [a.name for a in cfg.arms] + [cfg.fast_arm]
    assert [r["arm"] for r in summary["average"]] == arms
    (target,) = summary["targets"].values()
    assert {x["donor"] for x in target["refused"]} == {f"broken/{k}" for k in ("nan", "shape", "pickle", "wrong_base")}
    assert all(r["heldout_final"]["exact_match"] is not None for r in target["rows"])  # a generation target
    assert "| scratch |" in (tmp_path / "bigbench_ci.md").read_text()
    # lr_seeds 1: both LRs on seed 0, then seed 1 at each arm's chosen LR only
    from engine.run_config import run_name

    for r in target["rows"]:
        (arm_dir,) = (tmp_path / "runs").glob(f"*/*/arms/{r['arm']}")
        names = {p.name for p in (arm_dir / "runs").iterdir()}
        assert names == {run_name(lr, 0) for lr in cfg.sweep.lrs} | {run_name(r["lr"], 1)}, r["arm"]
    # the choose arm: every candidate and a fresh LoRA evaluated on the held-out rows, beside the pick made on the sample
    (choose,) = [r["chosen"] for r in target["rows"] if r["arm"] == "choose"]
    choice = json.loads(next((tmp_path / "runs").glob("*/*/arms/choose/choice.json")).read_text())
    assert set(choose["heldout_loss"]) == {c["name"] for c in choice["candidates"]} | {"none"}
    assert choose["chosen"] == choice["chosen"] and choose["heldout_best"] in choose["heldout_loss"]
    assert "### The merge chosen on the sample" in (tmp_path / "bigbench_ci.md").read_text()
