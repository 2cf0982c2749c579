"""Both ideas together (issue 16, item 4): a donor published with several checkpoints, represented by its MWA merge
before Mashup selection. Does it change the picks, or the outcome?

On one bench-world target: retrain a modest donor pool (the target's relatives plus unrelated tasks, one donor per
task, the world's own donor recipe and seed) with a checkpoint every `save_every` steps. From the same runs, one pool
per representation: each donor's final checkpoint (`final`), the MWA merge by training loss of its own checkpoints
(`mwa`, the default p), their uniform average (`uniform`). Each pool then goes through `mashup run` unchanged
(engine.run: score 256 examples with the hf backend, top-2 by loss, `linear` merge, finetune with the recycling
bench's recipe at its best LR for the target, 3 seeds, held-out evaluation), with a scratch arm for reference.
Everything is cached by content (donor runs by their finetune identity, checkpoint merges by merge key, scores by
donor fingerprint, finetunes by init and config), so a rerun resumes.

Usage: python -m bench.bench_mwa_donors [--readme] [key=value ...]   → bench/results/mwa_donors.{json,md}
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel, apply_overrides, load_yaml, validate
from engine.core.errors import ConfigError

log = logging.getLogger("mashup.bench.mwa_donors")
RECIPE = Path(__file__).parents[1] / "configs" / "bench_recycling.yaml"
Pool = Literal["final", "mwa", "uniform"]
# sort+swap: a target where recycling helps (scratch 0.78 → mashup 0.90 held-out in bench_recycling) and that scratch
# learns, so both arms have room. Its relatives: the other sort tasks (same family) and the other *+swap tasks (same
# second op); then 10 tasks sharing neither, so selection has something to reject.
RELATED = ["sort+id", "sort+dbl", "sort+dropf", "rev+swap", "rotl+swap", "shift+swap", "evens+swap"]
UNRELATED = ["num+count", "num+first2", "num+max", "num+min", "num+revnum", "num+sum", "rev+dbl", "rotl+id",
             "shift+dropf", "evens+dropf"]


class MwaDonorsConfig(StrictModel):
    world: str = "bench"
    world_dir: Path | None = Field(None, description="default: .cache/worlds/<world> (must hold world.json)")
    out: Path = Path("runs/mwa_donors")
    target: str = "sort+swap"
    donors: list[str] = Field(default_factory=lambda: RELATED + UNRELATED, min_length=2,
                              description="donor tasks; each is retrained with checkpoints (the world's recipe)")
    donor_seed: int = Field(0, ge=0, description="which of the world's donor seeds (s<N>) each task's donor reproduces")
    save_every: int = Field(10, ge=1, description="donor checkpoint interval")
    donor: dict[str, Any] = Field(default_factory=dict, description="overrides of the world's donor finetune recipe")
    pools: list[Pool] = Field(default_factory=lambda: ["final", "mwa", "uniform"], min_length=1)
    penalty: float | None = Field(None, ge=0, description="MWA p for the `mwa` pool (None: the engine default)")
    recipe: Path = Field(RECIPE, description="score/select/merge/finetune sections come from this bench config")
    score: dict[str, Any] = Field(default_factory=lambda: {"actors": 1}, description="overrides of recipe's score")
    finetune: dict[str, Any] = Field(default_factory=dict, description="overrides of the recipe's finetune section")
    lr: float = Field(0.01, gt=0, description="bench_recycling's best LR on sort+swap for both scratch and mashup")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    scratch: bool = True
    results: Path = Path("bench/results/mwa_donors.json")
    readme: bool = False

    @property
    def world_path(self) -> Path:
        return self.world_dir or Path(".cache/worlds") / self.world


def world_spec(cfg: MwaDonorsConfig) -> dict[str, Any]:
    """The world's spec (world.json), checked against the target and donor tasks asked for."""
    path = cfg.world_path / "world.json"
    if not path.exists():
        raise ConfigError(f"world_dir: {cfg.world_path} has no world.json (build it: python -m bench.world.build "
                          f"--scale {cfg.world})")
    spec = json.loads(path.read_text())["spec"]
    from bench.world.build import WorldSpec, donor_task_names

    tasks = donor_task_names(WorldSpec.model_validate(spec))
    if cfg.target not in spec["targets"]:
        raise ConfigError(f"target: {cfg.target!r} is not a target of {cfg.world_path} ({spec['targets']})")
    bad = [d for d in cfg.donors if d not in tasks or d == cfg.target]
    if bad:
        raise ConfigError(f"donors: {bad} are not donor tasks of {cfg.world_path} other than the target")
    if cfg.donor_seed >= spec["donor_seeds"]:
        raise ConfigError(f"donor_seed: {cfg.donor_seed} but the world trains {spec['donor_seeds']} seeds per task")
    return spec


