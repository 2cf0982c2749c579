"""A DeepSpeed finetune under Ray Train that loses a worker process (a real SIGKILL) and then a node
(`Cluster.remove_node`) finishes with the uninterrupted run's losses, resumed each time from its last state; and a
`mashup finetune` whose driver is SIGKILLed goes on from its last state when the same command runs again.

The cluster needs a Ray of its own, so the runs happen in a subprocess (tests/reliability/finetune_fault_job.py) that
never touches the session's local Ray. The faults land at known steps, between two saves, whatever the machine's
speed: the training loop's step gate holds both ranks until the test has struck.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

GLOO_TOL = 1e-4  # 2 workers sum their gradients in another order than an uninterrupted run may: ~1e-8 measured


def rows(log: list[dict], event: str) -> list[dict]:
    return [r for r in log if r["event"] == event]


@pytest.mark.timeout(900)
def test_a_killed_worker_and_a_removed_node_resume_to_the_uninterrupted_losses(tmp_path, base_dir, task_file):
    from bench.world.tiny import write_task

    held_out = write_task(tmp_path / "eval.jsonl", 12, seed=1, op="reverse", choices=4)
    script = Path(__file__).with_name("finetune_fault_job.py")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script), "--base", str(base_dir), "--data", str(task_file), "--eval", str(held_out),
         "--root", str(tmp_path / "runs")],
        cwd=repo, capture_output=True, text=True, timeout=840,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    reference, faulted = report["reference"], report["faulted"]

    # resumed twice, each time from the state before the fault, with the step it lost counted
    resumed = [(r["step"], r["lost_steps"]) for r in rows(faulted, "resume")]
    assert resumed == [(2, 1), (6, 1)]
    assert not report["removed_alive"]
    # and the same run as the uninterrupted one: every step's loss and lr, every evaluation, the adapter
    assert [r["step"] for r in rows(faulted, "train")] == list(range(1, 9))
    assert [r["loss"] for r in rows(faulted, "train")] == pytest.approx(
        [r["loss"] for r in rows(reference, "train")], abs=GLOO_TOL)
    assert [r["lr"] for r in rows(faulted, "train")] == pytest.approx([r["lr"] for r in rows(reference, "train")])
    assert [e["step"] for e in rows(faulted, "eval")] == [e["step"] for e in rows(reference, "eval")] == [0, 4, 8]
    assert [e["loss"] for e in rows(faulted, "eval")] == pytest.approx(
        [e["loss"] for e in rows(reference, "eval")], abs=GLOO_TOL)
    want, got = (load_file(str(Path(a) / "adapter_model.safetensors")) for a in report["adapters"])
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=GLOO_TOL) for k in got)
    # honest time: the clock never goes back across the restarts; a finished run keeps no state
    seconds = [r["seconds"] for r in faulted]
    assert seconds == sorted(seconds)
    assert report["states_left"] == []

    # the driver killed too: the same command again goes on from step 4's state, to the same losses
    again = report["driver_killed"]
    assert [(r["step"], r["lost_steps"]) for r in rows(again, "resume")] == [(4, 1)]
    assert [r["loss"] for r in rows(again, "train")] == pytest.approx(
        [r["loss"] for r in rows(reference, "train")], abs=GLOO_TOL)
    assert [e["loss"] for e in rows(again, "eval")] == pytest.approx(
        [e["loss"] for e in rows(reference, "eval")], abs=GLOO_TOL)
