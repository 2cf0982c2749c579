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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from engine.core.atomic import atomic_write_text
from engine.checkpoint_arm import CheckpointMergeSpec
from engine.core.config import StrictModel, format_validation_error
from engine.core.errors import ConfigError

log = logging.getLogger("mashup.run")


class ArmSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    init: Literal["merge", "none"] = "merge"
    select: dict[str, Any] = Field(default_factory=dict, description="overrides of the run's select section")
    merge: dict[str, Any] = Field(default_factory=dict, description="overrides of the run's merge section")
    checkpoint_merge: CheckpointMergeSpec | None = Field(
        None, description="also merge each run's own checkpoints (MWA by loss or step) and report it beside the final")


class SweepSpec(StrictModel):
    lrs: list[float] | None = Field(None, min_length=1, description="None: finetune.lr alone")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


def _unique_names(arms: list[ArmSpec]) -> list[ArmSpec]:
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    return arms


Arms = Annotated[list[ArmSpec], Field(min_length=1), AfterValidator(_unique_names)]


class RunConfig(StrictModel):
    out: Path
    base: str
    donors: list[str] = Field(min_length=1)
    train: Path = Field(description="the new task's training data; scoring samples from it")
    val: Path | None = Field(None, description="required: picks the best LR per arm; gives the curves and parity")
    eval: Path | None = Field(None, description="held-out final evaluation (multiple choice when it has choices)")
    score: dict[str, Any] = Field(default_factory=dict)
    select: dict[str, Any] = Field(default_factory=lambda: {"k": 2})
    merge: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)
    arms: Arms = Field(default_factory=lambda: [ArmSpec(name="mashup"), ArmSpec(name="scratch", init="none")])
    baseline: str = "scratch"
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    match_scratch_rank: bool = Field(False, description="re-factor every merged arm (SVD of its ΔW) to finetune.lora's "
                                                        "r and alpha, so every arm trains as many parameters at the "
                                                        "same scale as a fresh LoRA")

    def stage(self, section: str, model_cls, fixed: dict[str, Any], extra: dict[str, Any] | None = None):
        """Validate one stage's section with the run's own values filled in; errors name `section.field`."""
        data = {**getattr(self, section), **(extra or {}), **fixed}
        try:
            return model_cls.model_validate(data)
        except ValueError as exc:
            raise ConfigError(format_validation_error(exc, section) if hasattr(exc, "errors") else f"{section}: {exc}") from None

    def score_config(self):
        from engine.scoring import ScoreConfig

        return self.stage("score", ScoreConfig, {"base": self.base, "donors": self.donors, "data": self.train,
                                                 "out": self.out / "score"})

    def select_config(self, arm: ArmSpec, seed: int | None = None):
        """A random-k arm draws again for each run seed: its select seed plus the run seed."""
        from engine.selection import SelectConfig

        home = self.merge_home(arm, seed)
        config = self.stage("select", SelectConfig, {"scores": self.out / "score" / "scores.parquet",
                                                     "out": home / "selection.json"}, arm.select)
        return config.model_copy(update={"seed": config.seed + seed}) if self.draws_per_seed(arm) else config

    def merge_config(self, arm: ArmSpec, seed: int | None = None):
        from engine.merge import MergeConfig

        home = self.merge_home(arm, seed)
        extra = dict(arm.merge)
        if self.match_scratch_rank:
            lora = self.finetune_config(self.arms[0], None, self.sweep.seeds[0]).lora
            extra = {"refactor_rank": lora.r, "refactor_alpha": lora.alpha, **extra}
        return self.stage("merge", MergeConfig, {"selection": home / "selection.json",
                                                 "out": home / "merged", "overwrite": True}, extra)

    def draws_per_seed(self, arm: ArmSpec) -> bool:
        """random-k is redrawn per seed: one draw reused by every seed would report one lucky (or unlucky) pick."""
        return arm.init == "merge" and {**self.select, **arm.select}.get("strategy") == "random-k"

    def merge_home(self, arm: ArmSpec, seed: int | None) -> Path:
        """Where an arm's selection.json and merged/ live: the arm's folder, or draw-seed<S>/ inside it."""
        if not self.draws_per_seed(arm):
            return self.arm_dir(arm)
        if seed is None:
            raise ValueError(f"arm {arm.name} draws its donors per seed; a seed is needed")
        return self.arm_dir(arm) / f"draw-seed{seed}"

    def draw_seeds(self, arm: ArmSpec) -> list[int | None]:
        """The seeds an arm selects and merges for: every run seed for a per-seed draw, else one shared merge."""
        return list(self.sweep.seeds) if self.draws_per_seed(arm) else [None]

    def finetune_config(self, arm: ArmSpec, lr: float | None, seed: int):
        from engine.finetune import FinetuneConfig

        fixed = {"base": self.base, "data": str(self.train), "eval": str(self.val) if self.val else None,
                 "init": str(self.merge_home(arm, seed) / "merged") if arm.init == "merge" else None, "seed": seed,
                 "out": str(self.run_dir(arm, lr, seed))}
        if lr is not None:
            fixed["lr"] = lr
        if arm.checkpoint_merge is not None and arm.checkpoint_merge.save_every:
            fixed["save_every"] = arm.checkpoint_merge.save_every
        return self.stage("finetune", FinetuneConfig, fixed)

    def arm_dir(self, arm: ArmSpec) -> Path:
        return self.out / "arms" / arm.name

    def run_dir(self, arm: ArmSpec, lr: float | None, seed: int) -> Path:
        """One finetune run's folder: arms/<arm>/runs/lr<lr>_seed<seed>."""
        return self.arm_dir(arm) / "runs" / run_name(lr, seed)

    @staticmethod
    def merge_timing_key(arm: str, seed: int | None) -> str:
        """timings.json key of an arm's select+merge; a per-seed draw has one per seed."""
        return f"select+merge:{arm}" if seed is None else f"select+merge:{arm}/draw-seed{seed}"

    def lrs(self) -> list[float | None]:
        return list(self.sweep.lrs) if self.sweep.lrs else [None]

    def check(self) -> None:
        """Every stage's config, validated before any expensive work."""
        from engine.core.paths import check_paths

        if self.baseline not in {a.name for a in self.arms}:
            raise ConfigError(f"baseline: {self.baseline!r} is not one of the arms")
        if self.val is None:
            raise ConfigError("val: required; the run picks each arm's LR, draws its curves and measures parity on a "
                              "validation file (hold out a slice of train), so without one it refuses before any work")
        check_paths(self, {"base": "base", "donors": "donors", "train": "file", "val": "file", "eval": "file"})
        score = self.score_config()
        for arm in self.arms:
            if arm.init == "merge":
                self._check_cascade(score, arm, self.select_config(arm, self.sweep.seeds[0]))
                self.merge_config(arm, self.sweep.seeds[0])
            for lr in self.lrs():
                ft = self.finetune_config(arm, lr, self.sweep.seeds[0])
                if arm.checkpoint_merge is not None and not ft.save_every:
                    raise ConfigError(f"arms.{arm.name}.checkpoint_merge: the run saves no checkpoints; set "
                                      "checkpoint_merge.save_every or finetune.save_every")
        self.check_data()

    @staticmethod
    def _check_cascade(score, arm: ArmSpec, select) -> None:
        """A cascade leaves full-sample losses for its survivors only: say so before scoring, not after."""
        if score.strategy != "cascade":
            return
        if select.strategy != "top-k":
            raise ConfigError(f"arms.{arm.name}: strategy {select.strategy!r} needs every donor's full-sample loss; "
                              "use score.strategy: exhaustive for ablations")
        if select.k > score.cascade.min_survivors:
            raise ConfigError(f"arms.{arm.name}: select.k ({select.k}) exceeds score.cascade.min_survivors "
                              f"({score.cascade.min_survivors}); the cascade would not keep enough donors")

    def check_data(self) -> None:
        """Parse and tokenize every data file now: a bad val or eval file must not surface after scoring and merging."""
        from transformers import AutoConfig

        from engine.core.data import encode_sample, load_jsonl
        from engine.finetune.common import load_task, load_tokenizer

        ft = self.finetune_config(self.arms[0], self.lrs()[0], self.sweep.seeds[0])
        tokenizer = load_tokenizer(ft)
        context = getattr(AutoConfig.from_pretrained(ft.base, trust_remote_code=ft.trust_remote_code),
                          "max_position_embeddings", None)
        load_task(ft, tokenizer, context)
        if self.eval is not None:
            encode_sample(tokenizer, load_jsonl(self.eval), context, ft.chat_template, str(self.eval))


