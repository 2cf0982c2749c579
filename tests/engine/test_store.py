import pyarrow.parquet as pq

from engine.scoring.store import JOURNAL, SCORES, SCHEMA, ScoreStore, read_scores


def row(donor, status="ok", loss=1.0, sample="s1"):
    return {"donor": donor, "loss": loss, "token_accuracy": 0.5, "n_examples": 2, "n_tokens": 9,
            "status": status, "backend": "hf", "seconds": 0.1, "sample_id": sample, "path": "/x", "meta": {"step": 3}}


def test_append_is_durable_before_compaction(tmp_path):
    store = ScoreStore(tmp_path, compact_every_s=1e9)
    store.append([row("a"), row("b")])
    assert not (tmp_path / SCORES).exists()
    assert sorted(read_scores(tmp_path).donor) == ["a", "b"]


def test_torn_last_journal_line_is_ignored(tmp_path):
    store = ScoreStore(tmp_path, compact_every_s=1e9)
    store.append([row("a")])
    with (tmp_path / JOURNAL).open("a") as fh:
        fh.write('{"donor": "b", "loss": 1.')
    assert list(read_scores(tmp_path).donor) == ["a"]


def test_compaction_keeps_schema_and_dedupes_last_write_wins(tmp_path):
    store = ScoreStore(tmp_path, compact_every_s=1e9)
    store.append([row("a", status="failed", loss=float("nan")), row("b")])
    store.compact()
    store.append([row("a", loss=2.0)])
    # a crash between parquet replace and journal truncation leaves rows in both: still exactly once
    (tmp_path / JOURNAL).write_text((tmp_path / JOURNAL).read_text() * 2)
    df = read_scores(tmp_path / SCORES)
    assert sorted(df.donor) == ["a", "b"]
    assert df.set_index("donor").loc["a", "status"] == "ok"
    store.compact()
    assert pq.read_schema(tmp_path / SCORES).names == SCHEMA.names
    assert (tmp_path / JOURNAL).read_text() == ""
    assert store.completed("s1") == {"a", "b"} and store.completed("s2") == set()


def test_a_store_written_before_a_column_existed_reads_and_compacts(tmp_path):
    import pyarrow as pa

    old = pa.schema([f for f in SCHEMA if f.name not in ("nll_sq_sum", "nll_tok_sum", "tok_sq_sum")])
    old_row = {**row("a"), "meta": "{}", "round": 0, "written_at": 1.0}
    pq.write_table(pa.Table.from_pylist([old_row], schema=old), tmp_path / SCORES)
    store = ScoreStore(tmp_path, compact_every_s=1e9)
    store.append([{**row("b"), "nll_sq_sum": 4.0, "nll_tok_sum": 2.0, "tok_sq_sum": 81}])
    store.compact()
    df = read_scores(tmp_path).set_index("donor")
    assert pq.read_schema(tmp_path / SCORES).names == SCHEMA.names
    assert df.loc["a"].isna()["nll_sq_sum"] and df.loc["b", "tok_sq_sum"] == 81 and df.loc["a", "n_tokens"] == 9


def test_the_row_builder_fills_every_column_and_refuses_unknown_ones():
    import pytest

    from engine.core.scores import EXACT, NAMES, score_row, set_fields

    built = score_row("a", loss=0.5)
    assert list(built) == list(NAMES) and SCHEMA.names == list(NAMES)
    assert (built["donor"], built["loss"], built["round"], built["kind"], built["status"]) == ("a", 0.5, 0, EXACT, None)
    assert set_fields(built, status="ok")["status"] == "ok"
    with pytest.raises(ValueError, match="lsos"):
        score_row("a", lsos=0.5)
    with pytest.raises(ValueError, match="sampel_id"):
        set_fields(built, sampel_id="s")


def test_automatic_compaction_waits_in_proportion_to_what_the_last_one_cost(tmp_path):
    """A large store is rewritten less often: the gap after a compaction is its duration / COMPACT_SHARE."""
    from engine.scoring.store import COMPACT_SHARE

    store = ScoreStore(tmp_path, compact_every_s=0.0)
    store.append([row("a")])  # compacts at once (no minimum gap)
    assert (tmp_path / SCORES).exists() and (tmp_path / JOURNAL).read_text() == ""
    assert store._gap_s > 0 and store._gap_s * COMPACT_SHARE < 5.0
    store.append([row("b")])  # within 1/COMPACT_SHARE times the last compaction's duration: journal only
    assert '"b"' in (tmp_path / JOURNAL).read_text() and sorted(read_scores(tmp_path).donor) == ["a", "b"]


def test_per_example_values_round_trip_through_journal_and_parquet(tmp_path):
    store = ScoreStore(tmp_path, compact_every_s=1e9)
    store.append([{**row("a"), "example_nll": [0.25, 1.5], "example_tokens": [4, 5]}, row("b")])
    for stage in ("journal", "parquet"):
        df = read_scores(tmp_path).set_index("donor")
        assert list(df.loc["a", "example_nll"]) == [0.25, 1.5] and list(df.loc["a", "example_tokens"]) == [4, 5], stage
        assert df.loc["b", "example_nll"] is None or df.loc["b", "example_nll"] != df.loc["b", "example_nll"], stage
        store.compact()
