"""Does recycling help? The paper's leave-one-out protocol over a mini-world, every arm × LR × seed a Ray Tune trial.

Per target: the pool is every donor trained on another task; scoring (256 examples), selection and merge run once
per target (`engine.run.prepare`), then the finetune runs of all targets go to Ray Tune together, so the same
command fills a laptop's two cores or a cluster (`ray_address`, shared storage for `out`). Every stage is cached:
rerunning resumes, training only the runs without a finished log.

Usage: python -m bench.bench_recycling --config configs/bench_recycling.yaml
       → runs/bench/<target>/report.md, bench/results/recycling.{json,md}, bench/results/recycling_curves.png
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field


from engine.core.config import StrictModel, apply_overrides, load_yaml, validate
from engine.core.errors import ConfigError
from engine.finetune.config import FinetuneSettings
from engine.run import Arms, ArmSpec, RunConfig, RunPlan, pending_runs, prepare, run_name
from engine.run_config import given
from engine.scoring.api import ScoreSettings
from engine.selection import SelectSettings

log = logging.getLogger("mashup.bench")


class TuneSettings(StrictModel):
    """How the finetune trials are spread: one CPU (or GPU fraction) per trial, as many at once as fit."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1, description="None: as many as the cluster's resources allow")
    reuse_actors: bool = Field(True, description="keep trial processes (and their imports) between trials")


class BenchConfig(RunPlan):
    """`mashup run`'s plan (the stage sections, arms, baseline, sweep) applied to every target of a world."""

    world: str = Field("bench", description="a scale of bench/world/build.py, built (and cached) when missing")
    world_dir: Path | None = Field(None, description="default: .cache/worlds/<world>")
    out: Path = Path("runs/bench")
    targets: list[str] | None = Field(None, min_length=1, description="None: every target of the world")
    arms: Arms
    tune: TuneSettings = Field(default_factory=TuneSettings)
    results: Path = Field(Path("bench/results/recycling.json"), description="summary JSON; .md and _curves.png beside it")
    ray_address: str | None = None
    readme: bool = Field(False, description="rewrite README's benchmark block from these results")
    readme_block: str = Field("bench-recycling", description="README's <!-- NAME:start/end --> markers to rewrite")

    @property
    def world_path(self) -> Path:
        return self.world_dir or Path(".cache/worlds") / self.world

    def world_targets(self) -> list[str]:
        return json.loads((self.world_path / "world.json").read_text())["spec"]["targets"]

    def target_names(self) -> list[str]:
        world = self.world_targets()
        names = self.targets or world
        unknown = sorted(set(names) - set(world))
        if unknown:
            raise ConfigError(f"targets: {unknown} are not targets of world {self.world_path} ({world})")
        return names

    def run_config(self, target: str) -> RunConfig:
        """The target's own `mashup run` config: the bench is `mashup run` × targets, with Tune doing the finetunes."""
        w, task = self.world_path.resolve(), self.world_path.resolve() / "tasks" / target
        plan = self.plan()
        if self.ray_address:
            plan["score"] = ScoreSettings(**{**given(self.score), "ray_address": self.ray_address})
        plan["finetune"] = FinetuneSettings(**{"progress": False, **given(self.finetune)})
        plan["arms"] = [self._arm_for(arm, target) for arm in self.arms]
        return RunConfig(
            out=self.out.resolve() / target, base=str(w / "base"), donors=[str(w / "donors" / f"manifest-{target}.jsonl")],
            train=task / "train.jsonl", val=task / "val.jsonl", eval=task / "eval.jsonl", **plan,
        )

    def _arm_for(self, arm: ArmSpec, target: str) -> ArmSpec:
        """random-k draws a different seed per target (its seed + the target's index in the world): one shared seed would
        pick nearly the same donors from the nearly identical leave-one-out pools."""
        select = self.arm_select(arm)
        if select.get("strategy") != "random-k":
            return arm
        seed = select.get("seed", 0) + self.world_targets().index(target)
        return arm.model_copy(update={"select": SelectSettings(**{**given(arm.select), "seed": seed})})


