"""Cascade scoring on a real local Ray with real PEFT adapters, checked against exhaustive scoring and PEFT itself."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.scoring.cascade import CascadeConfig, RoundStats, paired_stderr, prune, settle
from engine.core.config import validate
from engine.core.errors import ConfigError, DataError
from engine.scoring import ScoreConfig, score
from engine.selection import select
from engine.scoring.store import read_scores

N_DONORS = 16
CASCADE = {"first_slice": 4, "keep_fraction": 0.25, "z": 1.0, "growth": 2, "min_survivors": 3}


@pytest.fixture(scope="module")
def graded_pool(world, base_dir):
    """16 random q/v LoRAs of growing size: losses spread, and the exhaustive run says which are best."""
    from transformers import AutoModelForCausalLM

    from bench.world.tiny import write_lora_adapter

    pool = world / "graded_pool"
    if not pool.exists():
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
        for i in range(N_DONORS):
            write_lora_adapter(base_dir, pool / f"g{i:02d}", seed=100 + i, r=4, alpha=8, init_std=0.05 * 1.2 ** i,
                               base_model=base)
    return pool


def config(tmp_path, name, pool, task_file, base_dir, **kw) -> ScoreConfig:
    return ScoreConfig(base=str(base_dir), donors=[str(pool)], data=task_file, out=tmp_path / name, samples=None,
                       donors_per_call=4, **kw)


@pytest.fixture(scope="module")
def exhaustive(ray_local, tmp_path_factory, graded_pool, task_file, base_dir):
    cfg = config(tmp_path_factory.mktemp("exh"), "out", graded_pool, task_file, base_dir)
    return score(cfg), read_scores(cfg.out)


@pytest.fixture(scope="module")
def cascade(ray_local, tmp_path_factory, graded_pool, task_file, base_dir):
    cfg = config(tmp_path_factory.mktemp("cas"), "out", graded_pool, task_file, base_dir, strategy="cascade",
                 cascade=CASCADE)
    return score(cfg), read_scores(cfg.out), cfg


def top(df, k: int) -> list[str]:
    donors = df[(df.donor != "__base__") & (df.status == "ok")].sort_values(["loss", "donor"])
    return list(donors.donor[:k])


def test_cascade_finds_the_exhaustive_top_k_for_less_compute(exhaustive, cascade):
    (ex_summary, ex), (summary, rows, cfg) = exhaustive, cascade
    full_id = ex.sample_id.iloc[0]
    final = rows[rows.sample_id == full_id]
    assert set(top(ex, 3)) <= set(final.donor), "a true top-3 donor was pruned"
    assert [d.donor for d in select(cfg.out, k=3).donors] == top(ex, 3)
    both = final.merge(ex, on="donor", suffixes=("", "_ex"))
    assert (both.loss - both.loss_ex).abs().max() < 1e-6, "prefix sums must equal the full-sample loss"
    assert (both.n_tokens == both.n_tokens_ex).all() and (both.nll_sq_sum - both.nll_sq_sum_ex).abs().max() < 1e-6
    assert summary.donor_examples < 0.6 * ex_summary.donor_examples
    assert len(final) - 1 < N_DONORS  # the base plus the survivors only


def test_rounds_are_recorded_as_nested_prefixes(exhaustive, cascade):
    (_, ex), (summary, rows, cfg) = exhaustive, cascade
    full_id, total = ex.sample_id.iloc[0], int(ex.n_examples.iloc[0])
    record = json.loads((cfg.out / "cascade.json").read_text())
    assert record["finished"] and record["rounds"] == summary.rounds
    assert rows.base_fingerprint.notna().all() and rows.base_fingerprint.nunique() == 1  # every round says its base
    sizes = [r["examples"] for r in record["rounds"]]
    assert sizes[0] == 4 and sizes[-1] == total and sizes == sorted(sizes)
    survivors = None
    for r in record["rounds"]:
        got = rows[rows["round"] == r["round"]]
        assert set(got.sample_id) == {full_id if r["final"] else f"{full_id}@{r['examples']}.s{cfg.seed}"}
        assert (got.n_examples == r["examples"]).all()
        donors = set(got.donor) - {"__base__"}
        assert "__base__" in set(got.donor) and len(donors) == r["scored"]
        if survivors is not None:
            assert donors == survivors, "a round scores exactly the previous round's survivors"
        by_loss = got[got.donor != "__base__"].sort_values(["loss", "donor"]).donor
        survivors = set(by_loss[: r["kept"]])
    assert record["rounds"][0]["scored"] == N_DONORS
    placed = [json.loads(line) for line in (cfg.out / "placement.jsonl").read_text().splitlines()]
    assert {(p["donor"], p["sample_id"], p["round"]) for p in placed} == set(
        zip(rows.donor, rows.sample_id, rows["round"])), "placement.jsonl names each row's own round"


def test_moments_match_per_example_peft(cascade, graded_pool, base_dir, tokenizer, task_file):
    from engine.scoring.cascade import cascade_order
    from engine.core.data import EncodedSample, encode_sample, load_jsonl
    from tests.adapters import peft_reference_loss

    _, rows, cfg = cascade
    sample = cascade_order(encode_sample(tokenizer, load_jsonl(task_file), salt=str(base_dir)), cfg.seed)
    row = rows[(rows["round"] == 0) & (rows.donor == "g00")].iloc[0]
    nll = []
    for ex in sample.examples[:4]:
        loss, _ = peft_reference_loss(base_dir, graded_pool / "g00", EncodedSample([ex]))
        nll.append(loss * ex.n_completion)
    toks = np.array([ex.n_completion for ex in sample.examples[:4]])
    nll = np.array(nll)
    assert row.loss == pytest.approx(nll.sum() / toks.sum(), abs=1e-5)
    assert row.nll_sq_sum == pytest.approx((nll ** 2).sum(), rel=1e-5)
    assert row.nll_tok_sum == pytest.approx((nll * toks).sum(), rel=1e-5)
    assert row.tok_sq_sum == (toks ** 2).sum()
    assert np.allclose(row.example_nll, nll, atol=1e-4) and list(row.example_tokens) == list(toks)


def whole_size(ex) -> int:
    return int(ex.n_examples.iloc[0])


def test_a_prefix_row_holds_every_example_of_its_prefix_in_the_cascades_order(exhaustive, cascade):
    (_, ex), (_, rows, _) = exhaustive, cascade
    for donor in (top(ex, 1)[0], "__base__"):  # both are scored on every round
        mine = rows[rows.donor == donor].sort_values("round")
        first, last = mine.iloc[0], mine.iloc[-1]
        assert last.n_examples == whole_size(ex) and len(last.example_nll) == last.n_examples and list(last.example_nll[:4]) == list(first.example_nll)
        assert sum(last.example_nll) / sum(last.example_tokens) == pytest.approx(last.loss, abs=1e-9)
        whole = ex[ex.donor == donor].iloc[0]  # the same examples, in the sample's order rather than the cascade's
        assert sorted(whole.example_nll) == pytest.approx(sorted(last.example_nll), abs=1e-6)


def test_resume_mid_cascade_rescores_nothing_finished(ray_local, tmp_path, cascade, graded_pool, task_file, base_dir):
    _, uninterrupted, _ = cascade
    staged = config(tmp_path, "out", graded_pool, task_file, base_dir, strategy="cascade",
                    cascade={**CASCADE, "stop_after_round": 1})
    first = score(staged)
    before = read_scores(staged.out)
    assert sorted(set(before["round"])) == [0, 1] and not json.loads((staged.out / "cascade.json").read_text())["finished"]
    with pytest.raises(DataError, match="not reached the full sample"):
        select(staged.out, k=3)
    resumed = score(config(tmp_path, "out", graded_pool, task_file, base_dir, strategy="cascade", cascade=CASCADE))
    after = read_scores(staged.out)
    kept = after.set_index(["donor", "sample_id", "round"]).loc[before.set_index(["donor", "sample_id", "round"]).index]
    assert (kept.written_at.values == before.set_index(["donor", "sample_id", "round"]).written_at.values).all()
    assert resumed.skipped_done == first.rounds[1]["scored"] + N_DONORS
    done_compute = sum(r["donor_examples"] for r in resumed.rounds[2:])
    assert resumed.donor_examples == done_compute and first.donor_examples + done_compute == sum(
        r["donor_examples"] for r in resumed.rounds)
    same = after.set_index(["donor", "sample_id", "round"]).sort_index()
    ref = uninterrupted.set_index(["donor", "sample_id", "round"]).sort_index()
    assert list(same.index) == list(ref.index) and (same.loss - ref.loss).abs().max() < 1e-9


def test_a_cascade_resumed_with_another_seed_never_reuses_the_other_orders_prefixes(
        ray_local, tmp_path, graded_pool, task_file, base_dir):
    """Prefix rows name the shuffle seed: resuming with seed 1 after seed 0 gives a fresh seed-1 cascade's rows."""
    staged = config(tmp_path, "resumed", graded_pool, task_file, base_dir, strategy="cascade", seed=0,
                    cascade={**CASCADE, "stop_after_round": 1})
    score(staged)
    again = config(tmp_path, "resumed", graded_pool, task_file, base_dir, strategy="cascade", seed=1, cascade=CASCADE)
    fresh = config(tmp_path, "fresh", graded_pool, task_file, base_dir, strategy="cascade", seed=1, cascade=CASCADE)
    resumed, clean = score(again), score(fresh)
    assert resumed.rounds == [{**r, "seconds": resumed.rounds[i]["seconds"]} for i, r in enumerate(clean.rounds)]

    def seed1(out):
        rows = read_scores(out)
        return rows[~rows.sample_id.str.contains(".s0", regex=False)].set_index(["donor", "sample_id", "round"]).loss
    a, b = seed1(again.out).sort_index(), seed1(fresh.out).sort_index()
    assert list(a.index) == list(b.index) and (a - b).abs().max() < 1e-9
    assert [d.donor for d in select(again.out, k=3).donors] == [d.donor for d in select(fresh.out, k=3).donors]


