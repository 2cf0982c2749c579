"""The paper's experiment on a real model: BIG-bench tasks, SmolLM2-135M-Instruct, a donor pool trained by
`mashup finetune`, leave-one-out targets, every arm through `mashup run`'s stages.

Usage: python -m bench.bench_bigbench --scale ci|cpu|gpu [key=value ...]   (configs/bigbench_<scale>.yaml)
       python -m bench.bench_bigbench --config FILE.yaml [key=value ...]   (any allowed BIG-bench tasks)
       → runs/bigbench-<scale>/<target>/{main,fast}/, bench/results/bigbench_<scale>.{json,md}; README at cpu scale

The machinery is the recycling benchmark's (bench/bench_recycling.py): per target, `engine.run.prepare` scores the
pool, selects and merges per arm; every arm × LR × seed is a Ray Tune trial trained by `engine.run.finetune_one`;
everything is cached and resumable. Two things are added. The fast-selection arm: a second `mashup run` per target
whose `score` section is the `fast:` settings (the cascade at the engine's defaults), so its scoring time is
measured on its own and enters its wall-clock to parity. And the held-out metrics a user sees: greedy exact match
(engine.evaluate.greedy_exact_match) at step 0 (the init) and at the end, beside teacher-forced loss, token accuracy
and multiple-choice accuracy (bench/bigbench_report.py).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pydantic import Field

from bench.bench_recycling import BenchConfig
from bench.world.bigbench_build import BigBenchWorldSpec
from engine.core.config import apply_overrides, load_yaml, validate
from engine.core.errors import ConfigError
from engine.finetune.config import FinetuneSettings
from engine.run import ArmSpec, RunConfig
from engine.run_config import given
from engine.scoring.api import ScoreSettings

log = logging.getLogger("mashup.bench")


def slug(task: str) -> str:
    """A task name as one folder name (BIG-bench subtasks have a slash)."""
    return task.replace("/", "__")


class BigBenchConfig(BenchConfig):
    """The recycling benchmark's plan over a BIG-bench world described by `build:`, plus the fast-selection arm."""

    build: BigBenchWorldSpec
    world: str = "bigbench"
    out: Path = Path("runs/bigbench")
    results: Path = Path("bench/results/bigbench.json")
    fast: ScoreSettings | None = Field(
        default_factory=lambda: ScoreSettings(strategy="cascade"),
        description="score settings of the fast-selection arm, laid over `score` (None: no such arm)")
    fast_arm: str = Field("mashup-cascade", description="the fast arm: top-k by the run's select and merge sections")
    exact_match_margin: int = Field(4, ge=0, description="tokens decoded beyond the reference's length")
    lr_seeds: int | None = Field(
        None, ge=1, description="choose each arm's LR on the first N seeds, then train the other seeds at that LR only "
                                "(None: every seed at every LR); a third fewer trials at 2 LRs x 3 seeds with N=1")

    def lr_phase(self, rc: RunConfig) -> RunConfig:
        """The LR-choosing phase of a run: every LR, the first `lr_seeds` seeds."""
        if self.lr_seeds is None:
            return rc
        return rc.model_copy(update={"sweep": rc.sweep.model_copy(update={"seeds": rc.sweep.seeds[:self.lr_seeds]})})

    def seed_phase(self, rc: RunConfig, metric: str) -> dict[str, RunConfig]:
        """The rest of a run once its LR phase has finished: per arm, every seed at the LR chosen on the first
        `lr_seeds` (bench/bigbench_report.best_lr, the rule the tables use)."""
        from bench.bigbench_report import best_lr

        if self.lr_seeds is None:
            return {}
        out = {}
        for arm in rc.arms:
            lr = best_lr(rc, arm, metric, self.lr_seeds, chosen_only=True)
            out[arm.name] = rc.model_copy(update={"arms": [arm], "baseline": arm.name,
                                                  "sweep": rc.sweep.model_copy(update={"lrs": [lr]})})
        return out

    @property
    def world_path(self) -> Path:
        return self.world_dir or Path(".cache/worlds") / self.build.name

    def world_json(self) -> dict:
        return json.loads((self.world_path / "world.json").read_text())

    def run_config(self, target: str, fast: bool = False) -> RunConfig:
        """The target's `mashup run` config (main arms), or its fast-selection run (one arm, cascade scoring)."""
        w = self.world_path.resolve()
        task = w / "tasks" / target
        plan = self.plan()
        score = {**given(self.score), **({"ray_address": self.ray_address} if self.ray_address else {})}
        if fast:
            score.update(given(self.fast))
            plan["arms"], plan["baseline"] = [ArmSpec(name=self.fast_arm)], self.fast_arm
        else:
            plan["arms"] = [self._arm_for(arm, target) for arm in self.arms]
        plan["score"] = ScoreSettings(**score)
        plan["finetune"] = FinetuneSettings(**{"progress": False, **given(self.finetune)})
        return RunConfig(
            out=self.out.resolve() / slug(target) / ("fast" if fast else "main"), base=self.world_json()["base"],
            donors=[str(w / "donors" / f"manifest-{slug(target)}.jsonl")],
            train=task / "train.jsonl", val=task / "val.jsonl", eval=task / "eval.jsonl", **plan,
        )


