"""Does merging one run's checkpoints help? The MWA paper's own setting (arXiv 2504.18580) on the bench world.

Per target × seed: one LoRA finetune from scratch with a checkpoint every `save_every` steps; then, from the same
checkpoints, every merge rule: the final checkpoint alone, the uniform average, MWA by training loss (w ∝ loss^-p) and
MWA by step (w ∝ step^p) at several p. Each is evaluated on the target's val and eval splits with engine.evaluate
(multiple-choice accuracy and completion loss). Every finetune, merge and evaluation is cached by content, so a
rerun resumes.

Usage: python -m bench.bench_mwa [--readme] [key=value ...]   → bench/results/mwa.{json,md}
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from engine.core.config import StrictModel, apply_overrides, validate
from engine.core.errors import ConfigError

log = logging.getLogger("mashup.bench.mwa")
README_BLOCK = "bench-mwa"
RECIPE = {"steps": 120, "batch_size": 16, "lr": 3e-3, "warmup_steps": 12, "save_every": 10,
          "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]}}


class MwaBenchConfig(StrictModel):
    world: str = Field("bench", description="a scale of bench/world/build.py; its base and splits are built when missing")
    world_dir: Path | None = Field(None, description="default: .cache/worlds/<world>")
    base: Path | None = Field(None, description="base model folder (default: <world>/base; the language world's is "
                                                "bench.world.smollm2's converted SmolLM2)")
    chat_template: bool = Field(False, description="finetune and evaluate through the base's chat template")
    out: Path = Path("runs/mwa")
    targets: list[str] = Field(default_factory=lambda: ["sort+swap", "evens+dbl"], min_length=1,
                               description="2 of the 8 bench targets that scratch learns within the budget (in "
                                           "bench_recycling scratch ends below 0.35 on 5 others, where every merge ties "
                                           "near chance; sort+id, the third, was left out for time)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    finetune: dict[str, Any] = Field(default_factory=lambda: dict(RECIPE))
    loss_penalties: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    step_penalties: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    method: str = "linear"
    results: Path = Path("bench/results/mwa.json")
    readme: bool = False
    readme_block: str = Field(README_BLOCK, description="the README block this run's table replaces")

    @field_validator("finetune")
    @classmethod
    def _one_prompt_format(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Training and the checkpoint evaluations must encode rows alike: the format is the top-level key only."""
        if "chat_template" in v:
            raise ValueError("chat_template: set the prompt format once, as the top-level `chat_template` key")
        return v

    @property
    def world_path(self) -> Path:
        return self.world_dir or Path(".cache/worlds") / self.world

    @property
    def base_path(self) -> Path:
        return self.base or self.world_path / "base"

    def rules(self) -> list[tuple[str, str, float | None]]:
        """(name, metric, p): the same checkpoints go through every rule."""
        return ([("final", "final", None), ("uniform", "uniform", None)]
                + [(f"loss p={p:g}", "loss", p) for p in self.loss_penalties]
                + [(f"step p={p:g}", "step", p) for p in self.step_penalties])


def ensure_world(cfg: MwaBenchConfig) -> Path:
    """Only the base and the target splits are needed (no donors): built and cached when missing."""
    w = cfg.world_path
    if all((w / "tasks" / t / "eval.jsonl").exists() for t in cfg.targets) and (cfg.base_path / "config.json").exists():
        return w
    from bench.world import lang_build
    from bench.world.build import SCALES, build_base, write_splits

    langs = {s.name: s for s in lang_build.SCALES.values()}
    if cfg.world in langs:  # the real-model world: its target's splits, and SmolLM2 converted once when missing
        spec = langs[cfg.world]
        if cfg.targets != [spec.target]:
            raise ConfigError(f"targets: world {cfg.world} has one target, {spec.target!r}")
        if cfg.base is None:
            raise ConfigError(f"base: world {cfg.world} has no base folder; set base={lang_build.MODEL_DIR}")
        if not (cfg.base / "config.json").exists() and cfg.base == lang_build.MODEL_DIR:
            lang_build.ensure_model(cfg.base)
        lang_build.write_splits(spec.model_copy(update={"donor_tasks": []}), w)
        return w

    if cfg.world not in SCALES:
        raise ConfigError(f"world: {cfg.world!r} is not one of {sorted(SCALES)} and {w} lacks the targets' splits")
    spec = SCALES[cfg.world]
    unknown = sorted(set(cfg.targets) - set(spec.targets))
    if unknown:
        raise ConfigError(f"targets: {unknown} are not targets of world {cfg.world} ({spec.targets})")
    build_base(spec, w)
    write_splits(spec, w)
    return w


