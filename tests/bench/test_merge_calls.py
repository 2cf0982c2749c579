"""The choose arm's report lines (bench/merge_calls.py), from known picks."""
from bench.merge_calls import render_choices


def _chosen(chosen: str, heldout_best: str, seconds: float) -> dict:
    return {"chosen": chosen, "best": "top1", "gain": 0.25, "candidates": 16, "seconds": seconds,
            "heldout_best": heldout_best, "agrees_with_heldout": chosen == heldout_best}


def test_choices_count_agreement_with_the_heldout_pick_and_average_the_cost():
    data = {"a": {"rows": [{"arm": "scratch"}, {"arm": "choose", "chosen": _chosen("top1", "top1", 3.0)}]},
            "b": {"rows": [{"arm": "choose", "chosen": _chosen("none", "top2-cat-uniform", 5.0)}]}}
    text = "\n".join(render_choices(data))
    assert "the same pick on 1 of 2 targets" in text and "4.0 s per target" in text
    assert "| b | choose | none | top1 (25%) | 16 | 5.0 | top2-cat-uniform |" in text


def test_no_choose_arm_adds_nothing():
    assert render_choices({"a": {"rows": [{"arm": "scratch"}]}}) == []


def test_a_call_that_never_reaches_parity_says_never():
    from bench.merge_calls import render_calls

    call = {"target": "t", "call": "top1", "merge": True, "right": False, "parity_pct": None,
            "baseline_parity_pct": 70.0, "recycled_parity_pct": {"mashup": 80.0, "best-1": None}}
    assert "| t | top1 | never | 70% | mashup 80%, best-1 never | no |" in "\n".join(render_calls([call]))