def load_config(path: Path, overrides: list[str] = ()) -> BigBenchConfig:
    data = apply_overrides(load_yaml(path), list(overrides))
    return validate(BigBenchConfig, data, str(path))


def run_bigbench(cfg: BigBenchConfig, scale: str | None = None) -> Path:
    """World → per-target prepare (main and fast) → Tune trials → held-out metrics → tables; returns the JSON."""
    from bench.bench_recycling import run_trials
    from bench.bigbench_report import curve_metric, write_summary
    from bench.world.bigbench_build import build
    from engine.core.ray_utils import ensure_ray
    from engine.run import prepare

    build(cfg.build, cfg.world_path)
    if cfg.baseline not in {a.name for a in cfg.arms}:
        raise ConfigError(f"baseline: {cfg.baseline!r} is not one of the arms")
    targets = cfg.target_names()
    main = {t: cfg.run_config(t) for t in targets}
    fast = {t: cfg.run_config(t, fast=True) for t in targets} if cfg.fast is not None else {}
    # "local": a Ray of our own even when another cluster runs on this machine (ray.init() with no address joins one)
    ensure_ray(address=cfg.ray_address or "local", include_dashboard=False)
    for i, t in enumerate(targets):
        log.info("target %d/%d %s: score, select, merge", i + 1, len(targets), t)
        prepare(main[t])
        if t in fast:
            prepare(fast[t])
    runs = {**main, **{f"{t}@fast": rc for t, rc in fast.items()}}
    run_trials(cfg, {name: cfg.lr_phase(rc) for name, rc in runs.items()})
    if cfg.lr_seeds is not None:
        tasks = cfg.world_json()["tasks"]
        run_trials(cfg, {f"{name}/{arm}": sub for name, rc in runs.items()
                         for arm, sub in cfg.seed_phase(rc, curve_metric(tasks[name.split("@")[0]])).items()})
    return write_summary(cfg, main, fast, scale)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["ci", "cpu", "gpu"], default="ci")
    ap.add_argument("--config", type=Path, help="default: configs/bigbench_<scale>.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sweep.seeds=[0] targets=[word_unscrambling]")
    ap.add_argument("--render-only", type=Path, metavar="RESULTS",
                    help="recompute the derived tables of a saved results JSON and rewrite its .md and README's block")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render_only:
        from bench.bigbench_report import rerender

        print(rerender(args.render_only, readme=True))
        return
    try:
        cfg = load_config(args.config or Path(f"configs/bigbench_{args.scale}.yaml"), args.overrides)
        print(run_bigbench(cfg, None if args.config else args.scale))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
