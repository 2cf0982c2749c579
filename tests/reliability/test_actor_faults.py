"""Faults inside a scoring job on a real local Ray: a killed actor, a hung donor, donors that crash the backend.

Each fault is real: the actor's process is SIGKILLed (while the `MASHUP_TEST_GATE_DONOR` hook holds it inside a
batch, so the kill lands mid-batch whatever the machine's speed), the hang is the documented
`MASHUP_TEST_HANG_DONOR` hook (a sleeping actor the driver must kill), and the crashes come from real donor files.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores
from tests.reliability.gate import gate_env, release, wait_entered, wait_gone


def run_job(tmp_path, donors, task_file, base_dir, **kw):
    cfg = ScoreConfig(base=str(base_dir), donors=[str(d) for d in donors], data=task_file, out=tmp_path / "out", **kw)
    return score(cfg), read_scores(cfg.out)


@pytest.mark.slow
def test_killed_actor_mid_batch_is_retried_and_every_donor_scored_once(
    ray_local, tmp_path, many_donors, task_file, base_dir, caplog, monkeypatch
):
    """The actor is SIGKILLed while the gate hook holds it inside the batch with d04 (earlier batches are already
    recorded), and the gate opens only once the process is gone: the kill lands mid-batch on any machine."""
    caplog.set_level(logging.WARNING, logger="mashup.score")
    gate = tmp_path / "gate"
    for name, value in gate_env(gate, "d04").items():
        monkeypatch.setenv(name, value)
    result = {}
    job = threading.Thread(target=lambda: result.update(out=run_job(
        tmp_path, [many_donors], task_file, base_dir, samples=8, actors=1, donors_per_call=2)))
    job.start()
    try:
        entered = wait_entered(gate, job.is_alive)
        os.kill(entered["pid"], signal.SIGKILL)
        wait_gone(entered["pid"])
    finally:
        release(gate)
        job.join(300)
    assert "d04" in entered["donors"]
    summary, df = result["out"]
    assert summary.retries >= 1 and any("actor died while scoring" in r.message for r in caplog.records)
    assert summary.scored == 17 and summary.failed == 0, "a donor was scored twice or lost"
    assert len(df) == 17 and df.donor.is_unique and (df.status == "ok").all()


@pytest.mark.slow
def test_hung_donor_is_killed_and_the_rest_of_its_batch_rescored(
    ray_local, tmp_path, pool_dir, task_file, base_dir, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="mashup.score")
    monkeypatch.setenv("MASHUP_TEST_HANG_DONOR", "donor3")
    summary, df = run_job(tmp_path, [pool_dir / "qv"], task_file, base_dir, samples=4, actors=1,
                          donors_per_call=4, batch_timeout_s=5)
    rows = df.set_index("donor")
    assert rows.loc["donor3", "status"] == "failed" and rows.loc["donor3", "error"] == "timed out after 5s"
    assert (rows.drop(index="donor3").status == "ok").all() and len(rows) == 4
    assert summary.retries == 2  # the whole batch, then donor3 alone
    assert sum("exceeded 5s" in r.message for r in caplog.records) == 2


def test_donors_that_crash_the_backend_are_isolated_and_the_rest_rescored(
    ray_local, tmp_path, pool_dir, faults, task_file, base_dir
):
    from engine.core.data import encode_sample, load_jsonl, sample_examples
    from tests.adapters import peft_reference_loss
    from transformers import AutoTokenizer

    # Calls: [base, donor1, donor3] [donor5, norm_saver, donor2] [donor4, bad_target_type]. norm_saver
    # (modules_to_save) breaks PEFT's mixed-adapter path; a pass with one active adapter scores it, now exactly.
    summary, df = run_job(tmp_path, [pool_dir / "qv", faults / "norm_saver", pool_dir / "qkvo", faults / "bad_target_type"],
                          task_file, base_dir, samples=6, actors=1, donors_per_call=3)
    rows = df.set_index("donor")
    assert "TypeError" in rows.loc["bad_target_type", "error"]
    good = rows.drop(index=["bad_target_type"])
    assert len(good) == 7 and (good.status == "ok").all(), good.error.to_dict()
    assert summary.scored == 7 and summary.failed == 1
    sample = encode_sample(AutoTokenizer.from_pretrained(str(base_dir)), sample_examples(load_jsonl(task_file), 6, 0))
    for donor, folder in (("donor5", pool_dir / "qv" / "donor5"), ("norm_saver", faults / "norm_saver")):
        loss, _ = peft_reference_loss(base_dir, folder, sample)
        assert abs(rows.loc[donor, "loss"] - loss) < 1e-5, f"{donor} lost its fidelity"
