"""`mashup run`: score → select → merge → finetune every arm (× LRs × seeds) → evaluate → report, in one folder.

Each stage's outputs are kept, so rerunning the same config resumes: scoring skips donors already scored,
a merge whose selection is unchanged is not redone, a finetune run with a finished log is not retrained.
The best LR of each arm is chosen on the validation split (as the paper does), then its seeds are compared.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from engine.core.atomic import atomic_write_text
from engine.run_config import Arms, ArmSpec, RunConfig, RunPlan, SweepSpec, run_name

__all__ = ["Arms", "ArmSpec", "RunConfig", "RunPlan", "SweepSpec", "Timings", "finetune_one", "finished_run", "pending_runs",
           "prepare", "run", "run_name", "stage_names"]

log = logging.getLogger("mashup.run")
SCOPE_FILE = "scope.json"  # the sample and pool this run scored: what its selections and report read


class Timings:
    """Seconds per stage of the work that produced the run's current results (timings.json: stage → seconds), so
    a resumed or rerun run reports what its results cost, not what every attempt spent. A cached stage records
    nothing; a redone stage replaces its entry (`set`). Scoring is kept per sample (timings_keys.json: stage → {key:
    seconds}): scoring resumed on the same sample adds the resumed part, and a run that goes back to a sample it
    scored before reports what that sample cost (`use`)."""

    def __init__(self, path: Path):
        self.path, self.keys_path = path, path.with_name("timings_keys.json")
        self.data: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        keys = json.loads(self.keys_path.read_text()) if self.keys_path.exists() else {}
        self.keys: dict[str, dict[str, float]] = {k: v for k, v in keys.items() if isinstance(v, dict)}

    def set(self, stage: str, seconds: float) -> None:
        """The stage was redone from scratch: its seconds are the whole cost of what it holds now."""
        self.data[stage] = seconds
        self.keys.pop(stage, None)
        self._write()

    def add(self, stage: str, seconds: float, key: str) -> None:
        """More work towards the result `key` names (e.g. scoring resumed on the same sample): added to what was
        recorded for that key, which becomes the stage's entry."""
        per = self.keys.setdefault(stage, {})
        per[key] = per.get(key, 0.0) + seconds
        self.data[stage] = per[key]
        self._write()

    def use(self, stage: str, key: str) -> None:
        """The stage's result `key` was reused whole (nothing recomputed): report what it cost when it was made."""
        recorded = self.keys.get(stage, {}).get(key)
        if recorded is not None and self.data.get(stage) != recorded:
            self.data[stage] = recorded
            self._write()

    def keep(self, stages: set[str]) -> None:
        """Drop the entries of stages the run no longer has (an arm, LR or seed removed): not the current results'."""
        if set(self.data) - stages:
            self.data = {k: v for k, v in self.data.items() if k in stages}
            self.keys = {k: v for k, v in self.keys.items() if k in stages}
            self._write()

    def _write(self) -> None:
        atomic_write_text(self.keys_path, json.dumps(self.keys, indent=1))
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def finished_run(ft) -> bool:
    """A run is done when its log and adapter exist and it was trained from what its config names now: the same
    init adapter (by content), base, data and options (FinetuneConfig.identity). Anything else is retrained."""
    from engine.finetune.outputs import INFO_FILE

    run_dir = Path(ft.out)
    info = run_dir / "adapter" / INFO_FILE
    if not ((run_dir / "log.parquet").exists() and (run_dir / "adapter" / "adapter_model.safetensors").exists()
            and info.exists()):
        return False
    recorded = json.loads(info.read_text())
    current = ft.identity()
    if any(recorded.get(k) != v for k, v in current.items()):
        log.info("finetune run %s was trained from another init, base, data or config; retraining it", run_dir)
        return False
    return True