def run_name(lr: float | None, seed: int) -> str:
    return f"lr{lr:g}_seed{seed}" if lr is not None else f"seed{seed}"


class Timings:
    """Wall-clock per stage, persisted so a resumed run still reports what earlier attempts spent."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, seconds: float) -> None:
        self.data[key] = self.data.get(key, 0.0) + seconds
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def _finished(ft) -> bool:
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


def _merge_is_current(arm_dir: Path, merge_cfg) -> bool:
    """The merged adapter's key (method, every option, each donor's name, weight and scored content) equals the
    key of what the selection asks for now; engine.merge.streaming.merge_key defines it."""
    from engine.merge.streaming import MERGE_INFO_FILE, merge_key
    from engine.selection import Selection

    info, sel = arm_dir / "merged" / MERGE_INFO_FILE, arm_dir / "selection.json"
    if not (info.exists() and sel.exists()):
        return False
    chosen = Selection.read(sel).donors
    if any(d.fingerprint is None for d in chosen):
        return False  # scores without content fingerprints: merge again rather than trust the old one
    want = merge_key(merge_cfg, [d.donor for d in chosen], [d.weight for d in chosen], [d.fingerprint for d in chosen])
    return json.loads(info.read_text()).get("key") == want


def prepare(cfg: RunConfig) -> Timings:
    """Validate, score the pool once, then select and merge per arm: everything the finetune runs start from."""
    from engine.merge.streaming import merge_with_config
    from engine.scoring import score
    from engine.selection import select_with_config

    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out / "config.json", cfg.model_dump_json(indent=1))
    timings = Timings(cfg.out / "timings.json")
    if any(a.init == "merge" for a in cfg.arms):
        t0 = time.perf_counter()
        summary = score(cfg.score_config())
        timings.add("score", time.perf_counter() - t0)
        log.info("scoring: %d scored, %d failed, %d already done", summary.scored, summary.failed, summary.skipped_done)
    for arm in cfg.arms:
        if arm.init != "merge":
            continue
        for seed in cfg.draw_seeds(arm):
            t0 = time.perf_counter()
            select_with_config(cfg.select_config(arm, seed))
            merge_cfg = cfg.merge_config(arm, seed)
            if not _merge_is_current(cfg.merge_home(arm, seed), merge_cfg):
                merge_with_config(merge_cfg)
            timings.add(cfg.merge_timing_key(arm.name, seed), time.perf_counter() - t0)
    return timings


def pending_runs(cfg: RunConfig) -> list[tuple[ArmSpec, float | None, int]]:
    """(arm, lr, seed) of every finetune run without a finished log: what a resumed run still has to train."""
    todo = []
    for arm in cfg.arms:
        for lr in cfg.lrs():
            for seed in cfg.sweep.seeds:
                if not _finished(cfg.finetune_config(arm, lr, seed)):
                    todo.append((arm, lr, seed))
    return todo


def finetune_one(cfg: RunConfig, arm: ArmSpec, lr: float | None, seed: int):
    """One arm × LR × seed from a clean folder (a half-written earlier attempt is discarded)."""
    from engine.finetune import finetune

    ft = cfg.finetune_config(arm, lr, seed)
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
        timings.add(f"finetune:{arm.name}/{run_name(lr, seed)}", time.perf_counter() - t0)
    if any(a.checkpoint_merge is not None for a in cfg.arms):
        from engine.checkpoint_arm import merge_finished_runs

        t0 = time.perf_counter()
        merge_finished_runs(cfg)
        timings.add("checkpoint_merge", time.perf_counter() - t0)
    return write_report(cfg)