def test_an_unfinished_final_round_is_not_selected(tmp_path, cascade):
    _, rows, _ = cascade
    full_id = rows.sample_id[rows["round"] == 0].iloc[0].split("@")[0]
    partial = rows[(rows.sample_id != full_id) | (rows.donor != "__base__")]
    partial.to_parquet(tmp_path / "scores.parquet", index=False)
    with pytest.raises(DataError, match="final round is unfinished"):
        select(tmp_path, k=2)


def test_selection_after_a_cascade_ranks_final_round_losses_only(exhaustive, cascade):
    (_, ex), (_, rows, cfg) = exhaustive, cascade
    full_id = ex.sample_id.iloc[0]
    final = rows[(rows.sample_id == full_id) & (rows.donor != "__base__")]
    chosen = select(cfg.out, k=3, below_base=True, weighting="mwa")
    assert {d.donor for d in chosen.donors} <= set(final.donor)
    assert chosen.base_loss == pytest.approx(float(ex.set_index("donor").loc["__base__", "loss"]), abs=1e-6)
    losses = final.set_index("donor").loss
    assert all(d.loss == losses[d.donor] for d in chosen.donors)
    for strategy in ("worst-k", "random-k", "all"):
        with pytest.raises(DataError, match=f"strategy: {strategy} needs every donor's full-sample loss"):
            select(cfg.out, k=2, strategy=strategy)
    with pytest.raises(DataError, match=r"k: 12 exceeds .* cascade.min_survivors and cascade.settle_k >= 12"):
        select(cfg.out, k=12)


