"""Choosing the merge, not only the donors: candidate merges of an arm's top donors, each scored exactly on the
run's sample like one more donor, and the best kept; a fresh LoRA when no candidate beats the base by enough.

Ranking donors one at a time says nothing about their merge: two good donors trained from independent seeds can
average into something worse than either. A candidate costs one forward over the sample (the pool cost N), so the
arm looks before it finetunes. Candidates are `top<k>` for k = 1 (the best donor alone) and `top<k>-<method>-
<weighting>` for larger k; each is a selection (engine.selection) merged by the streaming merge (engine.merge), into
`<arm>/candidates/adapters/<name>/`, and scored by the run's own backend into a store of their own,
`<arm>/candidates/score/`, on the run's sample: a candidate's row is keyed by its content like any donor's, so a
rerun rescores only what changed, and the donors' store never holds a merge. `choice.json` records every candidate
with its loss, the base's loss, the pick and why; the arm's finetune starts from it (RunConfig.init_adapter).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.core.atomic import atomic_write_text
from engine.core.errors import DataError
from engine.run_config import CHOICE_FILE, ArmSpec, ChooseSettings, RunConfig

log = logging.getLogger("mashup.choose")
CANDIDATES = "candidates"
NONE = "none"  # the candidate that merges nothing: a fresh LoRA


@dataclass(frozen=True)
class Candidate:
    name: str
    k: int
    method: str
    weighting: str


def candidate_plan(settings: ChooseSettings, ranked: int) -> list[Candidate]:
    """Every candidate the settings name that the pool can fill (k no larger than the donors ranked); k = 1 is one
    candidate, since one donor merged by any method with any weighting is that donor."""
    plan = []
    for k in sorted(set(settings.ks)):
        if k > ranked:
            log.warning("choose: k=%d but only %d donors are ranked; no such candidate", k, ranked)
            continue
        if k == 1:
            plan.append(Candidate("top1", 1, "linear", "uniform"))
            continue
        plan += [Candidate(f"top{k}-{m}-{w}", k, m, w) for m in settings.methods for w in settings.weightings]
    return plan


def candidate_adapter(cfg: RunConfig, arm: ArmSpec, name: str) -> Path:
    """Where a candidate's merged adapter lives: the one place that names the layout (the benchmark reads it too)."""
    return cfg.arm_dir(arm) / CANDIDATES / "adapters" / name


def candidate_selection(cfg: RunConfig, arm: ArmSpec, name: str) -> Path:
    return cfg.arm_dir(arm) / CANDIDATES / "selections" / f"{name}.json"


def build_candidates(cfg: RunConfig, arm: ArmSpec, scope: dict[str, Any]) -> tuple[list[Candidate], dict, int]:
    """Select and merge every candidate (a merge whose selection is unchanged by content is kept); returns the plan,
    each candidate's Selection and how many merges were redone. Candidates the plan no longer names are removed."""
    from engine.merge.streaming import merge_is_current, merge_with_config
    from engine.selection import select_with_config

    base_select = cfg.select_config(arm).model_copy(update={**scope, "out": None})
    ranked = select_with_config(base_select.model_copy(update={"k": max(arm.choose.ks)})).k
    plan = candidate_plan(arm.choose, ranked)
    selections, redone = {}, 0
    for c in plan:
        path = candidate_selection(cfg, arm, c.name)
        selections[c.name] = select_with_config(base_select.model_copy(update={"k": c.k, "weighting": c.weighting,
                                                                                "out": path}))
        merge_cfg = cfg.merge_config(arm).model_copy(update={"selection": path, "method": c.method,
                                                             "out": candidate_adapter(cfg, arm, c.name)})
        if not merge_is_current(merge_cfg):
            merge_with_config(merge_cfg)
            redone += 1
    keep = {candidate_adapter(cfg, arm, c.name) for c in plan} | {candidate_selection(cfg, arm, c.name) for c in plan}
    for folder in (candidate_adapter(cfg, arm, "x").parent, candidate_selection(cfg, arm, "x").parent):
        for stale in (p for p in folder.iterdir() if p not in keep) if folder.exists() else ():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return plan, selections, redone


