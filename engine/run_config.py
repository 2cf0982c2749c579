"""The `mashup run` config: typed stage sections, the arms, the sweep, and where every output of a run lives.

A run's `score`, `select`, `merge` and `finetune` sections are the stages' own settings models (everything but
what the run fills in: base, donors, data, paths, seeds), so a typo or a bad value in any of them fails when the
config loads, naming `section.field`. Rules that tie fields together are checked on each stage's full config,
once the run's section and an arm's overrides are laid over each other (`RunConfig.stage`). The benchmark's config
reuses `RunPlan` rather than re-declaring these sections.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_serializer, model_validator

from engine.checkpoint_arm import CheckpointMergeSpec
from engine.core.config import StrictModel, format_validation_error
from engine.core.errors import ConfigError
from engine.finetune.config import FinetuneConfig, FinetuneSettings
from engine.merge.config import MergeConfig, MergeSettings
from engine.scoring.api import ScoreConfig, ScoreSettings
from engine.selection import SelectConfig, SelectSettings


def given(section: BaseModel | None) -> dict[str, Any]:
    """The fields a section actually sets (defaults stay the stage's own), as plain data."""
    return section.model_dump(exclude_unset=True) if section is not None else {}


CHOICE_FILE = "choice.json"  # an arm's chosen merge (engine/merge_choice.py): every candidate, its loss, the pick


class ChooseSettings(StrictModel):
    """An arm that chooses its merge (engine/merge_choice.py): candidate merges of its top donors, each scored
    exactly on the run's sample like one more donor; the best by the select metric is kept, and a fresh LoRA when
    even the best removes less than `min_gain` of the base's sample loss, or beats the base by fewer than `min_z`
    paired standard errors (a gain the sample cannot tell from noise)."""

    ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1,
                                                  description="how many of the top donors each candidate merges")
    methods: list[Literal["linear", "cat"]] = Field(default_factory=lambda: ["linear", "cat"], min_length=1)
    weightings: list[Literal["uniform", "mwa"]] = Field(default_factory=lambda: ["uniform", "mwa"], min_length=1)
    min_gain: float = Field(0.2, ge=0, lt=1, description="the share of the base's sample loss the chosen merge "
                                                         "must remove; below it the arm starts from a fresh LoRA")
    min_z: float = Field(2.0, ge=0, description="how many paired standard errors (per-example loss differences on "
                                                "the sample) the chosen merge must beat the base by; below it, a "
                                                "fresh LoRA. 0 turns the check off")
    allow_none: bool = Field(True, description="false: always finetune from the best candidate, however little it gains")


class ArmSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    init: Literal["merge", "none"] = "merge"
    choose: ChooseSettings | None = Field(None, description="choose the merge among candidates scored on the sample "
                                                             "(k, method, weighting, or none), not only the donors")
    select: SelectSettings = Field(default_factory=SelectSettings, description="overrides of the run's select section")
    merge: MergeSettings = Field(default_factory=MergeSettings, description="overrides of the run's merge section")
    checkpoint_merge: CheckpointMergeSpec | None = Field(
        None, description="also merge each run's own checkpoints (MWA by loss or step) and report it beside the final")

    @field_serializer("select", "merge")
    def _only_given(self, section: BaseModel) -> dict[str, Any]:
        """Overrides are what the user set: a dumped arm read back must not override the run with defaults."""
        return given(section)

    @model_validator(mode="after")
    def _choose_fits(self) -> "ArmSpec":
        """Candidates are merges of the top donors with their own methods and weightings: nothing else to choose."""
        if self.choose is None:
            return self
        if self.init != "merge":
            raise ValueError("choose: needs init: merge (it chooses among merges of the donors, or none)")
        for field in ("strategy", "k", "weighting"):
            if field in self.select.model_fields_set and not (field == "strategy" and self.select.strategy == "top-k"):
                raise ValueError(f"select.{field}: a choose arm ranks top-k and takes k and weighting from choose.ks "
                                 "and choose.weightings; drop the override")
        if "method" in self.merge.model_fields_set:
            raise ValueError("merge.method: a choose arm takes its methods from choose.methods; drop the override")
        return self


class SweepSpec(StrictModel):
    lrs: list[float] | None = Field(None, min_length=1, description="None: finetune.lr alone")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


def _unique_names(arms: list[ArmSpec]) -> list[ArmSpec]:
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    return arms


Arms = Annotated[list[ArmSpec], Field(min_length=1), AfterValidator(_unique_names)]