@pytest.mark.parametrize("bad, field", [
    ({"cascade": {"keep_fraction": 0}}, "cascade.keep_fraction"),
    ({"cascade": {"keep_fraction": 1.5}}, "cascade.keep_fraction"),
    ({"cascade": {"growth": 1}}, "cascade.growth"),
    ({"cascade": {"first_slice": 1}}, "cascade.first_slice"),
    ({"cascade": {"z": -1}}, "cascade.z"),
    ({"cascade": {"min_survivors": 0}}, "cascade.min_survivors"),
    ({"cascade": {"rounds": 3}}, "cascade.rounds: unknown key"),
    ({"strategy": "halving"}, "strategy"),
])
def test_bad_cascade_settings_name_the_field(bad, field):
    data = {"base": "b", "donors": ["d"], "data": "x.jsonl", "out": "o", "strategy": "cascade", **bad}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(ScoreConfig, data, "score")


def test_cascade_options_without_the_cascade_are_an_error():
    with pytest.raises(ConfigError, match="cascade: options given but strategy is 'exhaustive'"):
        validate(ScoreConfig, {"base": "b", "donors": ["d"], "data": "x", "out": "o", "cascade": {"z": 1}}, "score")
    assert ScoreConfig(base="b", donors=["d"], data="x", out="o").strategy == "exhaustive"


