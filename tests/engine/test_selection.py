"""Selection from a real scores.parquet: strategies, filters, sample choice, weights and selection.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from engine.cli import main
from engine.core.errors import ConfigError, DataError
from engine.selection import Selection, select

# donor -> (loss, step); base loss is 1.0
LOSSES = {"a": (0.70, 100), "b": (0.50, 200), "c": (0.90, 300), "d": (1.20, 400), "e": (0.50, 500)}
SAMPLE = "sample-1"


def score_row(donor: str, loss: float, status: str = "ok", sample: str = SAMPLE, meta: dict | None = None,
              written_at: float = 0.0) -> dict:
    return {
        "donor": donor, "loss": loss, "token_accuracy": 0.5, "n_examples": 8, "n_tokens": 64, "status": status,
        "error": None if status == "ok" else "boom", "backend": "hf", "seconds": 0.1, "sample_id": sample,
        "path": None if donor == "__base__" else f"/pool/{donor}", "meta": json.dumps(meta or {}),
        "revision": None, "round": 0, "written_at": written_at,
    }


def write_scores(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        row["written_at"] = row["written_at"] or float(i + 1)
    pd.DataFrame(rows).to_parquet(folder / "scores.parquet", index=False)
    return folder / "scores.parquet"


@pytest.fixture(scope="session")
def scores(tmp_path_factory) -> Path:
    rows = [score_row("__base__", 1.0)]
    rows += [score_row(d, loss, meta={"step": step}) for d, (loss, step) in LOSSES.items()]
    rows += [score_row("broken", float("nan"), status="failed"), score_row("never", 0.1, status="skipped")]
    return write_scores(tmp_path_factory.mktemp("scores"), rows)


def names(selection: Selection) -> list[str]:
    return [d.donor for d in selection.donors]


def test_top_k_takes_the_lowest_losses_and_breaks_ties_by_name(scores):
    selection = select(scores, k=3)
    assert names(selection) == ["b", "e", "a"]
    assert [d.weight for d in selection.donors] == pytest.approx([1 / 3] * 3)
    assert selection.base_loss == 1.0 and selection.k == 3 and selection.penalty is None
    assert selection.donors[0].path == "/pool/b"


def test_failed_and_skipped_rows_are_never_selected(scores):
    assert set(names(select(scores, strategy="all"))) == set(LOSSES)


def test_below_base_drops_donors_worse_than_the_base(scores):
    assert "d" not in names(select(scores, strategy="all", below_base=True))
    assert names(select(scores, k=10, below_base=True)) == ["b", "e", "a", "c"]


def test_worst_k_and_all(scores):
    assert names(select(scores, k=2, strategy="worst-k")) == ["d", "c"]
    assert names(select(scores, strategy="all")) == ["b", "e", "a", "c", "d"]


def test_random_k_is_reproducible_per_seed(scores):
    draws = {seed: names(select(scores, k=3, strategy="random-k", seed=seed)) for seed in range(6)}
    assert draws[0] == names(select(scores, k=3, strategy="random-k", seed=0))
    assert len({tuple(d) for d in draws.values()}) > 1
    assert all(len(set(d)) == 3 and set(d) <= set(LOSSES) for d in draws.values())


def test_mwa_weights_follow_the_losses(scores):
    selection = select(scores, k=3, weighting="mwa", penalty=2.0)
    raw = [d.loss ** -2.0 for d in selection.donors]
    assert [d.weight for d in selection.donors] == pytest.approx([r / sum(raw) for r in raw])
    assert selection.penalty == 2.0


def test_mwa_steps_reads_the_step_from_manifest_metadata(scores):
    selection = select(scores, k=2, weighting="mwa-steps", penalty=1.0)
    assert names(selection) == ["b", "e"]
    assert [d.weight for d in selection.donors] == pytest.approx([200 / 700, 500 / 700])


def test_mwa_steps_without_steps_names_the_donor(tmp_path):
    path = write_scores(tmp_path, [score_row("__base__", 1.0), score_row("x", 0.5, meta={"step": 10}),
                                   score_row("nostep", 0.6)])
    with pytest.raises(DataError, match="'nostep'.*step"):
        select(path, k=2, weighting="mwa-steps")


def test_softmax_weights_and_temperature_are_recorded(tmp_path):
    """Distinct losses, so only w_i = exp(-loss_i/T) / Σ_j exp(-loss_j/T) passes (uniform weights would not)."""
    import math

    losses = {"p": 0.50, "q": 0.60, "r": 0.80}
    path = write_scores(tmp_path, [score_row("__base__", 1.0)] + [score_row(d, x) for d, x in losses.items()])
    selection = select(path, k=3, weighting="softmax", temperature=0.1, out=tmp_path / "selection.json")
    # By hand: exp(-5), exp(-6), exp(-8) over their sum = 0.7054, 0.2595, 0.0351.
    total = math.exp(-5) + math.exp(-6) + math.exp(-8)
    expected = [math.exp(-5) / total, math.exp(-6) / total, math.exp(-8) / total]
    assert names(selection) == ["p", "q", "r"]
    assert [d.weight for d in selection.donors] == pytest.approx(expected, rel=1e-12)
    assert [round(d.weight, 4) for d in selection.donors] == [0.7054, 0.2595, 0.0351]
    assert selection.temperature == 0.1 and selection.penalty is None
    written = json.loads((tmp_path / "selection.json").read_text())
    assert written["temperature"] == 0.1 and [d["weight"] for d in written["donors"]] == pytest.approx(expected)


def test_latest_row_of_a_donor_wins(tmp_path):
    path = write_scores(tmp_path, [score_row("__base__", 1.0), score_row("a", 0.2, status="failed"),
                                   score_row("a", 0.8), score_row("b", 0.9)])
    selection = select(path, k=1)
    assert names(selection) == ["a"] and selection.donors[0].loss == 0.8


def test_several_samples_are_refused_until_one_is_named(tmp_path):
    """No guess by recency: a store of two samples names both and says how to choose; --sample picks one."""
    rows = [score_row("__base__", 2.0, sample="old"), score_row("a", 0.1, sample="old"),
            score_row("__base__", 1.0, sample="new"), score_row("b", 0.9, sample="new"),
            score_row("c", 0.8, sample="new")]
    path = write_scores(tmp_path, rows)
    with pytest.raises(DataError, match=r"2 data samples \(new, old\).*--sample"):
        select(path, strategy="all")
    assert names(select(path, strategy="all", sample="new")) == ["c", "b"]
    old = select(path, strategy="all", sample="old")
    assert names(old) == ["a"] and old.base_loss == 2.0 and old.sample_id == "old"


def test_recorded_pools_scope_the_ranking(tmp_path):
    """A donor of another pool (removed from the manifest since) is never ranked; several pools need --pool."""
    from engine.core.pools import write_pool

    rows = [score_row("__base__", 1.0), score_row("a", 0.2), score_row("b", 0.5), score_row("c", 0.9)]
    path = write_scores(tmp_path, rows)
    first = write_pool(tmp_path, SAMPLE, ["a", "b", "c"])
    assert names(select(path, k=1)) == ["a"]
    second = write_pool(tmp_path, SAMPLE, ["b", "c"])
    with pytest.raises(DataError, match=f"2 pools scored on sample {SAMPLE}|2 scoring scopes"):
        select(path, k=1)
    picked = select(path, k=1, pool=second.pool)
    assert names(picked) == ["b"] and picked.pool == second.pool
    assert names(select(path, k=1, pool=first.pool[:6])) == ["a"]
    with pytest.raises(DataError, match="not found"):
        select(path, k=1, pool="ffff0000")


def test_options_that_do_not_fit_are_config_errors(scores):
    with pytest.raises(ConfigError, match="penalty"):
        select(scores, k=2, penalty=1.0)
    with pytest.raises(ConfigError, match="k: required"):
        select(scores)
    with pytest.raises(DataError, match="no donor"):
        select(write_scores(scores.parent / "only_base", [score_row("__base__", 1.0)]), k=1)


def test_cli_writes_selection_json(scores, tmp_path, capsys):
    out = tmp_path / "selection.json"
    assert main(["select", "--scores", str(scores.parent), "--k", "2", "--weighting", "mwa", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written) >= {"k", "strategy", "weighting", "penalty", "base_loss", "donors"}
    assert written["k"] == 2 and written["penalty"] == 1.0
    assert sum(d["weight"] for d in written["donors"]) == pytest.approx(1.0)
    assert {"donor", "loss", "weight", "path"} <= set(written["donors"][0])
    assert Selection.read(out).donors[0].donor == "b"


def test_cli_config_file_and_user_errors(scores, tmp_path, capsys):
    config = tmp_path / "select.yaml"
    config.write_text(f"scores: {scores}\nk: 2\nstrategy: worst-k\nout: {tmp_path / 'sel.json'}\n")
    assert main(["select", "--config", str(config), "--k", "1"]) == 0
    assert names(Selection.read(tmp_path / "sel.json")) == ["d"]
    assert main(["select", "--scores", str(scores), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k: required" in err[0]


def test_rows_still_in_the_store_journal_are_selected(tmp_path):
    from engine.scoring.store import ScoreStore

    store = ScoreStore(tmp_path, compact_every_s=3600)  # rows stay in the write-ahead journal
    store.append([score_row("__base__", 1.0), score_row("a", 0.9), score_row("b", 0.4)])
    assert not (tmp_path / "scores.parquet").exists()
    assert names(select(tmp_path, k=1)) == ["b"]


def accuracy_scores(folder: Path) -> Path:
    """Loss and token accuracy disagree: by loss a < b < c < d, by accuracy c > b = d > a (b and d tied)."""
    rows = [dict(score_row("__base__", 1.0), token_accuracy=0.40)]
    for donor, loss, acc in (("a", 0.50, 0.30), ("b", 0.60, 0.70), ("c", 0.90, 0.80), ("d", 0.55, 0.70)):
        rows.append(dict(score_row(donor, loss), token_accuracy=acc))
    return write_scores(folder, rows)


def test_token_accuracy_ranks_highest_first_and_breaks_ties_by_loss(tmp_path):
    path = accuracy_scores(tmp_path)
    assert names(select(path, k=3)) == ["a", "d", "b"]
    by_acc = select(path, k=3, metric="token_accuracy", out=tmp_path / "sel.json")
    assert names(by_acc) == ["c", "d", "b"]  # d before b: equal accuracy, lower loss
    assert [d.token_accuracy for d in by_acc.donors] == [0.80, 0.70, 0.70]
    written = json.loads((tmp_path / "sel.json").read_text())
    assert written["metric"] == "token_accuracy" and written["donors"][0]["token_accuracy"] == 0.80
    assert names(select(path, k=2, strategy="worst-k", metric="token_accuracy")) == ["a", "b"]
    # below_base follows the metric: a's loss beats the base's 1.0 but its accuracy (0.30) does not beat 0.40
    assert names(select(path, strategy="all", below_base=True, metric="token_accuracy")) == ["c", "d", "b"]
    assert select(path, k=1).metric == "loss"


def test_metric_flag_reaches_selection_json(tmp_path, capsys):
    path = accuracy_scores(tmp_path)
    out = tmp_path / "s.json"
    assert main(["select", "--scores", str(path), "--k", "1", "--metric", "token_accuracy", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["donors"][0]["donor"] == "c"
    assert "top-k by token_accuracy" in capsys.readouterr().out


def test_ablations_refuse_a_pool_that_the_screen_cut(tmp_path):
    """With screen.probe 0, donors the screen dropped have screen rows only: a worst-k or random-k arm would draw
    from the screen's survivors (the worst of the predicted best), so it refuses; top-k ranks the survivors."""
    from engine.core.pools import write_pool

    rows = [score_row("__base__", 1.0), score_row("a", 0.3), score_row("b", 0.6)]
    rows += [{**score_row(d, loss), "kind": "screen"} for d, loss in (("a", 0.2), ("b", 0.4), ("c", 2.0), ("d", 3.0))]
    path = write_scores(tmp_path, rows)
    write_pool(tmp_path, SAMPLE, ["a", "b", "c", "d"], "screen")
    for strategy in ("worst-k", "random-k", "all"):
        with pytest.raises(DataError, match="stopped 2 donors early"):
            select(path, k=1, strategy=strategy)
    assert names(select(path, k=2)) == ["a", "b"]


def test_cli_names_the_scopes_it_will_not_choose_between(tmp_path, capsys):
    from engine.core.pools import write_pool

    path = write_scores(tmp_path, [score_row("__base__", 1.0), score_row("a", 0.2), score_row("b", 0.5)])
    one, two = write_pool(tmp_path, SAMPLE, ["a", "b"]), write_pool(tmp_path, SAMPLE, ["b"])
    out = tmp_path / "selection.json"
    assert main(["select", "--scores", str(path), "--k", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and one.pool in err and two.pool in err and "--pool" in err
    assert not out.exists()
    assert main(["select", "--scores", str(path), "--k", "1", "--pool", two.pool, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["donors"][0]["donor"] == "b"
