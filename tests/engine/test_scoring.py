"""The scoring job end to end on a real local Ray: parity, actor count, resume, malformed donors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores


def run(tmp_path, name, donors, data, base, **kw):
    cfg = ScoreConfig(base=str(base), donors=[str(d) for d in donors], data=data, out=tmp_path / name, **kw)
    return score(cfg), read_scores(cfg.out)


@pytest.fixture(scope="module")
def one_actor(ray_local, tmp_path_factory, pool_dir, task_file, base_dir):
    return run(tmp_path_factory.mktemp("s1"), "out", [pool_dir], task_file, base_dir, actors=1, donors_per_call=2)


def test_scores_match_the_backend_reference(one_actor, base_dir, pool_dir, tokenizer, task_file):
    from engine.core.data import encode_sample, load_jsonl
    from tests.adapters import peft_reference_loss as reference_loss

    summary, df = one_actor
    assert summary.scored == 6 and summary.failed == 0
    assert sorted(df.donor) == ["__base__", "qkvo/donor2", "qkvo/donor4", "qv/donor1", "qv/donor3", "qv/donor5"]
    sample = encode_sample(tokenizer, load_jsonl(task_file))
    row = df.set_index("donor").loc["qv/donor3"]
    loss, acc = reference_loss(base_dir, str(pool_dir / "qv" / "donor3"), sample)
    assert abs(row.loss - loss) < 1e-5 and abs(row.token_accuracy - acc) < 1e-9
    assert row.status == "ok" and row.backend == "hf" and row.n_tokens == sample.n_tokens


def test_two_actors_give_identical_results(one_actor, ray_local, tmp_path, pool_dir, task_file, base_dir):
    _, df1 = one_actor
    summary, df2 = run(tmp_path, "two", [pool_dir], task_file, base_dir, actors=2, donors_per_call=1)
    a, b = df1.set_index("donor").sort_index(), df2.set_index("donor").sort_index()
    assert list(a.index) == list(b.index)
    assert (a.loss - b.loss).abs().max() < 1e-6
    assert (a.token_accuracy == b.token_accuracy).all()


def test_resume_scores_only_new_donors(ray_local, tmp_path, pool_dir, task_file, base_dir):
    s1, df1 = run(tmp_path, "out", [pool_dir / "qkvo"], task_file, base_dir)
    s2, df2 = run(tmp_path, "out", [pool_dir / "qkvo", pool_dir / "qv"], task_file, base_dir)
    s3, df3 = run(tmp_path, "out", [pool_dir / "qkvo", pool_dir / "qv"], task_file, base_dir)
    assert (s1.scored, s2.scored, s2.skipped_done, s3.scored, s3.skipped_done) == (3, 3, 2, 0, 5)
    kept = df2.set_index("donor").loc[list(df1.donor)]
    assert (kept.written_at.values == df1.set_index("donor").written_at.values).all(), "resume rewrote old rows"
    assert len(df3) == 6 and df3.donor.is_unique


def test_a_different_sample_is_scored_again(ray_local, tmp_path, pool_dir, task_file, base_dir):
    run(tmp_path, "out", [pool_dir / "qkvo"], task_file, base_dir, samples=8)
    s2, df = run(tmp_path, "out", [pool_dir / "qkvo"], task_file, base_dir, samples=8, seed=1)
    assert s2.scored == 3 and df.sample_id.nunique() == 2


def test_malformed_donors_fail_with_reasons_while_others_complete(
    ray_local, tmp_path, pool_dir, bad_pool, escaping_manifest, task_file, base_dir
):
    root, expect = bad_pool
    summary, df = run(tmp_path, "bad", [pool_dir / "qv", root, escaping_manifest], task_file, base_dir,
                      donors_per_call=4)
    rows = df.set_index("donor")
    assert (rows.loc[["__base__", "donor1", "donor3", "donor5"], "status"] == "ok").all()
    for name, phrase in expect.items():
        assert rows.loc[name, "status"] == "failed", name
        assert phrase in rows.loc[name, "error"], (name, rows.loc[name, "error"])
    for name in ("escape", "symlinked", "absolute"):
        assert "escapes the manifest folder" in rows.loc[name, "error"]
    assert summary.failed == len(expect) + 3


@pytest.mark.slow
def test_sigkilled_driver_resumes_without_loss_or_rescoring(tmp_path, pool_dir, task_file, base_dir):
    manifest = tmp_path / "pool" / "m.jsonl"
    manifest.parent.mkdir()
    import shutil

    shutil.copytree(pool_dir, tmp_path / "pool" / "p")
    folders = sorted((tmp_path / "pool" / "p").glob("*/*"))
    manifest.write_text("".join(json.dumps({"id": f"d{i:02d}", "path": str(folders[i % 5].relative_to(manifest.parent))})
                                + "\n" for i in range(30)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine.cli", "score", "--base", str(base_dir), "--donors", str(manifest),
           "--data", str(task_file), "--out", str(out), "--donors-per-call", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "scores.journal.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 3):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_scores(out)
    assert 3 <= len(before) < 31, "the kill should land mid-run"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = read_scores(out)
    assert len(after) == 31 and after.donor.is_unique and (after.status == "ok").all()
    old = after.set_index("donor").loc[list(before.donor), "written_at"]
    assert (old.values == before.set_index("donor").written_at.values).all(), "already-recorded donors were rescored"
