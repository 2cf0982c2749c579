"""The roofline bench's arithmetic on known inputs: the marginal donor, its multiple of the limit, the table."""
import pytest

from bench.bench_roofline import against_the_limit, render


def test_the_marginal_donor_takes_the_start_up_out():
    # 10 s of start-up, then 0.5 s per donor up to 64 donors and 0.4 s per donor beyond
    seconds = {8: 10 + 8 * 0.5, 64: 10 + 64 * 0.5, 500: 10 + 64 * 0.5 + 436 * 0.4}
    r = against_the_limit(seconds, limit_s=0.25)
    assert r["marginal_by_step"] == pytest.approx([0.5, 0.4])
    assert r["marginal_s"] == pytest.approx(0.4) and r["ratio"] == pytest.approx(1.6)
    assert r["overhead_ms"] == pytest.approx(150.0)
    assert list(r["seconds"]) == ["8", "64", "500"]


def test_the_table_shows_every_variant_against_its_base_limit():
    lim = {"seconds": 0.25, "threads": 2, "spread": 1.1, "tokens": 3000, "completion_tokens": 300}
    res = {"meta": {"date": "2026-12-03", "machine": "m", "command": "python -m bench.bench_roofline"},
           "bases": {"wide": {"shape": {"hidden": 512, "layers": 8, "vocab": 32000}, "donors": [8, 24], "limit": lim,
                              "variants": {"before": against_the_limit({8: 12.0, 24: 20.0}, 0.25),
                                           "today": against_the_limit({8: 6.0, 24: 10.0}, 0.25)}}}}
    table = render(res)
    assert "| before | 500.0 ms | **2.00×** | 250.0 ms |" in table
    assert "| today | 250.0 ms | **1.00×** | 0.0 ms |" in table
    assert "250.0 ms (2 threads, spread 1.10×)" in table


def test_a_strategy_is_set_against_its_compute_at_the_limits_speed():
    from bench.bench_roofline import against_compute

    # 1,000 forward examples at 0.25 s per 64-example sample = 3.9 s of compute; 10 s wall-clock, 4 s of start-up
    job = {"donors": 99, "seconds": 10.0, "forward_example_equiv": 1000.0, "examples": 64}
    r = against_compute(job, limit_s=0.25, fixed_s=4.0)
    assert r["compute_s"] == pytest.approx(1000 * 0.25 / 64)
    assert r["ratio"] == pytest.approx(10.0 / r["compute_s"]) and r["ratio_without_fixed"] == pytest.approx(6.0 / r["compute_s"])
    assert r["fraction_of_exhaustive"] == pytest.approx(1000 / (100 * 64))  # the base's row counts in both
    lim = {"seconds": 0.25, "threads": 2, "tokens": 3000, "completion_tokens": 300}
    table = render({"meta": {"date": "d", "machine": "m", "command": "c"},
                    "bases": {"tiny": {"shape": {"hidden": 1, "layers": 1, "vocab": 1}, "donors": [8, 99], "limit": lim,
                                       "variants": {}, "strategies": {"cascade": r}}}})
    assert "| tiny | cascade | 99 | 1,000 | 15.6% | 3.9 s | 10.0 s | **2.56×** | 1.54× (start-up 4.0 s) |" in table


def test_the_work_that_is_not_a_forward_pass_is_marginal_too():
    # 1 s of slot building in every job, then 3 ms of preparation, 1 ms of loading and 0.5 ms of record per donor
    work = {n: {"_prepare": 0.003 * n, "_ensure": 1.0 + 0.001 * n, "_record": 0.0005 * n} for n in (64, 500)}
    r = against_the_limit({64: 10.0, 500: 30.0}, limit_s=0.02, work=work)
    assert r["work_ms"] == pytest.approx({"_prepare": 3.0, "_ensure": 1.0, "_record": 0.5})
    assert r["not_forward_ms"] == pytest.approx(4.5)
    lim = {"seconds": 0.02, "threads": 2, "tokens": 3000, "completion_tokens": 300}
    table = render({"meta": {"date": "d", "machine": "m", "command": "c"},
                    "bases": {"tiny": {"shape": {"hidden": 1, "layers": 1, "vocab": 1}, "donors": [64, 500],
                                       "limit": lim, "variants": {"today": r}}}})
    assert "| 4.5 ms (3.0 / 1.0 / 0.5) |" in table


def test_timed_work_wraps_the_engine_methods_and_puts_them_back():
    from actors.scorer import DonorScorer
    from bench.bench_roofline import timed_work

    original = DonorScorer._prepare
    with timed_work() as spent:
        assert DonorScorer._prepare is not original and DonorScorer._prepare.__wrapped__ is original
        with pytest.raises(AttributeError):
            DonorScorer._prepare(object(), None, {})  # a real call through the wrapper, timed even when it fails
    assert DonorScorer._prepare is original and spent["_prepare"] > 0