def ensure_world(cfg: BenchConfig) -> Path:
    if not (cfg.world_path / "world.json").exists():
        from bench.world.build import SCALES, build

        if cfg.world not in SCALES:
            raise ConfigError(f"world: {cfg.world!r} is not one of {sorted(SCALES)} and {cfg.world_path} has no world.json")
        log.info("building world %s in %s (cached for later runs)", cfg.world, cfg.world_path)
        build(SCALES[cfg.world], cfg.world_path)
    return cfg.world_path


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: one target × arm × LR × seed, trained by the same code as `mashup run`."""
    from ray import tune

    from engine.analysis import eval_curve
    from engine.run import finetune_one

    t = config["trial"]
    cfg = RunConfig.model_validate(t["run"])
    arm = next(a for a in cfg.arms if a.name == t["arm"])
    result = finetune_one(cfg, arm, t["lr"], t["seed"])
    curve = eval_curve(result.frame())
    metric = "accuracy" if curve["accuracy"].notna().any() else "loss"
    tune.report({"val_" + metric: float(curve[metric].iloc[-1]), "step0_" + metric: float(curve[metric].iloc[0]),
                 "val_loss": float(curve["loss"].iloc[-1]), "train_seconds": result.seconds})


def run_trials(cfg: BenchConfig, runs: dict[str, RunConfig]) -> int:
    """Every unfinished finetune of every target as one Tune experiment; returns how many trials ran."""
    from ray import tune

    trials = [{"target": t, "run": rc.model_dump(mode="json", exclude_unset=True), "arm": arm.name, "lr": lr, "seed": seed}
              for t, rc in runs.items() for arm, lr, seed in pending_runs(rc)]
    if not trials:
        return 0
    log.info("%d finetune trials to run (%d targets)", len(trials), len(runs))
    resources = {"cpu": cfg.tune.cpus_per_trial, **({"gpu": cfg.tune.gpus_per_trial} if cfg.tune.gpus_per_trial else {})}
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent, reuse_actors=cfg.tune.reuse_actors,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(cfg.out.resolve()),
                                  verbose=1, failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    for r in failed:
        log.error("trial %s failed: %s", _label(r.config["trial"]), str(r.error).strip().splitlines()[-1])
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(trials)} finetune trials failed (finished runs are kept; rerun to retry)")
    return len(trials)


def _label(t: dict[str, Any]) -> str:
    return f"{t['target']}/{t['arm']}/{run_name(t['lr'], t['seed'])}"


def _trial_dirname(trial) -> str:
    return f"{trial.trial_id}_{_label(trial.config['trial']).replace('/', '_')}"


def run_bench(cfg: BenchConfig) -> Path:
    """World → per-target prepare → Tune trials → per-target reports → the cross-target summary; returns its path."""
    from bench.recycling_report import write_summary
    from engine.core.ray_utils import ensure_ray
    from engine.report import write_report

    ensure_world(cfg)
    targets = cfg.target_names()
    runs = {t: cfg.run_config(t) for t in targets}
    if cfg.baseline not in {a.name for a in cfg.arms}:
        raise ConfigError(f"baseline: {cfg.baseline!r} is not one of the arms")
    ensure_ray(address=cfg.ray_address, include_dashboard=False)
    for i, (target, rc) in enumerate(runs.items()):
        log.info("target %d/%d %s: score, select, merge", i + 1, len(runs), target)
        prepare(rc)
    run_trials(cfg, runs)
    for rc in runs.values():
        write_report(rc)
    return write_summary(cfg, runs)


def load_bench_config(path: Path, overrides: list[str] = ()) -> BenchConfig:
    """The YAML, then `dotted.key=value` overrides (values parsed as YAML), validated as one."""
    data = apply_overrides(load_yaml(path), overrides)
    return validate(BenchConfig, data, str(path))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. targets=[rev+dropf] sweep.seeds=[0]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        print(run_bench(load_bench_config(args.config, args.overrides)))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