def score_candidates(cfg: RunConfig, arm: ArmSpec, plan: list[Candidate], sample_id: str):
    """Score every candidate exactly, with the run's backend, on the run's sample, into the candidates' own store."""
    from engine.scoring import score

    score_cfg = cfg.score_config().model_copy(update={
        "donors": [str(candidate_adapter(cfg, arm, c.name)) for c in plan], "out": cfg.arm_dir(arm) / CANDIDATES / "score",
        "strategy": "exhaustive"})
    summary = score(score_cfg)
    if summary.sample_id != sample_id:  # the same data, samples, seed, base and encoding must give the same sample
        raise DataError(f"arms.{arm.name}: the candidates were scored on sample {summary.sample_id}, the donors on "
                        f"{sample_id}; they must share one sample")
    return summary


def paired_z(store: Path, sample_id: str, names: list[str]) -> dict[str, float | None]:
    """Each candidate's gain over the base in paired standard errors of the loss difference on the sample's own
    examples (engine.scoring.cascade.paired_stderr): how surely the sample says the candidate beats the base at all,
    beside `gain`, which says by how much. None where either row lacks per-example losses."""
    from engine.core.scores import BASE_ROW, read_scores
    from engine.scoring.cascade import RoundStats, paired_stderr

    rows = read_scores(store)
    rows = rows[(rows["sample_id"] == sample_id) & (rows["status"] == "ok") & (rows["kind"] == "exact")]
    stats = {r["donor"]: RoundStats.from_row(r) for r in rows.to_dict("records")}
    base, out = stats.get(BASE_ROW), {}
    for name in names:
        se = paired_stderr(stats[name], base) if base is not None and name in stats else math.inf
        out[name] = None if not math.isfinite(se) or se == 0 else (base.loss - stats[name].loss) / se
    return out


def decide(ranked: list[dict[str, Any]], settings: ChooseSettings) -> tuple[str, str]:
    """(chosen name, why). `ranked` is best first by the select metric, each with its `gain` (the share of the
    base's sample loss it removes, None without a base loss) and `z` (its gain in paired standard errors, None
    when the rows lack per-example losses). The best is kept unless it removes less than `min_gain` of the base's
    loss or its z is under `min_z`: then the arm starts from a fresh LoRA (`none`). A large share can still be
    noise on a small sample, and a tiny one can be sure but not worth a merge: each check catches what the other
    cannot."""
    if not ranked:
        if settings.allow_none:
            return NONE, "no candidate merge scored ok"
        raise DataError("choose: no candidate merge scored ok and allow_none is false")
    best, gain, z = ranked[0], ranked[0]["gain"], ranked[0].get("z")
    if gain is None:
        return best["name"], "best candidate by the select metric (no base loss to compare with)"
    removes = f"removes {100 * gain:.1f}% of the base's sample loss"
    sure = "" if z is None else f" ({z:.1f} paired SEs)"
    if settings.allow_none and gain < settings.min_gain:
        return NONE, (f"the best candidate {best['name']} {removes}{sure}, less than min_gain "
                      f"{100 * settings.min_gain:.0f}%: a fresh LoRA")
    if settings.allow_none and z is not None and z < settings.min_z:
        return NONE, (f"the best candidate {best['name']} {removes}, but only {z:.1f} paired SEs over the base, "
                      f"less than min_z {settings.min_z:g}: the sample cannot tell it from noise, a fresh LoRA")
    return best["name"], f"best candidate by the select metric; {removes}{sure}"


