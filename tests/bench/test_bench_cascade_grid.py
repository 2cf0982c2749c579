"""The cascade grid replays cascades on stored prefix rows: a replay must pick and cost exactly what a real cascade
with the same settings picks and scores, and the judging must follow its definitions on known numbers."""
import json

import pytest

from bench.bench_cascade_grid import judge, prefix_stats, replay
from engine.scoring import ScoreConfig, score
from engine.scoring.cascade import RoundStats


def cascade(tmp_path, name, pool_dir, task_file, base_dir, **cascade_opts):
    cfg = ScoreConfig(base=str(base_dir), donors=[str(pool_dir)], data=task_file, out=tmp_path / name, samples=24,
                      executor="local", donors_per_call=8, strategy="cascade", cascade=cascade_opts)
    return cfg, score(cfg)


@pytest.mark.parametrize("keep, z", [(0.4, 0.0), (0.25, 1.0)])
def test_a_replay_equals_a_real_cascade(tmp_path, pool_dir, task_file, base_dir, keep, z):
    _, _ = cascade(tmp_path, "all", pool_dir, task_file, base_dir, first_slice=2, keep_fraction=1.0, z=0.0,
                   min_survivors=2)
    stats = prefix_stats(tmp_path / "all")
    assert sorted(stats) == [2, 4, 8, 16, 24] and all(len(s) == 5 for s in stats.values())
    ranking, compute = replay(stats, 4, keep, z, min_survivors=2)
    cfg, real = cascade(tmp_path, "real", pool_dir, task_file, base_dir, first_slice=4, keep_fraction=keep, z=z,
                        min_survivors=2)
    record = json.loads((cfg.out / "cascade.json").read_text())
    assert real.donor_examples == compute == sum(r["donor_examples"] for r in record["rounds"])
    final = [r for r in prefix_stats(cfg.out)[24]]
    assert sorted(final) == sorted(ranking) and len(ranking) < 5, "the replay keeps the cascade's survivors"
    full = prefix_stats(cfg.out)[24]
    assert ranking == sorted(full, key=lambda d: (full[d].loss, d)), "and ranks them by the same final losses"


def test_a_settling_replay_equals_a_real_settling_cascade(tmp_path, pool_dir, task_file, base_dir, tokenizer):
    """Three random donors and two trained on the task: the ranking settles, and the replay settles the same way."""
    import shutil

    from engine.core.data import encode_sample, load_jsonl
    from tests.adapters import write_trained_adapter

    pool = tmp_path / "pool"
    shutil.copytree(pool_dir / "qv", pool / "qv")
    sample = encode_sample(tokenizer, load_jsonl(task_file)[:8], salt="train")
    for seed in (1, 2):
        write_trained_adapter(base_dir, pool / f"trained{seed}", sample, seed=seed)
    cascade(tmp_path, "all", pool, task_file, base_dir, first_slice=2, keep_fraction=1.0, z=0.0, min_survivors=2)
    settling = {"settle_k": 2, "settle_z": 2.0, "settle_min_examples": 4}
    ranking, compute = replay(prefix_stats(tmp_path / "all"), 2, 1.0, 0.0, min_survivors=2, **settling)
    cfg, real = cascade(tmp_path, "real", pool, task_file, base_dir, first_slice=2, keep_fraction=1.0, z=0.0,
                        min_survivors=2, **settling)
    rounds = json.loads((cfg.out / "cascade.json").read_text())["rounds"]
    assert sum(r["settled_out"] for r in rounds) == 3 and rounds[-1]["scored"] == 2, "the random three stop early"
    assert real.donor_examples == compute and sorted(ranking) == ["trained1", "trained2"]
    full = prefix_stats(cfg.out)[24]
    assert ranking == sorted(full, key=lambda d: (full[d].loss, d))


def stat(loss: float, se: float, n: int = 100) -> RoundStats:
    """A donor whose loss is `loss` and whose standard error is `se` (all tokens 1 per example)."""
    # nll_sq - 2·L·nll_tok + L²·tok_sq = se² · tokens² · (n-1) / n, with nll_tok = L·n and tok_sq = n
    resid = se ** 2 * n ** 2 * (n - 1) / n
    return RoundStats(nll=loss * n, correct=0.0, tokens=n, examples=n, nll_sq=resid + loss ** 2 * n,
                      nll_tok=loss * n, tok_sq=n)


def test_judge_counts_near_ties_and_regret():
    full = {"a": stat(1.00, 0.05), "b": stat(1.10, 0.05), "c": stat(1.12, 0.05), "d": stat(1.50, 0.05)}
    assert abs(full["b"].stderr - 0.05) < 1e-9
    stats = {100: full}
    tie = judge(stats, ["a", "c", "b", "d"], 200)
    assert tie["recall"] == 1.0 and tie["within_one_se"] and abs(tie["regret"] - 0.01) < 1e-9
    miss = judge(stats, ["a", "d", "b", "c"], 400)
    assert miss["recall"] == 0.5 and not miss["within_one_se"] and abs(miss["regret"] - 0.2) < 1e-9
    assert miss["compute_fraction"] == 400 / (4 * 100)
