"""A rerun in the same folder gives what a fresh folder gives: every stage reads only its own run's pool, sample,
encoding and options (issue: nothing from another run)."""
from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest

from tests.engine.run_world import chat_base, outcome, run, run_config, write_donor, write_manifest

START = {"donors": {"d0": 10, "d1": 11, "d2": 12, "d3": 13}, "samples": 8, "seed": 0, "data": "train_a",
         "dtype": "float32", "method": "linear", "metric": "loss", "chat": False, "lr": 1e-3, "sweep_seed": 0, "k": 2,
         "weighting": "uniform"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, base_dir):
    from bench.world.tiny import write_task

    root = tmp_path_factory.mktemp("scope")
    return {"base": chat_base(base_dir, root / "base"), "pool": root / "pool", "root": root,
            "train_a": write_task(root / "train_a.jsonl", 16, seed=1, op="reverse"),
            "train_b": write_task(root / "train_b.jsonl", 16, seed=2, op="reverse"),
            "val": write_task(root / "val.jsonl", 8, seed=3, op="reverse", choices=3)}


def lay_pool(paths, donors: dict[str, int]) -> None:
    """The pool folder holds exactly `donors` (id -> weight seed), each rewritten only when its seed changed."""
    pool: Path = paths["pool"]
    pool.mkdir(exist_ok=True)
    seeds_file = pool / "seeds.json"
    written = json.loads(seeds_file.read_text()) if seeds_file.exists() else {}
    for name, seed in donors.items():
        if written.get(name) != seed:
            write_donor(paths["base"], pool, name, seed)
            written[name] = seed
    write_manifest(pool, sorted(donors))
    seeds_file.write_text(json.dumps(written))


def picked(out: Path) -> list[str]:
    return [d["donor"] for d in json.loads((out / "arms" / "mashup" / "selection.json").read_text())["donors"]]


def loss_of(out: Path, donor: str) -> float:
    sel = json.loads((out / "arms" / "mashup" / "selection.json").read_text())
    return next(d["loss"] for d in sel["donors"] if d["donor"] == donor)


def test_a_donor_removed_from_the_manifest_is_never_selected(paths, tmp_path):
    state = copy.deepcopy(START)
    lay_pool(paths, state["donors"])
    out = run(run_config(state, tmp_path / "run", paths))
    gone = picked(out)[0]
    state["donors"].pop(gone)
    lay_pool(paths, state["donors"])  # its folder stays on disk; only the manifest forgets it
    again = run(run_config(state, tmp_path / "run", paths))
    assert gone not in picked(again)
    assert outcome(again) == outcome(run(run_config(state, tmp_path / "fresh", paths)))


def test_going_back_to_an_earlier_sample_ranks_on_that_sample(paths, tmp_path):
    """Samples 8, then 4, then 8 again in one folder: the last selection equals the first, losses included."""
    state = copy.deepcopy(START)
    lay_pool(paths, state["donors"])
    first = outcome(run(run_config(state, tmp_path / "run", paths)))
    run(run_config({**state, "samples": 4}, tmp_path / "run", paths))
    last = outcome(run(run_config(state, tmp_path / "run", paths)))
    assert last["mashup/selection"] == first["mashup/selection"]
    assert last == first


def _add(state, rng):
    name = f"n{rng.randrange(100, 999)}"
    state["donors"][name] = rng.randrange(1000)


def _remove(state, rng):
    if len(state["donors"]) > 3:
        state["donors"].pop(rng.choice(sorted(state["donors"])))


def _replace(state, rng):
    state["donors"][rng.choice(sorted(state["donors"]))] = rng.randrange(1000, 2000)


def _toggle(key, a, b):
    def change(state, rng):
        state[key] = b if state[key] == a else a
    change.__name__ = f"_{key}"
    return change


CHANGES = [_add, _remove, _replace, _toggle("samples", 8, 4), _toggle("seed", 0, 1), _toggle("data", "train_a", "train_b"),
           _toggle("dtype", "float32", "bfloat16"), _toggle("method", "linear", "cat"),
           _toggle("metric", "loss", "token_accuracy"), _toggle("chat", False, True), _toggle("lr", 1e-3, 3e-3),
           _toggle("sweep_seed", 0, 1), _toggle("k", 2, 1), _toggle("weighting", "uniform", "mwa")]


@pytest.mark.slow
def test_a_rerun_after_any_change_equals_a_fresh_run(paths, tmp_path):
    """A seeded random order of every kind of change, applied to one folder; after each, a fresh folder with the
    same config must give the same selection, merge digest and results."""
    assert len(CHANGES) >= 12
    rng = random.Random(2026)
    order = CHANGES[:]
    rng.shuffle(order)
    state = copy.deepcopy(START)
    lay_pool(paths, state["donors"])
    run(run_config(state, tmp_path / "run", paths))
    for i, change in enumerate(order):
        change(state, rng)
        lay_pool(paths, state["donors"])
        rerun = outcome(run(run_config(state, tmp_path / "run", paths)))
        fresh = outcome(run(run_config(state, tmp_path / f"fresh{i}", paths)))
        assert rerun == fresh, f"after change {i} ({change.__name__}): {state}"


def test_a_rerun_that_only_retries_a_broken_donor_leaves_the_scoring_time_alone(paths, tmp_path):
    """A broken donor is retried on every rerun and fails again; that retry adds no row to the results, so the
    scoring seconds behind them (and every wall-clock to parity) stay those of the first run."""
    from safetensors.torch import load_file, save_file

    state = copy.deepcopy(START)
    lay_pool(paths, state["donors"])
    pool: Path = paths["pool"]
    shutil.rmtree(pool / "nan", ignore_errors=True)
    shutil.copytree(pool / "d0", pool / "nan")
    weights = pool / "nan" / "adapter_model.safetensors"
    save_file({k: v * float("nan") for k, v in load_file(weights).items()}, weights)
    write_manifest(pool, sorted(state["donors"]) + ["nan"])
    out = run(run_config(state, tmp_path / "run", paths))
    first = json.loads((out / "timings.json").read_text())["score"]
    assert json.loads((out / "results.json").read_text())["rows"]
    run(run_config(state, tmp_path / "run", paths))
    assert json.loads((out / "timings.json").read_text())["score"] == first