def choose_merge(cfg: RunConfig, arm: ArmSpec, scope: dict[str, Any]) -> bool:
    """Build, score and choose an arm's merge; writes choice.json (and the chosen selection.json). Returns whether
    anything was recomputed (so the arm's select+merge seconds are the cost of what it holds now)."""
    from engine.selection import SelectConfig, select_with_config

    t0 = time.perf_counter()
    plan, selections, redone = build_candidates(cfg, arm, scope)
    summary = score_candidates(cfg, arm, plan, scope["sample"])
    metric = cfg.select_config(arm).metric
    scored = select_with_config(SelectConfig(scores=summary.out, sample=summary.sample_id, pool=summary.pool,
                                             strategy="all", metric=metric))
    by_name = {c.name: c for c in plan}
    zs = paired_z(summary.out, summary.sample_id, [d.donor for d in scored.donors])
    rows = []
    for rank, d in enumerate(scored.donors):
        sel = selections[d.donor]
        gain = None if not scored.base_loss else (scored.base_loss - d.loss) / scored.base_loss
        rows.append({**asdict(by_name[d.donor]), "rank": rank + 1, "loss": d.loss, "token_accuracy": d.token_accuracy,
                     "gain": gain, "z": zs.get(d.donor), "fingerprint": d.fingerprint, "donors": [x.donor for x in sel.donors],
                     "weights": [x.weight for x in sel.donors]})
    failed = sorted(set(by_name) - {r["name"] for r in rows})
    chosen, why = decide(rows, arm.choose)
    init = None if chosen == NONE else str(candidate_adapter(cfg, arm, chosen))
    arm_selection = cfg.arm_dir(arm) / "selection.json"
    if chosen == NONE:
        arm_selection.unlink(missing_ok=True)  # no donors are merged into this arm's init
    else:
        selections[chosen].write(arm_selection)
    record = {"arm": arm.name, "metric": metric, "sample_id": summary.sample_id, "pool": summary.pool,
              "base_loss": scored.base_loss, "min_gain": arm.choose.min_gain, "min_z": arm.choose.min_z, "allow_none": arm.choose.allow_none,
              "chosen": chosen, "why": why, "init": init, "candidates": rows, "failed": failed,
              "forward_passes": len(plan), "scored_now": summary.scored, "merged_now": redone,
              "seconds": time.perf_counter() - t0}
    choice = cfg.arm_dir(arm) / CHOICE_FILE
    if choice.exists() and not (redone or summary.scored):  # nothing recomputed: keep what the choice cost then
        record["seconds"] = json.loads(choice.read_text()).get("seconds", record["seconds"])
    atomic_write_text(choice, json.dumps(record, indent=1) + "\n")
    log.info("arm %s: %d candidates scored; chose %s (%s)", arm.name, len(rows), chosen, why)
    return bool(redone or summary.scored)


def read_choices(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """choice.json of every choose arm, for the report."""
    out = {}
    for arm in cfg.arms:
        path = cfg.arm_dir(arm) / CHOICE_FILE
        if arm.choose is not None and path.exists():
            out[arm.name] = json.loads(path.read_text())
    return out


def render_choices(choices: dict[str, dict[str, Any]]) -> list[str]:
    """The report's section: per choose arm, every candidate with its sample loss and gain over the base."""
    lines: list[str] = []
    for arm, c in choices.items():
        lines += [f"### Merge chosen for `{arm}`: {c['chosen']}", "",
                  f"{c['why']}. {c['forward_passes']} candidates, one forward over the sample each, "
                  f"{c['seconds']:.1f} s with their merges; base loss {c['base_loss']:.4g}.", "",
                  "| candidate | donors | loss | token accuracy | share of base loss removed | paired SEs over the base | |",
                  "|---|---|---|---|---|---|---|"]
        for r in c["candidates"]:
            acc = "—" if r["token_accuracy"] is None else f"{r['token_accuracy']:.4g}"
            gain = "—" if r["gain"] is None else f"{100 * r['gain']:.1f}%"
            z = "—" if r.get("z") is None else f"{r['z']:.1f}"
            mark = "chosen" if r["name"] == c["chosen"] else ""
            lines.append(f"| {r['name']} | {', '.join(r['donors'])} | {r['loss']:.4g} | {acc} | {gain} | {z} | {mark} |")
        lines += [f"| none (fresh LoRA) | — | {c['base_loss']:.4g} | — | 0% | — | {'chosen' if c['chosen'] == NONE else ''} |", ""]
        if c["failed"]:
            lines += [f"Failed to score: {', '.join(c['failed'])}.", ""]
    return lines