def test_stderr_matches_the_per_example_standard_error():
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 1.0, size=40)
    tokens = 5
    a = RoundStats(examples=0)
    b = RoundStats(examples=0)
    for i, l in enumerate(losses):
        nll = float(l * tokens)
        part = RoundStats(nll, 0.0, tokens, 1, nll * nll, nll * tokens, tokens * tokens)
        if i < 10:
            a = a + part
        else:
            b = b + part
    whole = a + b
    assert whole.loss == pytest.approx(losses.mean())
    assert whole.stderr == pytest.approx(losses.std(ddof=1) / math.sqrt(len(losses)))


def test_prune_keeps_the_cut_off_and_donors_within_the_margin():
    def s(loss, se, n=100, t=1):
        # n examples of t tokens whose per-example losses have mean `loss` and standard error `se`
        var = se * se * n
        return RoundStats(loss * n * t, 0, n * t, n, (var * (n - 1) / n + loss ** 2) * n * t * t, loss * n * t * t,
                          n * t * t)

    stats = {"a": s(1.0, 0.01), "b": s(1.1, 0.01), "c": s(1.12, 0.01), "d": s(1.2, 0.01), "e": s(2.0, 0.01),
             "f": s(1.3, 0.2)}
    assert stats["f"].stderr == pytest.approx(0.2)
    cfg = CascadeConfig(keep_fraction=0.3, z=2.0, min_survivors=1)  # m = 2: the cut-off is b's 1.1
    kept, cutoff = prune(stats, cfg)
    # margin 2·√(0.01² + 0.01²) = 0.028 keeps c (1.12), not d (1.2); f's own noise (0.2) keeps it at 1.3
    assert cutoff == pytest.approx(1.1) and kept == ["a", "b", "c", "f"]
    assert prune(stats, cfg.model_copy(update={"z": 0.0}))[0] == ["a", "b"]
    assert prune(stats, cfg.model_copy(update={"min_survivors": 6}))[0] == ["a", "b", "c", "d", "f", "e"]


SETTLE = {**CASCADE, "keep_fraction": 0.5, "min_survivors": 4, "settle_k": 2, "settle_z": 2.0, "settle_min_examples": 8}


@pytest.fixture(scope="module")
def settling_pool(graded_pool, world, base_dir, tokenizer, task_file):
    """The graded pool's 16 near-ties plus two LoRAs trained on the task: a top-2 that is clear after a few examples."""
    import shutil

    from engine.core.data import encode_sample, load_jsonl
    from tests.adapters import write_trained_adapter

    pool = world / "settling_pool"
    if not pool.exists():
        shutil.copytree(graded_pool, pool)
        sample = encode_sample(tokenizer, load_jsonl(task_file)[:8], salt="train")
        for seed in (1, 2):
            write_trained_adapter(base_dir, pool / f"trained{seed}", sample, seed=seed)
    return pool


@pytest.fixture(scope="module")
def settled(ray_local, tmp_path_factory, settling_pool, task_file, base_dir):
    root = tmp_path_factory.mktemp("settle")
    runs = {name: config(root, name, settling_pool, task_file, base_dir, **kw) for name, kw in (
        ("settled", {"strategy": "cascade", "cascade": SETTLE}),
        ("floor", {"strategy": "cascade", "cascade": {k: v for k, v in SETTLE.items() if not k.startswith("settle")}}),
        ("exhaustive", {}))}
    return {name: (score(cfg), read_scores(cfg.out), cfg) for name, cfg in runs.items()}


