"""Screening (`strategy: screen`): a first-order prediction for every donor, a small exact probe as a safeguard,
then exact scoring of the survivors only.

1. Screen: every actor computes the base's gradient on the sample once and predicts each donor's loss as
   L(base) + Σₘ sₘ⟨Gₘ, BₘAₘ⟩ (actors/screening.py). Rows: `kind = screen`, the prediction in `loss`, cos(−G, ΔW)
   in `alignment`. A donor the gradient cannot see (embedding LoRA, lm_head, modules_to_save, LoRA bias, DoRA)
   gets status `unscreenable` and always goes to exact scoring.
2. Probe (`probe` examples, default 4): every donor is scored exactly on the first examples of the cascade's
   seeded order, rows `"<sample>@<probe>"`, exactly the rows a cascade with that first slice writes.
3. Survivors: the screen's best `keep_fraction` (at least `min_keep`), united with the probe's survivors (its
   best `probe_keep_fraction`, at least `min_keep`, plus every donor within `z` standard errors of that cut-off),
   plus every unscreenable or screen-failed donor. So a donor the screen misjudges survives on its exact loss.
4. `then`: `exhaustive` scores the survivors (and the base) on the whole sample; `cascade` runs the cascade on the
   survivors; `none` stops (only the unscreenable donors and the base are scored exactly: selection never ranks
   screen rows, engine.scoring.store.exact_rows).

`<out>/screen.json` records each stage, who survived and why, and the donors where the two signals disagree
(rank percentiles further apart than `disagreement`). Every stage resumes from the store like scoring does.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from engine.core.config import StrictModel
from engine.core.scores import BASE_ROW as BASE, EXACT, SCREEN, set_fields
from engine.scoring.pool import ActorPoolRunner

log = logging.getLogger("mashup.score")
SUMMARY = "screen.json"


class ScreenConfig(StrictModel):
    """The `screen:` section of a score config; used only with `strategy: screen`."""

    keep_fraction: float = Field(0.1, gt=0, le=1, description="share of donors the screen's ranking keeps")
    min_keep: int = Field(8, ge=1, description="each signal keeps at least this many donors; set it ≥ k")
    probe: int = Field(4, ge=0, description="examples every donor is scored on exactly (0: the screen alone gates)")
    probe_keep_fraction: float = Field(0.1, gt=0, le=1, description="share of donors the probe's ranking keeps")
    z: float = Field(2.0, ge=0, description="the probe also keeps donors within z standard errors of its cut-off")
    then: Literal["exhaustive", "cascade", "none"] = Field("exhaustive", description="how survivors are scored")
    disagreement: float = Field(0.5, gt=0, le=1, description="record donors whose two rank percentiles differ more")


class StageRunner(ActorPoolRunner):
    """The scoring pool with actors that can also screen; rows carry the stage's kind (failures included)."""

    kind = EXACT

    def __init__(self, *args: Any, **kwargs: Any):
        from actors.screening import ScreeningScorer

        super().__init__(*args, **kwargs)
        self.actor_cls = ScreeningScorer

    def stage(self, method: str, sample, round_: int = 0) -> "StageRunner":
        self.method, self.sample, self.round = method, sample, round_
        self.kind = SCREEN if method == "screen" else EXACT
        return self

    def _rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in super()._rows(rows):
            set_fields(row, kind=self.kind)
        return rows

    def _record(self, rows: list[dict[str, Any]], summary, bar) -> None:
        if self.kind == SCREEN:  # a screen row is not a score: keep the summary's counts for exact rows
            self.base_pending = False
            self._log_placement(rows)
            self.store.append(rows)
            self.last_progress = time.monotonic()
            bar.update(len(rows))
            return
        super()._record(rows, summary, bar)


def _rank_pct(order: list[str]) -> dict[str, float]:
    n = max(len(order) - 1, 1)
    return {d: i / n for i, d in enumerate(order)}


def screen_rows(store, sample_id: str):
    df = store.read()
    return df[(df.kind == SCREEN) & (df.sample_id == sample_id) & (df.donor != BASE)]


def survivors(screen: dict[str, float], probe: dict[str, Any], others: list[str], sc: ScreenConfig):
    """(survivors, kept by the screen, kept by the probe): the union, so that either signal alone saves a donor."""
    from engine.scoring.cascade import CascadeConfig, prune

    ranked = sorted(screen, key=lambda d: (screen[d], d))
    by_screen = ranked[:max(sc.min_keep, math.ceil(sc.keep_fraction * len(ranked)))]
    by_probe: list[str] = []
    if probe:
        cut = CascadeConfig(keep_fraction=sc.probe_keep_fraction, z=sc.z, min_survivors=sc.min_keep)
        by_probe, _ = prune(probe, cut)
    keep = list(dict.fromkeys([*by_screen, *by_probe, *others]))
    return keep, by_screen, by_probe