def prepare(cfg: RunConfig) -> Timings:
    """Validate, score the pool once, then select and merge per arm: everything the finetune runs start from."""
    from engine.merge.streaming import merge_is_current, merge_with_config
    from engine.merge_choice import choose_merge
    from engine.scoring import score
    from engine.selection import select_with_config

    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out / "config.json", cfg.model_dump_json(indent=1))
    timings = Timings(cfg.out / "timings.json")
    scope_file = cfg.out / SCOPE_FILE
    scope: dict[str, str | None] = {}
    if any(a.init == "merge" for a in cfg.arms):
        t0 = time.perf_counter()
        summary = score(cfg.score_config())
        # New rows: work towards this sample's scores. Donors that only failed again (a broken file is retried on
        # every rerun) add nothing to the results, so their retry is not added to what the results cost.
        if summary.scored or (summary.failed and not summary.skipped_done):
            timings.add("score", time.perf_counter() - t0, summary.sample_id)
        else:
            timings.use("score", summary.sample_id)
        log.info("scoring: %d scored, %d failed, %d already done", summary.scored, summary.failed, summary.skipped_done)
        # Every arm ranks this call's pool on this call's sample, never other rows the folder holds.
        scope = {"sample": summary.sample_id, "pool": summary.pool}
        atomic_write_text(scope_file, json.dumps(scope, indent=1) + "\n")
    else:
        scope_file.unlink(missing_ok=True)
    for arm in cfg.arms:
        if arm.init != "merge":
            continue
        if arm.choose is not None:
            t0 = time.perf_counter()
            if choose_merge(cfg, arm, scope):
                timings.set(cfg.merge_timing_key(arm.name, None), time.perf_counter() - t0)
            continue
        for seed in cfg.draw_seeds(arm):
            t0 = time.perf_counter()
            select_with_config(cfg.select_config(arm, seed).model_copy(update=scope))
            merge_cfg = cfg.merge_config(arm, seed)
            if not merge_is_current(merge_cfg):
                merge_with_config(merge_cfg)
                timings.set(cfg.merge_timing_key(arm.name, seed), time.perf_counter() - t0)
    return timings


def stage_names(cfg: RunConfig) -> set[str]:
    """Every timings.json entry the run's current results can have."""
    names = {f"finetune:{arm.name}/{run_name(lr, seed)}" for arm in cfg.arms for lr in cfg.lrs() for seed in cfg.sweep.seeds}
    names |= {f"checkpoint_merge:{arm.name}/{run_name(lr, seed)}" for arm in cfg.arms if arm.checkpoint_merge
              for lr in cfg.lrs() for seed in cfg.sweep.seeds}
    merged = [arm for arm in cfg.arms if arm.init == "merge"]
    names |= {cfg.merge_timing_key(arm.name, seed) for arm in merged for seed in cfg.draw_seeds(arm)}
    return names | ({"score"} if merged else set())


def pending_runs(cfg: RunConfig) -> list[tuple[ArmSpec, float | None, int]]:
    """(arm, lr, seed) of every finetune run without a finished log: what a resumed run still has to train."""
    todo = []
    for arm in cfg.arms:
        for lr in cfg.lrs():
            for seed in cfg.sweep.seeds:
                if not finished_run(cfg.finetune_config(arm, lr, seed)):
                    todo.append((arm, lr, seed))
    return todo


def finetune_one(cfg: RunConfig, arm: ArmSpec, lr: float | None, seed: int):
    """One arm × LR × seed: an unfinished attempt of this same run (a matching resumable state) goes on from its
    last state; anything else in the folder is discarded and the run starts from a clean one."""
    from engine.finetune import finetune
    from engine.finetune.resume import has_state

    ft = cfg.finetune_config(arm, lr, seed)
    if not has_state(ft):
        shutil.rmtree(ft.out, ignore_errors=True)
    log.info("finetune %s %s", arm.name, run_name(lr, seed))
    return finetune(ft)


def run(cfg: RunConfig) -> Path:
    """All stages in order; returns the report path."""
    from engine.report import write_report

    timings = prepare(cfg)
    for arm, lr, seed in pending_runs(cfg):
        t0 = time.perf_counter()
        finetune_one(cfg, arm, lr, seed)
        timings.set(f"finetune:{arm.name}/{run_name(lr, seed)}", time.perf_counter() - t0)
    if any(a.checkpoint_merge is not None for a in cfg.arms):
        from engine.checkpoint_arm import merge_finished_runs

        for run, seconds in merge_finished_runs(cfg).items():
            timings.set(f"checkpoint_merge:{run}", seconds)
    timings.keep(stage_names(cfg))
    return write_report(cfg)
