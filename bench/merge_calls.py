"""Did choosing the merge pay (issue 23)? Shared by the recycling and the BIG-bench benchmarks.

A choose arm (`engine/merge_choice.py`) picks one candidate merge, or `none` (a fresh LoRA), on the scoring sample.
Two questions judge it after the finetunes: was the call right (a merge called reaches the baseline's final val
metric at an earlier step than the baseline; `none` called, no recycling arm does), and would the held-out rows,
never seen by scoring, have picked the same candidate (a choice biased by its own sample would disagree)?
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.core.atomic import atomic_write_text
from engine.core.identity import key_of


class HeldOut:
    """Held-out metrics of adapters on one base, the base loaded once; results cached in `cache` by content."""

    def __init__(self, base: str, cache: Path, margin: int):
        self.base, self.cache, self.margin = base, cache, margin
        self.data = json.loads(cache.read_text()) if cache.exists() else {}
        self._model = self._tok = None

    def __call__(self, adapter: Path | None, eval_file: Path, generation: bool) -> dict[str, Any]:
        from engine.core.adapter import fingerprint, sha256_file

        key = key_of([fingerprint(adapter) if adapter else "base", sha256_file(eval_file), self.base, self.margin,
                      generation])
        if key not in self.data:
            self.data[key] = self._evaluate(adapter, eval_file, generation)
            atomic_write_text(self.cache, json.dumps(self.data, indent=1))
        return self.data[key]

    def _evaluate(self, adapter: Path | None, eval_file: Path, generation: bool) -> dict[str, Any]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.core.data import load_jsonl
        from engine.evaluate import evaluate, greedy_exact_match

        if self._model is None:
            self._tok = AutoTokenizer.from_pretrained(self.base)
            self._model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32, use_safetensors=True)
        rows = load_jsonl(eval_file)
        model = PeftModel.from_pretrained(self._model, str(adapter)) if adapter else self._model
        try:
            out = evaluate(model, self._tok, rows).summary()
            out["exact_match"] = greedy_exact_match(model, self._tok, rows, margin=self.margin).accuracy if generation else None
        finally:
            if adapter:
                self._model = model.unload()
        return {k: out[k] for k in ("loss", "token_accuracy", "accuracy", "exact_match")}


def chosen_summary(rc, arm, held: "HeldOut", generation: bool) -> dict[str, Any] | None:
    """A choose arm's pick (engine/merge_choice.py): the candidate, its gain over the base, what the choice cost, and
    whether the held-out rows (never seen by scoring) would have picked the same: each candidate and a fresh LoRA
    (the base) evaluated on them, the best by held-out loss. Agreement says the choice on the scoring sample is not
    biased by that sample having also ranked the donors."""
    from engine.merge_choice import candidate_adapter, read_choices

    c = read_choices(rc).get(arm.name)
    if c is None:
        return None
    heldout = {x["name"]: held(candidate_adapter(rc, arm, x["name"]), rc.eval, generation)["loss"]
               for x in c["candidates"]}
    heldout["none"] = held(None, rc.eval, generation)["loss"]
    best_heldout = min(heldout, key=lambda n: (heldout[n], n))
    best = c["candidates"][0] if c["candidates"] else {}
    return {"chosen": c["chosen"], "best": best.get("name"), "gain": best.get("gain"),
            "candidates": len(c["candidates"]), "seconds": c["seconds"], "heldout_loss": heldout,
            "heldout_best": best_heldout, "agrees_with_heldout": best_heldout == c["chosen"]}


CONTROLS = {"strategy": {"random-k", "worst-k"}, "method": {"random-norm"}}  # arms that pick or merge at random


def recycling_arms(arms) -> list[str]:
    """The arms that start from what selection picked (not scratch, not a choose arm, not a random control): the
    merges a 'none' call says are not worth it."""
    from engine.run_config import given

    return [a.name for a in arms if a.init == "merge" and a.choose is None
            and given(a.select).get("strategy") not in CONTROLS["strategy"]
            and given(a.merge).get("method") not in CONTROLS["method"]]


def merge_calls(data: dict[str, dict], baseline: str, recycled: list[str]) -> list[dict[str, Any]]:
    """Was each choose arm's call right (issue 23)? A call of a merge is right when the arm, started from it, reaches
    the baseline's final val metric at an earlier step than the baseline does; a call of `none` (a fresh LoRA) is
    right when no recycling arm (`recycled`) does. The parity step is what recycling is for: a merge that only ends
    level with scratch spent its selection for nothing."""
    out = []
    for t, d in data.items():
        rows = {r["arm"]: r for r in d["rows"]}
        goal = rows[baseline]["parity_pct"]
        earlier = lambda r: r["parity_pct"] is not None and (goal is None or r["parity_pct"] < goal)  # noqa: E731
        for arm, r in rows.items():
            if not r.get("chosen"):
                continue
            merged = r["chosen"]["chosen"] != "none"
            paid = earlier(r) if merged else any(earlier(rows[a]) for a in recycled if a in rows)
            out.append({"target": t, "arm": arm, "call": r["chosen"]["chosen"], "merge": merged,
                        "right": paid if merged else not paid, "parity_pct": r["parity_pct"], "baseline_parity_pct": goal,
                        "recycled_parity_pct": {a: rows[a]["parity_pct"] for a in recycled if a in rows}})
    return out


def render_calls(calls: list[dict[str, Any]]) -> list[str]:
    """How often the merge-or-none call was right, and each target's call against the parity steps that judge it."""
    if not calls:
        return []
    right = sum(c["right"] for c in calls)
    nones = [c for c in calls if not c["merge"]]
    lines = ["", f"**The merge-or-none call was right on {right} of {len(calls)} targets** ({len(nones)} called "
             "none). Right: a merge called reaches scratch's final val metric at an earlier step than scratch; "
             "none called, no recycling arm does.", "", "| target | call | parity of the call | scratch's parity | "
             "recycling arms' parity | right |", "|---|---|---|---|---|---|"]
    for c in calls:
        others = ", ".join(f"{a} {_pct(p)}" for a, p in c["recycled_parity_pct"].items())
        lines.append(f"| {c['target']} | {c['call']} | {_pct(c['parity_pct'])} | {_pct(c['baseline_parity_pct'])} | "
                     f"{others} | {'yes' if c['right'] else 'no'} |")
    return lines


def _pct(x: float | None) -> str:
    return "never" if x is None else f"{x:.0f}%"


def render_choices(data: dict[str, dict]) -> list[str]:
    """Each choose arm's pick, what choosing cost, and whether the held-out rows would have picked the same."""
    picks = [(t, r["arm"], r["chosen"]) for t, d in data.items() for r in d["rows"] if r.get("chosen")]
    if not picks:
        return []
    agree = sum(c["agrees_with_heldout"] for _, _, c in picks)
    seconds = sum(c["seconds"] for _, _, c in picks) / len(picks)
    lines = ["", f"**Choosing on the scoring sample vs on held-out rows: the same pick on {agree} of {len(picks)} "
             f"targets.** Choosing cost {seconds:.1f} s per target on average (building and scoring the candidates).",
             "", "| target | arm | chosen | best candidate (share of base loss removed) | candidates | seconds | "
             "held-out rows would pick |", "|---|---|---|---|---|---|---|"]
    for t, arm, c in picks:
        gain = "—" if c["gain"] is None else f"{100 * c['gain']:.0f}%"
        lines.append(f"| {t} | {arm} | {c['chosen']} | {c['best']} ({gain}) | {c['candidates']} | {c['seconds']:.1f} | "
                     f"{c['heldout_best']} |")
    return lines