def donor_config(cfg: MwaDonorsConfig, spec: dict[str, Any], task: str):
    """bench.world.build.train_donors' recipe and seed for `<task>/s<donor_seed>`, plus checkpoints."""
    from bench.world.build import WorldSpec, donor_task_names
    from engine.finetune import FinetuneConfig

    names = [(n, s) for n in donor_task_names(WorldSpec.model_validate(spec)) for s in range(spec["donor_seeds"])]
    index = names.index((task, cfg.donor_seed))
    world = cfg.world_path.resolve()
    recipe = {"steps": spec["donor_steps"], "batch_size": spec["donor_batch"], "lr": spec["donor_lr"],
              "warmup_steps": spec["donor_steps"] // 10, "save_every": cfg.save_every,
              "lora": {"r": spec["rank"], "alpha": 2 * spec["rank"], "target_modules": spec["target_modules"]}}
    recipe = {**recipe, **cfg.donor}
    if "steps" in cfg.donor and "warmup_steps" not in cfg.donor:
        recipe["warmup_steps"] = recipe["steps"] // 10
    ft = validate(FinetuneConfig, {**recipe, "base": str(world / "base"), "data": str(world / "tasks" / task / "train.jsonl"),
                                   "out": str((cfg.out / "donors" / task).resolve()), "init": None, "eval": None,
                                   "seed": 0 if spec["shared_init"] else 1000 + index, "progress": False}, "donor")
    if ft.save_every >= ft.steps:
        raise ConfigError("save_every: must be below the donor steps (each donor needs several checkpoints)")
    return ft


def train_donor(cfg: MwaDonorsConfig, spec: dict[str, Any], task: str) -> Path:
    """One donor run with checkpoints; reused only when it was trained from this exact config (by content)."""
    from engine.finetune import finetune
    from engine.run import finished_run  # the same content check `mashup run` applies to its finetune runs

    ft = donor_config(cfg, spec, task)
    if not finished_run(ft):
        shutil.rmtree(ft.out, ignore_errors=True)
        log.info("donor %s: %d steps, a checkpoint every %d", task, ft.steps, ft.save_every)
        finetune(ft)
    return Path(ft.out)


def represent(cfg: MwaDonorsConfig, run_dir: Path, pool: str) -> Path:
    """The adapter that stands for this donor in `pool` (merges cached by content in the run folder)."""
    from engine.checkpoints import merge_checkpoints

    if pool == "final":
        return run_dir / "adapter"
    if pool == "mwa":
        return merge_checkpoints(run_dir, run_dir / "merges" / "mwa", "loss", cfg.penalty)
    return merge_checkpoints(run_dir, run_dir / "merges" / "uniform", "uniform")


def donor_facts(run_dir: Path, penalty: float | None) -> dict[str, Any]:
    """Each donor's checkpoint training losses and MWA weights (what the `mwa` pool merged it with)."""
    from engine.checkpoints import checkpoint_weights, read_manifest

    _, rows = read_manifest(run_dir)
    return {"steps": [r.step for r in rows], "train_loss": [r.train_loss for r in rows],
            "final_train_loss": rows[-1].train_loss, "mwa_weights": checkpoint_weights(rows, "loss", penalty)}


