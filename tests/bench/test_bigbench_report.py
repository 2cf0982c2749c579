"""The BIG-bench benchmark's arithmetic on known inputs: parity, the averaged table, break-even, and which earlier
targets a partial run carries over (bench/bigbench_report.py)."""
import json

import pandas as pd
import pytest

from bench.bigbench_report import average, break_even, carried_targets, parity, render


def _row(arm, parity_pct, seconds, precision=None):
    nan = {"loss": None, "token_accuracy": None, "accuracy": None, "exact_match": None}
    return {"arm": arm, "lr": 1e-3, "metric": "token_accuracy", "steps": 24, "val_step0": {"token_accuracy": 0.1},
            "val_final": {"token_accuracy": 0.8}, "heldout_step0": {**nan, "exact_match": 0.0},
            "heldout_final": {**nan, "exact_match": 0.5}, "parity_step": None if parity_pct is None else 6,
            "parity_pct": parity_pct, "seconds_to_parity": seconds, "picks": [], "precision": precision,
            "group_share": precision, "overhead_seconds": 0.0}


def _target(scratch_s, mashup_pct, mashup_s, key="k"):
    return {"family": "f", "generation": True, "choices": False, "metric": "token_accuracy", "goal": 0.8,
            "rows": [_row("scratch", 100.0, scratch_s), _row("mashup", mashup_pct, mashup_s, 1.0)], "refused": [],
            "pool": 10, "score_seconds": 20.0, "fast_score_seconds": 5.0, "step_seconds": 2.0, "key": key,
            "date": "2026-12-03", "machine": "m"}


def test_parity_is_the_first_eval_at_or_over_the_goal():
    curve = pd.DataFrame({"token_accuracy": [0.1, 0.5, 0.8, 0.7, 0.9]}, index=[0, 6, 12, 18, 24])
    assert parity(curve, "token_accuracy", 0.8) == 12
    assert parity(curve, "token_accuracy", 0.95) is None


def test_average_takes_the_per_target_wallclock_ratio_and_counts_parity():
    data = {"a": _target(100.0, 50.0, 40.0), "b": _target(100.0, None, None)}
    mashup = next(r for r in average(data, "scratch") if r["arm"] == "mashup")
    assert mashup["wallclock_to_parity_vs_baseline"] == pytest.approx(0.4)  # only target a reached parity
    assert mashup["parity_reached"] == 1 and mashup["parity_pct_mean"] == pytest.approx(50.0)
    assert mashup["heldout_final_exact_match"] == pytest.approx(0.5)


def test_break_even_is_selection_seconds_over_the_seconds_saved_per_step():
    (pool10, *_), = [[b for b in break_even({"a": _target(100.0, 50.0, 40.0)}, "scratch", "mashup", None)
                      if b["selection"] == "exhaustive"]]
    # 20 s for 10 donors; half the budget saved at 2 s/step: recycling pays from 20 / (0.5 * 2) = 20 steps
    assert pool10["pool"] == 10 and pool10["selection_seconds"] == pytest.approx(20.0)
    assert pool10["break_even_steps"] == pytest.approx(20.0)


def test_only_targets_of_the_same_key_and_world_are_carried(tmp_path):
    results = tmp_path / "bigbench.json"
    results.write_text(json.dumps({"targets": {"a": _target(1, 50, 1, key="k"), "b": _target(1, 50, 1, key="other"),
                                               "c": _target(1, 50, 1, key="k"), "gone": _target(1, 50, 1, key="k")}}))
    assert set(carried_targets(results, "k", ["a", "b", "c"], measured={"c"})) == {"a"}
    assert carried_targets(tmp_path / "none.json", "k", ["a"], set()) == {}


def test_a_partial_run_says_so_above_its_table():
    summary = {"date": "2026-12-03", "machine": "m", "command": "cmd", "config": {"sweep": {"seeds": [0], "lrs": [1e-3]},
               "finetune": {"steps": 24}}, "world_targets": ["a", "b", "c"], "missing_targets": ["b", "c"],
               "targets": {"a": _target(100.0, 50.0, 40.0)}}
    summary["average"] = average(summary["targets"], "scratch")
    summary["break_even"] = break_even(summary["targets"], "scratch", "mashup", None)
    text = render(summary)
    assert text.startswith("**Partial: 1 of 3 targets measured**; not yet: b, c.")
    assert "| mashup |" in text and "50% (1/1)" in text