class RunPlan(StrictModel):
    """What a run does, apart from its data: the stage sections, the arms and the sweep (shared with the benchmark)."""

    score: ScoreSettings = Field(default_factory=ScoreSettings)
    select: SelectSettings = Field(default_factory=lambda: SelectSettings(k=2))
    merge: MergeSettings = Field(default_factory=MergeSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    arms: Arms = Field(default_factory=lambda: [ArmSpec(name="mashup"), ArmSpec(name="scratch", init="none")])
    baseline: str = "scratch"
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    match_scratch_rank: bool = Field(False, description="re-factor every merged arm (SVD of its ΔW) to finetune.lora's "
                                                        "r and alpha, so every arm trains as many parameters at the "
                                                        "same scale as a fresh LoRA")
    chat_template: bool = Field(False, description="wrap every prompt in the base tokenizer's chat template (instruct "
                                                   "bases): the one prompt format of the run, used to score the donors, "
                                                   "train, draw the validation curves and evaluate")

    @model_validator(mode="after")
    def _one_prompt_format(self) -> "RunPlan":
        """Donors ranked on one prompt format and trained or evaluated on another would compare nothing: the
        encoding is a run-level setting, so a stage section may not set it."""
        for section in ("score", "finetune"):
            if "chat_template" in getattr(self, section).model_fields_set:
                raise ValueError(f"{section}.chat_template: set the prompt format once for the whole run, as the "
                                 "top-level `chat_template:` key (scoring, finetuning and evaluation encode alike)")
        return self

    def encoding(self) -> dict[str, Any]:
        """How the run encodes every row (engine.core.data.encode_example's options), as recorded in its results."""
        return {"chat_template": self.chat_template}

    @field_serializer("score", "select", "merge", "finetune")
    def _sections_as_given(self, section: BaseModel) -> dict[str, Any]:
        """A dumped config reads back the same: only what was set, so set-ness (which the strategy-option checks
        and the arm overlays rely on) survives a round trip."""
        return given(section)

    def plan(self) -> dict[str, Any]:
        """This plan's fields as given, to build a RunConfig (or another plan) from."""
        return {name: getattr(self, name) for name in RunPlan.model_fields}

    def arm_select(self, arm: ArmSpec) -> dict[str, Any]:
        """The select options an arm sets, its overrides over the run's section (defaults left to the stage)."""
        return {**given(self.select), **given(arm.select)}


class RunConfig(RunPlan):
    out: Path
    base: str
    donors: list[str] = Field(min_length=1)
    train: Path = Field(description="the new task's training data; scoring samples from it")
    val: Path | None = Field(None, description="required: picks the best LR per arm; gives the curves and parity")
    eval: Path | None = Field(None, description="held-out final evaluation (multiple choice when it has choices)")

    def stage(self, section: str, model_cls, fixed: dict[str, Any], extra: BaseModel | None = None):
        """One stage's full config: the run's section, an arm's overrides over it, the run's own values over both.
        Errors name `section.field`."""
        data = {**given(getattr(self, section)), **given(extra), **fixed}
        try:
            return model_cls.model_validate(data)
        except ValueError as exc:
            raise ConfigError(format_validation_error(exc, section) if hasattr(exc, "errors") else f"{section}: {exc}") from None

    def score_config(self):
        """The score stage's config. A cascade the run scores settles on the largest k its arms select, unless the
        score section sets `cascade.settle_k` itself (engine.scoring.cascade, "Settling")."""
        cfg = self.stage("score", ScoreConfig, {"base": self.base, "donors": self.donors, "data": self.train,
                                                "out": self.out / "score", **self.encoding()})
        cascades = cfg.strategy == "cascade" or (cfg.strategy == "screen" and cfg.screen.then == "cascade")
        k = self.largest_k()
        if cascades and k is not None and "settle_k" not in cfg.cascade.model_fields_set:
            cfg = cfg.model_copy(update={"cascade": cfg.cascade.model_copy(update={"settle_k": k})})
        return cfg

    def largest_k(self) -> int | None:
        """The most donors any arm merges (a choose arm: its largest candidate k); None when no arm has a k."""
        ks = [max(arm.choose.ks) if arm.choose is not None else self.select_config(arm, self.sweep.seeds[0]).k
              for arm in self.arms if arm.init == "merge"]
        ks = [k for k in ks if k is not None]
        return max(ks) if ks else None

    def select_config(self, arm: ArmSpec, seed: int | None = None):
        """A random-k arm draws again for each run seed: its select seed plus the run seed."""
        home = self.merge_home(arm, seed)
        config = self.stage("select", SelectConfig, {"scores": self.out / "score" / "scores.parquet",
                                                     "out": home / "selection.json"}, arm.select)
        return config.model_copy(update={"seed": config.seed + seed}) if self.draws_per_seed(arm) else config

    def merge_config(self, arm: ArmSpec, seed: int | None = None):
        home = self.merge_home(arm, seed)
        extra = arm.merge
        if self.match_scratch_rank:
            lora = self.finetune_config(self.arms[0], None, self.sweep.seeds[0]).lora
            extra = MergeSettings(**{"refactor_rank": lora.r, "refactor_alpha": lora.alpha, **given(arm.merge)})
        return self.stage("merge", MergeConfig, {"selection": home / "selection.json",
                                                 "out": home / "merged", "overwrite": True}, extra)

    def draws_per_seed(self, arm: ArmSpec) -> bool:
        """random-k is redrawn per seed: one draw reused by every seed would report one lucky (or unlucky) pick."""
        return arm.init == "merge" and self.arm_select(arm).get("strategy") == "random-k"

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

    def init_adapter(self, arm: ArmSpec, seed: int | None) -> str | None:
        """What an arm finetunes from: its merged adapter, nothing for init: none, and for a choose arm what its
        choice.json picked (None before it has chosen, or when it chose a fresh LoRA)."""
        if arm.init != "merge":
            return None
        if arm.choose is None:
            return str(self.merge_home(arm, seed) / "merged")
        choice = self.arm_dir(arm) / CHOICE_FILE
        return json.loads(choice.read_text()).get("init") if choice.exists() else None

    def finetune_config(self, arm: ArmSpec, lr: float | None, seed: int):
        fixed = {"base": self.base, "data": str(self.train), "eval": str(self.val) if self.val else None,
                 "init": self.init_adapter(arm, seed), "seed": seed,
                 "out": str(self.run_dir(arm, lr, seed)), **self.encoding()}
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
                select = self.select_config(arm, self.sweep.seeds[0])
                if arm.choose is not None:
                    select = select.model_copy(update={"k": max(arm.choose.ks)})
                self._check_cascade(score, arm, select)
                self.merge_config(arm, self.sweep.seeds[0])
            for lr in self.lrs():
                ft = self.finetune_config(arm, lr, self.sweep.seeds[0])
                if arm.checkpoint_merge is not None and not ft.save_every:
                    raise ConfigError(f"arms.{arm.name}.checkpoint_merge: the run saves no checkpoints; set "
                                      "checkpoint_merge.save_every or finetune.save_every")
        self.check_data()

    @staticmethod
    def _check_cascade(score, arm: ArmSpec, select) -> None:
        """A cascade or a screen leaves full-sample losses for its survivors only: an ablation that needs every
        donor's loss (random-k, worst-k, all) would draw from the survivors, so say so before scoring, not after."""
        if score.strategy == "exhaustive":
            return
        if select.strategy != "top-k":
            raise ConfigError(f"arms.{arm.name}: strategy {select.strategy!r} needs every donor's full-sample loss, "
                              f"but score.strategy {score.strategy!r} scores only its survivors on the full sample; "
                              "use score.strategy: exhaustive for ablations")
        if score.strategy == "cascade" and select.k > score.cascade.min_survivors:
            raise ConfigError(f"arms.{arm.name}: select.k ({select.k}) exceeds score.cascade.min_survivors "
                              f"({score.cascade.min_survivors}); the cascade would not keep enough donors")

    def check_data(self) -> None:
        """Parse and tokenize every data file now: a bad val or eval file must not surface after scoring and merging."""
        from transformers import AutoConfig

        from engine.core.data import encode_sample, load_jsonl
        from engine.finetune.common import load_task, load_tokenizer

        ft = self.finetune_config(self.arms[0], self.lrs()[0], self.sweep.seeds[0])
        tokenizer = load_tokenizer(ft)
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"chat_template: the base's tokenizer ({ft.base}) has no chat template; set "
                              "chat_template: false for a base model without one")
        context = getattr(AutoConfig.from_pretrained(ft.base, trust_remote_code=ft.trust_remote_code),
                          "max_position_embeddings", None)
        load_task(ft, tokenizer, context)
        if self.eval is not None:
            encode_sample(tokenizer, load_jsonl(self.eval), context, self.chat_template, str(self.eval))


def run_name(lr: float | None, seed: int) -> str:
    return f"lr{lr:g}_seed{seed}" if lr is not None else f"seed{seed}"