def _slug(rule: str) -> str:
    return rule.replace(" ", "_").replace("=", "")


def train_run(cfg: MwaBenchConfig, world: Path, target: str, seed: int) -> Path:
    """One finetune with checkpoints; reused when its log and final adapter exist (a half-done run is redone)."""
    from engine.finetune import FinetuneConfig, finetune

    run_dir = (cfg.out / target / f"seed{seed}").resolve()
    if (run_dir / "log.parquet").exists() and (run_dir / "adapter" / "adapter_model.safetensors").exists():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    ft = validate(FinetuneConfig, {**cfg.finetune, "base": str(cfg.base_path.resolve()), "chat_template": cfg.chat_template,
                                   "data": str(world / "tasks" / target / "train.jsonl"), "out": str(run_dir),
                                   "init": None, "eval": None, "seed": seed, "progress": False}, "finetune")
    if not ft.save_every or ft.save_every >= ft.steps:
        raise ConfigError("finetune.save_every: must be set and below finetune.steps (the run needs several checkpoints)")
    log.info("finetune %s seed %d (%d steps, checkpoint every %d)", target, seed, ft.steps, ft.save_every)
    finetune(ft)
    return run_dir


def measure_run(cfg: MwaBenchConfig, evaluator, run_dir: Path, splits: dict[str, list]) -> dict[str, dict[str, float]]:
    """Every rule on this run's checkpoints: {rule: {val_accuracy, val_loss, eval_accuracy, eval_loss, weight_last}}."""
    from engine.checkpoints import checkpoint_weights, merge_checkpoints, read_manifest

    _, rows = read_manifest(run_dir)
    out = {}
    for name, metric, p in cfg.rules():
        if metric == "final":
            adapter, weight_last = run_dir / "adapter", 1.0
        else:
            adapter = merge_checkpoints(run_dir, run_dir / "merges" / _slug(name), metric, p, cfg.method)
            weight_last = checkpoint_weights(rows, metric, p)[-1]
        entry = {"weight_last": weight_last}
        for split, examples in splits.items():
            result = evaluator.evaluate(adapter, examples, split)
            entry[f"{split}_accuracy"], entry[f"{split}_loss"] = result["accuracy"], result["loss"]
        out[name] = entry
    return out


def run_bench(cfg: MwaBenchConfig, command: str = "python -m bench.bench_mwa --readme") -> Path:
    """Train (or reuse) every target × seed, measure every rule, write the summary; returns the JSON path."""
    from bench.mwa_report import write_summary
    from engine.checkpoint_arm import AdapterEvaluator
    from engine.core.data import load_jsonl

    t0 = time.perf_counter()
    world = ensure_world(cfg).resolve()
    evaluator = AdapterEvaluator(cfg.base_path.resolve(), cfg.chat_template)
    runs: dict[str, dict[int, dict]] = {}
    for target in cfg.targets:
        splits = {s: load_jsonl(world / "tasks" / target / f"{s}.jsonl") for s in ("val", "eval")}
        for seed in cfg.seeds:
            run_dir = train_run(cfg, world, target, seed)
            losses = [json.loads(line)["train_loss"] for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
            runs.setdefault(target, {})[seed] = {"rules": measure_run(cfg, evaluator, run_dir, splits),
                                                 "checkpoint_train_loss": losses}
            log.info("%s seed %d measured", target, seed)
    return write_summary(cfg, runs, time.perf_counter() - t0, command)


def load_config(overrides: list[str]) -> MwaBenchConfig:
    data: dict[str, Any] = apply_overrides({}, overrides)
    if "finetune" in data:
        data["finetune"] = {**RECIPE, **data["finetune"]}
    return validate(MwaBenchConfig, data, "bench_mwa")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="rewrite README's bench-mwa block from the results")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. targets=[rev+dropf] seeds=[0] finetune.steps=60")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.overrides + (["readme=true"] if args.readme else []))
        print(run_bench(cfg, " ".join(["python -m bench.bench_mwa", *(argv if argv is not None else sys.argv[1:])])))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
