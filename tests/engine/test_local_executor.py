"""executor: local, one scorer in the driver's process: the same rows as the Ray actors, failures isolated the same
way, the start-up breakdown recorded, and options that need actors refused in one line."""
import pytest
import torch

from engine.core.config import validate
from engine.core.errors import ConfigError, MashupError
from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores


def run(tmp_path, name, donors, data, base, **kw):
    cfg = ScoreConfig(base=str(base), donors=[str(d) for d in donors], data=data, out=tmp_path / name, **kw)
    return score(cfg), read_scores(cfg.out)


def test_local_rows_equal_the_actors_rows(ray_local, tmp_path, pool_dir, task_file, base_dir):
    threads = torch.get_num_threads()
    local, df_local = run(tmp_path, "local", [pool_dir], task_file, base_dir, executor="local", donors_per_call=2)
    remote, df_ray = run(tmp_path, "ray", [pool_dir], task_file, base_dir, donors_per_call=2)
    a, b = df_local.set_index("donor").sort_index(), df_ray.set_index("donor").sort_index()
    assert list(a.index) == list(b.index) and len(a) == 6
    assert (a.loss - b.loss).abs().max() < 1e-6
    assert (a.token_accuracy == b.token_accuracy).all() and (a.status == "ok").all()
    assert (a.sample_id == b.sample_id).all() and a.donor_sha256.fillna("").equals(b.donor_sha256.fillna(""))
    assert torch.get_num_threads() == threads, "the in-process scorer must give the driver its threads back"
    # the fixed-cost breakdown: no Ray to start in-process; ordered events on both
    assert "ray_ready" not in local.startup and "ray_ready" in remote.startup
    for s in (local, remote):
        assert 0 < s.startup["prepared"] <= s.startup["scorer_ready"] <= s.startup["first_donor"] <= s.seconds


def test_local_isolates_a_failing_donor_and_resumes(tmp_path, pool_dir, bad_pool, task_file, base_dir):
    root, expect = bad_pool
    summary, df = run(tmp_path, "bad", [pool_dir / "qv", root], task_file, base_dir, executor="local",
                      donors_per_call=4)
    rows = df.set_index("donor")
    assert (rows.loc[["__base__", "donor1", "donor3", "donor5"], "status"] == "ok").all()
    for name, phrase in expect.items():
        assert rows.loc[name, "status"] == "failed" and phrase in rows.loc[name, "error"], name
    again, _ = run(tmp_path, "bad", [pool_dir / "qv", root], task_file, base_dir, executor="local")
    # a rerun keeps the ok rows and tries the failed donors again (they may have been fixed meanwhile)
    assert (again.skipped_done, again.scored, again.failed) == (3, 0, len(expect))


@pytest.mark.parametrize("option", [{"actors": 2}, {"ray_address": "auto"}, {"batch_timeout_s": 5.0},
                                    {"actor_resources": {"big": 1.0}}, {"node_labels": {"zone": "a"}}])
def test_local_refuses_options_that_need_actors(option):
    data = {"base": "b", "donors": ["d"], "data": "t.jsonl", "out": "o", "executor": "local", **option}
    with pytest.raises(ConfigError, match=f"executor: local runs one scorer in this process, so {next(iter(option))}"):
        validate(ScoreConfig, data)


def test_a_scorer_that_cannot_start_is_one_line(tmp_path, pool_dir, task_file, base_dir):
    """A backend option the backend rejects when it builds (not at validation) surfaces as one MashupError."""
    threads = torch.get_num_threads()
    with pytest.raises(MashupError, match=r"the hf scorer could not start in this process \(executor: local\)"):
        run(tmp_path, "nostart", [pool_dir / "qv"], task_file, base_dir, executor="local",
            backend_options={"device": "no-such-device"})
    assert torch.get_num_threads() == threads


def test_rows_of_another_dtype_or_backend_option_are_never_reused(tmp_path, pool_dir, task_file, base_dir):
    """The scorer's numbers depend on dtype (and every option not declared speed-only): a bf16 rerun in an fp32
    folder rescores everyone and ranks only its own rows; a speed-only option (batch_tokens) reuses them."""
    from engine.selection import select

    kw = dict(samples=8, executor="local")
    fp32, _ = run(tmp_path, "out", [pool_dir], task_file, base_dir, **kw)
    same, _ = run(tmp_path, "out", [pool_dir], task_file, base_dir, backend_options={"batch_tokens": 256}, **kw)
    assert same.scored == 0 and same.skipped_done == fp32.scored - 1 and same.sample_id == fp32.sample_id  # scored counts the base
    bf16, rows = run(tmp_path, "out", [pool_dir], task_file, base_dir, backend_options={"dtype": "bfloat16"}, **kw)
    assert bf16.scored == fp32.scored and bf16.sample_id != fp32.sample_id
    fresh, _ = run(tmp_path, "fresh", [pool_dir], task_file, base_dir, backend_options={"dtype": "bfloat16"}, **kw)
    mixed = select(tmp_path / "out", k=2, pool=bf16.pool)
    clean = select(tmp_path / "fresh", k=2)
    assert [(d.donor, d.loss) for d in mixed.donors] == [(d.donor, d.loss) for d in clean.donors]
    assert set(rows.sample_id) == {fp32.sample_id, bf16.sample_id}


def _threads_used(out) -> set[int]:
    import json

    return {json.loads(line)["threads"] for line in (out / "placement.jsonl").read_text().splitlines()}


def test_the_default_scorer_uses_the_cores_it_is_given(ray_local, tmp_path, pool_dir, task_file, base_dir):
    """cpus_per_actor: auto. In-process, the scorer keeps this process's torch threads (a fixed 1 scored a 2-core
    machine at half speed); a lone Ray actor reserves, and computes on, the whole 2-CPU local cluster; two actors
    split it; a number the user gives is what every actor gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(tmp_path, "local", [pool_dir / "qv"], task_file, base_dir, executor="local")
        assert _threads_used(tmp_path / "local") == {2}
    finally:
        torch.set_num_threads(threads)
    run(tmp_path, "one", [pool_dir / "qv"], task_file, base_dir)
    run(tmp_path, "two", [pool_dir], task_file, base_dir, actors=2, donors_per_call=1)
    run(tmp_path, "fixed", [pool_dir / "qv"], task_file, base_dir, cpus_per_actor=1)
    assert [_threads_used(tmp_path / n) for n in ("one", "two", "fixed")] == [{2}, {1}, {1}]


def test_cpus_per_actor_must_be_positive_or_auto():
    data = {"base": "b", "donors": ["d"], "data": "t.jsonl", "out": "o"}
    assert validate(ScoreConfig, data).cpus_per_actor == "auto"
    with pytest.raises(ConfigError, match="cpus_per_actor must be positive, or auto"):
        validate(ScoreConfig, {**data, "cpus_per_actor": 0})
