"""Faults inside a scoring job on a real local Ray: a killed actor, a hung donor, donors that crash the backend.

Each fault is real: the actor's process is SIGKILLed, the hang is the documented `MASHUP_TEST_HANG_DONOR` hook
(a sleeping actor the driver must kill), and the crashes come from real donor files.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psutil
import pytest

from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores


def run_job(tmp_path, donors, task_file, base_dir, **kw):
    cfg = ScoreConfig(base=str(base_dir), donors=[str(d) for d in donors], data=task_file, out=tmp_path / "out", **kw)
    return score(cfg), read_scores(cfg.out)


def scoring_workers() -> list[psutil.Process]:
    """This session's actor processes busy in `DonorScorer.score` (Ray titles a worker by its current call)."""
    busy = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "DonorScorer.score" in " ".join(proc.cmdline()):
                busy.append(proc)
        except psutil.Error:
            continue
    return busy


@pytest.mark.slow
def test_killed_actor_mid_batch_is_retried_and_every_donor_scored_once(
    ray_local, tmp_path, many_donors, task_file, base_dir, caplog
):
    caplog.set_level(logging.WARNING, logger="mashup.score")
    result = {}
    job = threading.Thread(target=lambda: result.update(out=run_job(
        tmp_path, [many_donors], task_file, base_dir, samples=8, actors=1, donors_per_call=2)))
    job.start()
    journal = tmp_path / "out" / "scores.journal.jsonl"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        busy = scoring_workers() if journal.exists() and journal.read_text().count("\n") >= 2 else []
        if busy:
            killed = busy[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    job.join(300)
    assert killed is not None, "the job finished before an actor could be killed mid-batch"
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
