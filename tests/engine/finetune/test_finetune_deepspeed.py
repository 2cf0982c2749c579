"""DeepSpeed ZeRO through Ray Train (real DeepSpeed on gloo, real Ray Train workers) against the single-process run.

Both executors run the same loop with the same seed and batches and a token-weighted loss over each step's global
batch, so world size 1 must reproduce the single-process losses, and 2 workers (ZeRO-2) the same objective.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.core.data import load_jsonl
from engine.finetune import finetune

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

# Measured on the 2-core CPU box: world size 1 is bit-identical in train losses (grad norms differ by ~1e-7,
# DeepSpeed sums them in float64); 2 workers differ by ~1e-8 (float sums in another order).
SAME_WORLD_TOL = 1e-5
TWO_WORKERS_TOL = 1e-4


@pytest.fixture(scope="module")
def config_for(make_config, merged_init, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")

    def make(name: str, **over):
        return make_config(root / name, init=str(merged_init), **over)

    return make


@pytest.fixture(scope="module")
def single_run(config_for):
    return finetune(config_for("single"))


def deepspeed_config(config_for, name: str, workers: int, zero_stage: int = 2, **extra):
    # Half a CPU per worker: never waits on CPUs another test's actors may still hold in the shared 2-CPU Ray.
    return config_for(name, executor="deepspeed", deepspeed={"num_workers": workers, "zero_stage": zero_stage,
                                                             "cpus_per_worker": 0.5, "extra": extra})


@pytest.fixture(scope="module")
def zero2_run(ray_train, config_for):
    return finetune(deepspeed_config(config_for, "ds2", workers=2))


def test_world_size_1_reproduces_the_single_process_losses(ray_train, config_for, single_run, tmp_path, monkeypatch):
    cfg = deepspeed_config(config_for, "ds1", workers=1)
    monkeypatch.chdir(tmp_path)  # relative paths must reach the workers, whose cwd is not the driver's
    relative = {k: os.path.relpath(getattr(cfg, k)) for k in ("base", "data", "eval", "init", "out")}
    ds = finetune(cfg.model_copy(update=relative))
    assert ds.train_losses() == pytest.approx(single_run.train_losses(), abs=SAME_WORLD_TOL)
    assert [e["loss"] for e in ds.evals()] == pytest.approx([e["loss"] for e in single_run.evals()], abs=SAME_WORLD_TOL)
    assert [r["lr"] for r in ds.log if r["event"] == "train"] == pytest.approx(
        [r["lr"] for r in single_run.log if r["event"] == "train"]
    )


def test_torchrun_without_ray_reproduces_the_single_process_losses(config_for, single_run, tmp_path):
    """The same worker body without Ray Train: `torchrun -m engine.finetune.deepspeed_ray CONFIG.json` (gloo here;
    NCCL on a GPU, see docs/gpu.md)."""
    import subprocess
    import sys
    from pathlib import Path

    from engine.finetune.outputs import read_log

    cfg = config_for("torchrun1", executor="deepspeed", deepspeed={"num_workers": 1, "zero_stage": 2})
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "engine.finetune.deepspeed_ray", str(path)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_log(cfg.out_path)
    assert [r["loss"] for r in rows if r["event"] == "train"] == pytest.approx(
        single_run.train_losses(), abs=SAME_WORLD_TOL)
    assert [r["loss"] for r in rows if r["event"] == "eval"] == pytest.approx(
        [e["loss"] for e in single_run.evals()], abs=SAME_WORLD_TOL)
    assert (cfg.out_path / "adapter" / "adapter_config.json").is_file()


def reloaded_loss(base_dir, tokenizer, eval_file, adapter) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.evaluate import evaluate

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter))
    return evaluate(model, tokenizer, load_jsonl(eval_file)).loss


def test_two_workers_zero2_train_and_their_checkpoints_reload(zero2_run, single_run, base_dir, tokenizer, eval_file):
    ds = zero2_run
    evals = ds.evals()
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    assert ds.train_losses() == pytest.approx(single_run.train_losses(), abs=TWO_WORKERS_TOL)

    assert [p.name for p in ds.checkpoints] == ["step-000003", "step-000006"]
    logged = {e["step"]: e["loss"] for e in evals}
    for path, step in ((ds.checkpoints[0], 3), (ds.adapter, 6)):
        assert reloaded_loss(base_dir, tokenizer, eval_file, path) == pytest.approx(logged[step], abs=1e-5)
    assert not (ds.adapter.parent / "ray_train").exists() or not any((ds.adapter.parent / "ray_train").iterdir())


def test_two_workers_zero3_killed_once_end_with_zero2s_losses_and_save_whole_adapters(
    zero2_run, config_for, base_dir, tokenizer, eval_file, tmp_path, monkeypatch
):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0: none kept whole on each rank), so a saved
    adapter is whole only because saving gathers it, evaluation runs the same forwards on both ranks, and a state
    is this rank's partition alone. Rank 1 is SIGKILLed after step 4 (the last state is step 3's); Ray Train
    restarts both workers, which resume and end where the uninterrupted ZeRO-2 run ends."""
    import signal
    import threading

    from safetensors.torch import load_file

    from engine.core.fault_hooks import GATE_DIR_HOOK
    from engine.finetune.loop import STEP_GATE
    from tests.reliability.gate import release, wait_gone, wait_until

    gate = tmp_path / "gate"
    monkeypatch.setenv(STEP_GATE, "4")  # the driver forwards MASHUP_TEST_* to the Ray Train workers
    monkeypatch.setenv(GATE_DIR_HOOK, str(gate))
    cfg = deepspeed_config(config_for, "ds3", workers=2, zero_stage=3,
                           zero_optimization={"stage3_param_persistence_threshold": 0})
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run=finetune(cfg)))
    job.start()
    def both_ranks() -> list[dict] | None:
        found = sorted((json.loads(p.read_text()) for p in (gate / "step-4").glob("entered-*.json")),
                       key=lambda m: m["rank"])
        return found if len(found) == 2 else None

    markers = wait_until(both_ranks, job.is_alive, "both ranks at step 4's gate")
    from engine.finetune.resume import ray_train_name, ray_train_storage

    snapshot = Path(ray_train_storage(cfg.resolved())) / ray_train_name(cfg) / "checkpoint_manager_snapshot.json"
    wait_until(lambda: snapshot.is_file() and "state-000003" in snapshot.read_text(), job.is_alive,
               "Ray Train registered step 3's state")
    os.kill(markers[1]["pid"], signal.SIGKILL)
    wait_gone(markers[1]["pid"])
    release(gate / "step-4")
    job.join(600)
    ds = result["run"]

    assert [(r["step"], r["lost_steps"]) for r in ds.log if r["event"] == "resume"] == [(3, 1)]
    assert ds.train_losses() == pytest.approx(zero2_run.train_losses(), abs=TWO_WORKERS_TOL)
    assert [e["loss"] for e in ds.evals()] == pytest.approx([e["loss"] for e in zero2_run.evals()], abs=TWO_WORKERS_TOL)
    got = load_file(str(ds.adapter / "adapter_model.safetensors"))
    want = load_file(str(zero2_run.adapter / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].shape == want[k].shape and got[k].numel() > 0 for k in got)
    assert all(torch.allclose(got[k], want[k], atol=1e-4) for k in got)
    logged = {e["step"]: e["loss"] for e in ds.evals()}
    for path, step in ((ds.checkpoints[0], 3), (ds.adapter, 6)):
        assert reloaded_loss(base_dir, tokenizer, eval_file, path) == pytest.approx(logged[step], abs=1e-5)