def test_a_settled_cascade_stops_the_others_and_finishes_only_the_top_k(settled):
    (ex_summary, ex, _), (summary, rows, cfg), (unsettled, _, _) = (settled[n] for n in ("exhaustive", "settled", "floor"))
    record = json.loads((cfg.out / "cascade.json").read_text())
    final = rows[(rows.sample_id == ex.sample_id.iloc[0]) & (rows.donor != "__base__")]
    assert set(top(ex, 2)) == {"trained1", "trained2"}
    assert any(r["settled_out"] for r in record["rounds"]), "the trained pair settles the ranking"
    assert len(final) == 2 < SETTLE["min_survivors"], "settled: the floor no longer applies, only the top-2 finish"
    assert [d.donor for d in select(cfg.out, k=2).donors] == top(ex, 2)
    assert summary.donor_examples < unsettled.donor_examples < ex_summary.donor_examples
    assert [r["kept"] for r in record["rounds"]][-2] == 2 and record["rounds"][-1]["scored"] == 2
    with pytest.raises(DataError, match="settle_k >= 3"):
        select(cfg.out, k=3)
    resumed = score(cfg)  # a rerun settles the same way from the stored rows and scores nothing

    def shape(rounds):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]
    assert resumed.donor_examples == 0 and shape(resumed.rounds) == shape(record["rounds"])


def _per_example(nll, tok):
    nll, tok = list(map(float, nll)), list(map(int, tok))
    return RoundStats(sum(nll), 0.0, sum(tok), len(nll), sum(x * x for x in nll), sum(x * t for x, t in zip(nll, tok)),
                      sum(t * t for t in tok), tuple(nll), tuple(tok))


def test_paired_stderr_is_the_delta_method_se_of_the_paired_difference():
    rng = np.random.default_rng(1)
    tok = rng.integers(1, 6, size=50)
    hard = rng.gamma(2.0, 1.0, size=50) * tok  # per-example difficulty both donors share
    a = _per_example(hard + rng.normal(0, 0.1, 50) * tok, tok)
    b = _per_example(hard * 1.05 + rng.normal(0, 0.1, 50) * tok, tok)
    diff = np.array(a.each_nll) - np.array(b.each_nll)
    ratio = diff.sum() / tok.sum()
    direct = np.sqrt(((diff - ratio * tok) ** 2).sum() * 50 / 49) / tok.sum()
    assert paired_stderr(a, b) == pytest.approx(direct, rel=1e-12)
    assert paired_stderr(a, b) < 0.25 * math.hypot(a.stderr, b.stderr), "shared difficulty cancels in the pair"
    assert paired_stderr(a, _per_example(b.each_nll, tok + 1)) == math.inf  # other tokens: not the same examples
    no_vectors = RoundStats(b.nll, 0.0, b.tokens, b.examples, b.nll_sq, b.nll_tok, b.tok_sq)
    assert paired_stderr(a, no_vectors) == math.inf  # rows stored before per-example values: nothing settles


def test_settle_stops_donors_below_the_floor_only_when_separated():
    tok = [2] * 20
    base = np.linspace(1, 3, 20)
    stats = {"a": _per_example(base, tok), "b": _per_example(base + 0.01 + 0.001 * np.sin(np.arange(20)), tok),
             "c": _per_example(base + 0.5 + 0.05 * np.cos(np.arange(20)), tok),
             "twin": _per_example(base + 0.011 + 0.3 * np.sin(np.arange(20) * 7), tok)}
    keep = ["a", "b", "twin", "c"]
    cfg = CascadeConfig(min_survivors=4, settle_k=2, settle_z=2.0, settle_min_examples=8)
    kept, gone = settle(stats, keep, 20, cfg)
    assert kept == ["a", "b", "twin"] and gone == 1, "c is far below both; twin is within noise of b"
    assert settle(stats, keep, 4, cfg) == (keep, 0), "too few examples: nothing settles"
    assert settle(stats, keep, 20, cfg.model_copy(update={"settle_k": None})) == (keep, 0)
    assert settle(stats, keep, 20, cfg.model_copy(update={"settle_z": 1e6}))[0] == keep


def test_settle_k_above_the_floor_names_the_fix():
    with pytest.raises(ConfigError, match=r"settle_k \(5\) exceeds min_survivors \(4\)"):
        validate(ScoreConfig, {"base": "b", "donors": ["d"], "data": "x", "out": "o", "strategy": "cascade",
                               "cascade": {"settle_k": 5}}, "score")