def _runs(tmp_path, finals: dict[float, dict[int, float]]):
    """A run folder per (LR, seed) whose eval curve ends at the given token accuracy, and the run config's view."""
    from types import SimpleNamespace

    for lr, seeds in finals.items():
        for seed, final in seeds.items():
            folder = tmp_path / f"lr{lr}_seed{seed}"
            folder.mkdir()
            pd.DataFrame({"event": ["eval", "eval"], "step": [0, 6], "loss": [1.0, 0.5], "token_accuracy": [0.0, final],
                          "accuracy": [None, None], "seconds": [0.0, 3.0]}).to_parquet(folder / "log.parquet")
    return SimpleNamespace(sweep=SimpleNamespace(seeds=[0, 1, 2]), lrs=lambda: list(finals),
                           run_dir=lambda arm, lr, seed: tmp_path / f"lr{lr}_seed{seed}")


def test_lr_is_chosen_on_the_first_seeds_and_its_curve_averages_every_seed(tmp_path):
    from bench.bigbench_report import best_lr

    # 3e-3 wins on seed 0 (0.6 > 0.5); 1e-3's later seeds would tip a mean over all seeds (0.83), and must not
    rc = _runs(tmp_path, {1e-3: {0: 0.5, 1: 1.0, 2: 1.0}, 3e-3: {0: 0.6, 1: 0.3, 2: 0.0}})
    assert best_lr(rc, "arm", "token_accuracy", lr_seeds=1, chosen_only=True) == 3e-3
    lr, curve = best_lr(rc, "arm", "token_accuracy", lr_seeds=1)
    assert lr == 3e-3 and curve["token_accuracy"].iloc[-1] == pytest.approx(0.3)  # (0.6 + 0.3 + 0.0) / 3
    assert best_lr(rc, "arm", "token_accuracy")[0] == 1e-3  # every seed at every LR: the plain seed mean


def _choose_target(call: str, choose_pct, mashup_pct, scratch_pct=75.0):
    d = _target(100.0, mashup_pct, 40.0)
    d["rows"][0]["parity_pct"] = scratch_pct
    choose = _row("choose", choose_pct, 50.0)
    choose["chosen"] = {"chosen": call}
    d["rows"] += [_row("random-2", 25.0, 10.0), choose]
    return d


def test_the_merge_or_none_call_is_judged_by_the_parity_it_buys():
    from bench.merge_calls import merge_calls, recycling_arms, render_calls
    from engine.run_config import ArmSpec

    arms = [ArmSpec.model_validate(a) for a in ({"name": "scratch", "init": "none"}, {"name": "mashup"},
                                                {"name": "random-2", "select": {"strategy": "random-k", "seed": 0}},
                                                {"name": "random-norm", "merge": {"method": "random-norm"}},
                                                {"name": "choose", "choose": {}})]
    assert recycling_arms(arms) == ["mashup"], "controls, scratch and the choose arm are not recycling arms"
    data = {"merge-paid": _choose_target("top2-cat-uniform", 50.0, 75.0),  # earlier than scratch's 75%
            "merge-level": _choose_target("top1", 75.0, 50.0),              # level with scratch: spent for nothing
            "none-right": _choose_target("none", 75.0, 75.0),               # no recycling arm earlier (random-2 is a control)
            "none-wrong": _choose_target("none", 75.0, 25.0)}               # mashup was earlier
    got = {c["target"]: c["right"] for c in merge_calls(data, "scratch", ["mashup"])}
    assert got == {"merge-paid": True, "merge-level": False, "none-right": True, "none-wrong": False}
    text = "\n".join(render_calls(merge_calls(data, "scratch", ["mashup"])))
    assert "**The merge-or-none call was right on 2 of 4 targets** (2 called none)" in text
    assert "| none-wrong | none | 75% | 75% | mashup 25% | no |" in text


def test_saved_results_get_their_merge_calls_without_their_run_folders(tmp_path):
    """`--render-only`: the committed results (measured before the call was judged, their runs gone) get the
    merge-or-none table from their own rows: on both measured targets the choose arm reached parity before scratch."""
    from pathlib import Path

    from bench.bigbench_report import rerender

    saved = json.loads((Path(__file__).parents[2] / "bench" / "results" / "bigbench.json").read_text())
    saved.pop("merge_calls", None)
    results = tmp_path / "bigbench.json"
    results.write_text(json.dumps(saved))
    rerender(results, readme=False)
    calls = json.loads(results.read_text())["merge_calls"]
    assert [(c["arm"], c["merge"]) for c in calls] == [("choose", True)] * len(saved["targets"])
    assert "**The merge-or-none call was right on" in (tmp_path / "bigbench.md").read_text()