def write_pool(cfg: MwaDonorsConfig, spec: dict[str, Any], pool: str, runs: dict[str, Path]) -> Path:
    """`<out>/manifest-<pool>.jsonl`: one row per donor task (same ids in every pool, so picks compare)."""
    from bench.world.tasks import all_tasks

    tasks, out = all_tasks(), cfg.out.resolve()
    rows = [{"id": task, "path": represent(cfg, run_dir, pool).resolve().relative_to(out).as_posix(), "task": task,
             "family": tasks[task].family, "step": donor_config(cfg, spec, task).steps} for task, run_dir in runs.items()]
    return atomic_write_text(out / f"manifest-{pool}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def run_config(cfg: MwaDonorsConfig, pool: str, manifest: Path):
    """`mashup run` for one pool: the recycling bench's sections, one LR, top-2 `mashup` (+ scratch in the first)."""
    from engine.run import ArmSpec, RunConfig

    recipe = load_yaml(cfg.recipe)
    world, task = cfg.world_path.resolve(), cfg.world_path.resolve() / "tasks" / cfg.target
    arms = [ArmSpec(name="mashup")]
    if cfg.scratch and pool == cfg.pools[0]:
        arms.append(ArmSpec(name="scratch", init="none"))
    return validate(RunConfig, {
        "out": cfg.out.resolve() / f"pool-{pool}", "base": str(world / "base"), "donors": [str(manifest)],
        "train": task / "train.jsonl", "val": task / "val.jsonl", "eval": task / "eval.jsonl",
        "score": {**recipe.get("score", {}), **cfg.score}, "select": recipe.get("select", {"k": 2}),
        "merge": recipe.get("merge", {}), "finetune": {**recipe.get("finetune", {}), **cfg.finetune, "progress": False},
        "arms": [a.model_dump() for a in arms], "baseline": "mashup", "chat_template": recipe.get("chat_template", False),
        "sweep": {"lrs": [cfg.lr], "seeds": cfg.seeds}}, f"pool {pool}")


def measure_pool(rc) -> dict[str, Any]:
    """What the report needs from one pool's finished `mashup run`: arms, per-seed held-out, picks, full ranking."""
    from engine.core.scores import BASE_ROW
    from engine.report import collect, run_scope
    from engine.selection import full_sample_rows, read_score_rows

    data = collect(rc)
    arms = {}
    for row in data["rows"]:
        spec = next(a for a in rc.arms if a.name == row["arm"])
        per_seed = [json.loads((rc.run_dir(spec, row["lr"], s) / "final_eval.json").read_text())["result"]["accuracy"]
                    for s in rc.sweep.seeds]
        arms[row["arm"]] = {k: row[k] for k in ("lr", "step0", "final", "final_std", "final_loss", "heldout",
                                                "heldout_std")} | {"heldout_per_seed": per_seed}
    scores, _ = full_sample_rows(read_score_rows(rc.out / "score" / "scores.parquet"), rc.out / "score", run_scope(rc))
    ok = scores[(scores["status"] == "ok") & (scores["donor"] != BASE_ROW)]
    ranking = ok.groupby("donor")["loss"].mean().sort_values()
    base = scores.loc[scores["donor"] == BASE_ROW, "loss"]
    return {"arms": arms, "picks": [{"donor": d["donor"], "loss": d["loss"], "weight": d["weight"]}
                                    for d in data["selections"]["mashup"]["donors"]],
            "ranking": [{"donor": d, "loss": float(v)} for d, v in ranking.items()],
            "base_loss": float(base.iloc[0]) if len(base) else None}


def run_bench(cfg: MwaDonorsConfig, command: str = "python -m bench.bench_mwa_donors --readme") -> Path:
    """Donors → pools → one `mashup run` per pool → summary; returns the JSON path."""
    from engine.core.ray_utils import ensure_ray
    from engine.run import run as mashup_run

    t0 = time.perf_counter()
    spec = world_spec(cfg)
    runs = {task: train_donor(cfg, spec, task) for task in cfg.donors}
    facts = {task: donor_facts(run_dir, cfg.penalty) for task, run_dir in runs.items()}
    ensure_ray(include_dashboard=False)
    pools = {}
    for pool in cfg.pools:
        rc = run_config(cfg, pool, write_pool(cfg, spec, pool, runs))
        log.info("pool %s: score %d donors, select, merge, finetune", pool, len(runs))
        mashup_run(rc)
        pools[pool] = measure_pool(rc)
    from bench.mwa_donors_report import write_summary

    return write_summary(cfg, pools, facts, time.perf_counter() - t0, command)


def load_config(overrides: list[str]) -> MwaDonorsConfig:
    return validate(MwaDonorsConfig, apply_overrides({}, overrides), "bench_mwa_donors")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="rewrite README's bench-mwa-donors block from the results")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0] pools=[final,mwa] donor.steps=60")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.overrides + (["readme=true"] if args.readme else []))
        print(run_bench(cfg, " ".join(["python -m bench.bench_mwa_donors", *(argv if argv is not None else sys.argv[1:])])))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
