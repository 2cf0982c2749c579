"""The bf16 bench's comparison on known inputs, and one real float32/bf16 pair of jobs on the tiny test world."""
import pytest

from bench.bench_bf16 import compare, render, score_job, summarize
from engine.core.scores import BASE_ROW


def test_the_comparison_ranks_donors_and_leaves_the_base_out():
    fp32 = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, BASE_ROW: 5.0}
    same_order = {"a": 1.1, "b": 2.05, "c": 3.2, "d": 4.0, BASE_ROW: 4.7}
    r = compare(fp32, same_order)
    assert r["donors"] == 4 and r["spearman"] == pytest.approx(1.0) and r["same_top_k"]
    assert r["top_k_margin"] == pytest.approx(1.0)  # float32's 3rd (3.0) minus its 2nd (2.0)
    assert r["max_abs_loss_diff"] == pytest.approx(0.3)  # the base's loss counts in the difference
    swapped = {"a": 2.5, "b": 2.0, "c": 1.0, "d": 4.0}
    r = compare(fp32, swapped)
    assert not r["same_top_k"] and r["spearman"] == pytest.approx(0.2)


def test_the_table_shows_the_speed_up_per_row_and_the_ranking():
    jobs = {"float32": [{"scoring_s": 10.0, "rows": 10, "losses": {"a": 1.0, "b": 2.0, "c": 3.0}},
                        {"scoring_s": 12.0, "rows": 10, "losses": {}}],
            "bfloat16": [{"scoring_s": 9.0, "rows": 10, "losses": {"a": 1.01, "b": 2.0, "c": 3.0}},
                         {"scoring_s": 4.0, "rows": 10, "losses": {}}]}  # the fastest repeat counts
    p = summarize(jobs)
    assert p["speedup"] == pytest.approx(2.5) and p["dtypes"]["bfloat16"]["per_row_ms"] == pytest.approx(400)
    res = {"meta": {"date": "d", "machine": "m", "command": "c", "repeats": 2}, "cpu": {"avx512_bf16": True,
           "amx_bf16": False}, "matmul": {"size": 512, "gflops": {"float32": 80, "bfloat16": 200}, "ratio": 2.5},
           "pools": {"demo": {**p, "samples": 256}}}
    table = render(res)
    assert "(avx512_bf16)" in table and "(**2.50×**)" in table
    assert "| demo (3 donors, 256 ex.) | 1000 ms | 400 ms | **2.50×** | 1.000 | yes | 1.0000 | 0.0100 |" in table


def test_a_bf16_job_scores_the_same_pool_close_to_float32(base_dir, pool_dir, task_file, tmp_path):
    """Real scoring in both dtypes on the tiny world: every donor scored, bf16 losses near float32's."""
    spec = {"base": base_dir, "manifest": pool_dir / "qv", "data": task_file, "samples": 8}
    fp32 = score_job(spec, "float32", tmp_path / "fp32")
    bf16 = score_job(spec, "bfloat16", tmp_path / "bf16")
    assert fp32["rows"] == bf16["rows"] > 1 and fp32["scoring_s"] > 0
    r = compare(fp32["losses"], bf16["losses"])
    assert 0 < r["max_abs_loss_diff"] < 0.1  # bf16 differs (it is another dtype), but only by rounding