def run_screen(cfg, opts, sample, catalog, store, summary) -> None:
    """Screen `catalog`, probe it, score the survivors; rows go to `store`, the record to `<out>/screen.json`."""
    from engine.core.atomic import atomic_write_text
    from engine.scoring.cascade import cascade_order, ok_stats, prefix_id, run_cascade
    from engine.scoring.catalog import stale_donors
    from engine.core.data import EncodedSample

    sc: ScreenConfig = cfg.screen
    entries = {e.donor: e for e in catalog}
    ids = {e.donor: i + 1 for i, e in enumerate(catalog)}
    total = len(sample.examples)
    record: dict[str, Any] = {"sample_id": sample.fingerprint, "seed": cfg.seed, "examples": total, "donors": len(entries),
                              "tokens": sum(len(e.input_ids) for e in sample.examples),
                              "config": sc.model_dump(), "stages": [], "finished": False}
    runner = StageRunner(cfg, opts.model_dump(), sample, store)

    def stage(name: str, method: str, sample_, todo: list[str], with_base: bool, examples: int) -> None:
        t0 = time.perf_counter()
        if todo or with_base:
            runner.stage(method, sample_).run([entries[d] for d in todo], with_base, summary, ids=ids, keep_actors=True)
        if method == "score":
            summary.donor_examples += len(todo) * examples
        record["stages"].append({"stage": name, "donors": len(todo), "examples": examples,
                                 "donor_examples": len(todo) * examples, "base": with_base,
                                 "seconds": round(time.perf_counter() - t0, 3)})
        atomic_write_text(Path(cfg.out) / SUMMARY, json.dumps(record, indent=2) + "\n")

    try:
        # 1. The screen: a donor's screen row is reused while its files are unchanged (any status but failed).
        rows = screen_rows(store, sample.fingerprint)
        stale = stale_donors(catalog, rows.assign(status="ok"), sample.fingerprint)
        have = set(rows.loc[rows.status != "failed", "donor"]) - stale
        todo = [d for d in entries if d not in have]
        summary.skipped_done += len(entries) - len(todo)
        log.info("screen: %d donors (%d already screened for sample %s)", len(entries), len(entries) - len(todo),
                 sample.fingerprint)
        stage("screen", "screen", sample, todo, False, 0)
        rows = screen_rows(store, sample.fingerprint)
        ok = rows[rows.status == "ok"]
        predicted = dict(zip(ok.donor, ok.loss))
        aligned = dict(zip(ok.donor, ok.alignment))
        unseen = {r["donor"]: r["error"] for r in rows[rows.status != "ok"].to_dict("records")}
        unseen.update({d: "no screen row" for d in entries if d not in predicted and d not in unseen})
        # 2. The probe: a few examples, exactly, for every donor.
        probe_stats: dict[str, Any] = {}
        if sc.probe:
            n = min(sc.probe, total)
            ordered = cascade_order(sample, cfg.seed)
            sid = prefix_id(sample.fingerprint, n, total, cfg.seed)
            probe_sample = EncodedSample(ordered.examples[:n], sid, sample.base_fingerprint)
            done = store.completed(sid) - stale_donors(catalog, store.read(), sid)  # one read, not one per donor
            todo = [d for d in entries if d not in done]
            summary.skipped_done += len(entries) - len(todo)
            stage("probe", "score", probe_sample, todo, False, n)
            probe_stats = ok_stats(store, sid, 0, entries)
        keep, by_screen, by_probe = survivors(predicted, probe_stats, list(unseen), sc)
        record.update(_agreement(predicted, aligned, probe_stats, by_screen, by_probe, unseen, sc))
        record["survivors"] = keep
        # 3. Exact scoring of the survivors.
        if sc.then == "cascade":
            runner.close()
            stage_t0 = time.perf_counter()
            run_cascade(cfg, opts, sample, [entries[d] for d in keep], store, summary)
            record["stages"].append({"stage": "cascade", "donors": len(keep), "rounds": summary.rounds,
                                     "seconds": round(time.perf_counter() - stage_t0, 3)})
        else:
            final = keep if sc.then == "exhaustive" else [d for d in keep if d in unseen]
            stale = stale_donors(catalog, store.read(), sample.fingerprint)
            done = store.completed(sample.fingerprint) - stale
            stage("exact", "score", sample, [d for d in final if d not in done], BASE not in done, total)
        record["finished"] = True
        atomic_write_text(Path(cfg.out) / SUMMARY, json.dumps(record, indent=2) + "\n")
    finally:
        runner.close()


def _agreement(predicted: dict[str, float], aligned: dict[str, float], probe: dict[str, Any], by_screen: list[str],
               by_probe: list[str], unseen: dict[str, str], sc: ScreenConfig) -> dict[str, Any]:
    """Who each signal kept, who only the probe saved, and where the screen and the probe disagree strongly."""
    screen_pct = _rank_pct(sorted(predicted, key=lambda d: (predicted[d], d)))
    probe_pct = _rank_pct(sorted(probe, key=lambda d: (probe[d].loss, d)))
    disagree = []
    for d in sorted(set(screen_pct) & set(probe_pct)):
        gap = screen_pct[d] - probe_pct[d]
        if abs(gap) > sc.disagreement:
            disagree.append({"donor": d, "screen_loss": predicted[d], "probe_loss": probe[d].loss,
                             "screen_rank_pct": round(screen_pct[d], 3), "probe_rank_pct": round(probe_pct[d], 3),
                             "alignment": aligned.get(d)})
    if disagree:
        log.warning("screen and probe disagree strongly on %d donors (rank percentiles > %.2f apart): %s",
                    len(disagree), sc.disagreement, ", ".join(x["donor"] for x in disagree[:10]))
    return {"kept_by_screen": by_screen, "kept_by_probe": by_probe,
            "rescued_by_probe": [d for d in by_probe if d not in set(by_screen)],
            "unscreenable": unseen, "disagreements": disagree}
