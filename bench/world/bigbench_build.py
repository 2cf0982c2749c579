"""A real-task world: BIG-bench tasks on SmolLM2-135M-Instruct, with a donor pool trained by `mashup finetune`.

Usage: python -m bench.world.bigbench_build --scale ci|cpu|gpu      (the `build:` section of configs/bigbench_<scale>.yaml)
       python -m bench.world.bigbench_build --config FILE.yaml     (any BIG-bench tasks a user names)

The pool has what a Hub collection has: siblings (other subtasks of a target's family), cousins (families of the
same `groups` entry), unrelated tasks, near-duplicates (the same task, another seed), under-trained checkpoints,
other ranks / alphas / target modules, and broken adapters (NaN weights, a wrong shape, a pickle `.bin`, another
base's shapes) that the engine must refuse by name while the run carries on. Every donor is trained by
`engine.finetune.finetune`, the function behind `mashup finetune`.

Cached and resumable by content: a donor is skipped when its finished run was trained from the same base, data and
options (`engine.run.finished_run`, the check `mashup run` uses), so a killed build resumes at the donor it was on,
and an edited recipe retrains only the donors it changes. Each target gets `donors/manifest-<target>.jsonl`: the pool
without the target's own task (its near-duplicates, checkpoints and variants go with it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from bench.world import bigbench as B
from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel

log = logging.getLogger("mashup.world")
BROKEN_KINDS = ("nan", "shape", "pickle", "wrong_base")


class Recipe(StrictModel):
    """How a donor is trained (any field a variant may change)."""

    steps: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DonorSpec(StrictModel):
    task: str
    seed: int = 0
    kind: str = Field("trained", description="trained, near-duplicate, under-trained or variant (a label for the manifest)")
    recipe: dict[str, Any] = Field(default_factory=dict, description="overrides of the world's donor recipe")


class Rows(StrictModel):
    train: int = Field(256, ge=1)
    val: int = Field(48, ge=1)
    eval: int = Field(96, ge=1, description="held-out rows: final teacher-forced metrics and greedy exact match")
    max_prompt_chars: int = Field(300, ge=1)
    max_choices: int = Field(8, ge=2)


class BigBenchWorldSpec(StrictModel):
    name: str
    base: Path = Field(Path(".cache/models/smollm2-135m-instruct"), description="converted by bench.world.smollm2")
    targets: list[str] = Field(min_length=1)
    donors: list[str] = Field(min_length=1, description="one donor per task, trained with `recipe`, seed 0")
    near_duplicates: list[str] = Field(default_factory=list, description="tasks trained again with seed 1")
    under_trained: list[str] = Field(default_factory=list, description="tasks trained for `under_trained_steps`")
    under_trained_steps: int = Field(6, ge=1)
    variants: list[DonorSpec] = Field(default_factory=list, description="other ranks, alphas, target modules")
    broken: list[str] = Field(default_factory=lambda: list(BROKEN_KINDS))
    groups: dict[str, list[str]] = Field(default_factory=dict, description="cousin families: group → families")
    recipe: Recipe = Field(default_factory=Recipe)
    rows: Rows = Field(default_factory=Rows)
    threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _names(self) -> "BigBenchWorldSpec":
        B.check_allowed(self.tasks())
        bad = sorted(set(self.broken) - set(BROKEN_KINDS))
        if bad:
            raise ValueError(f"broken: {bad} are not among {list(BROKEN_KINDS)}")
        return self

    def tasks(self) -> list[str]:
        named = [*self.targets, *self.donors, *self.near_duplicates, *self.under_trained, *(v.task for v in self.variants)]
        return list(dict.fromkeys(named))

    def pool(self) -> list[DonorSpec]:
        out = [DonorSpec(task=t) for t in self.donors]
        out += [DonorSpec(task=t, seed=1, kind="near-duplicate") for t in self.near_duplicates]
        out += [DonorSpec(task=t, kind="under-trained", recipe={"steps": self.under_trained_steps}) for t in self.under_trained]
        return out + [v.model_copy(update={"kind": "variant"}) for v in self.variants]

    def group_of(self, family: str) -> str:
        return next((g for g, fams in self.groups.items() if family in fams), family)


def donor_id(d: DonorSpec) -> str:
    if d.kind == "trained":
        return f"{d.task}/s{d.seed}"
    if d.kind == "near-duplicate":
        return f"{d.task}/s{d.seed}-dup"
    tag = hashlib.sha256(json.dumps(d.recipe, sort_keys=True).encode()).hexdigest()[:6]
    return f"{d.task}/{d.kind}-{tag}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_splits(spec: BigBenchWorldSpec, out: Path) -> dict[str, dict[str, Any]]:
    """tasks/<task>/{train,val,eval}.jsonl, rewritten only when their content would change; returns per-task info."""
    info = {}
    for name in spec.tasks():
        rows = B.task_rows(name, max_prompt_chars=spec.rows.max_prompt_chars, max_choices=spec.rows.max_choices)
        parts = B.split(rows, spec.rows.train, spec.rows.val, spec.rows.eval, seed=name)
        folder = out / "tasks" / name
        for part, data in parts.items():
            text = "".join(json.dumps(r) + "\n" for r in data)
            path = folder / f"{part}.jsonl"
            if not path.exists() or path.read_text() != text:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, text)
        raw = B.load_task(name)["examples"]
        info[name] = {"family": B.family_of(name), "group": spec.group_of(B.family_of(name)), "rows": len(rows),
                      "generation": any("target" in e for e in raw), "choices": "choices" in parts["eval"][0],
                      **{f"n_{k}": len(v) for k, v in parts.items()}}
    return info


def finetune_config(spec: BigBenchWorldSpec, d: DonorSpec, out: Path, base: Path):
    from engine.finetune import FinetuneConfig

    r = spec.recipe.model_copy(update=d.recipe)
    return FinetuneConfig(
        base=str(base), data=str(out / "tasks" / d.task / "train.jsonl"), out=str(out / "donors" / donor_id(d)),
        seed=1000 * d.seed + sum(map(ord, d.task)), steps=r.steps, batch_size=r.batch_size, lr=r.lr,
        warmup_steps=r.steps // 10, progress=False, chat_template=False, overwrite=True,
        lora={"r": r.rank, "alpha": r.alpha, "target_modules": r.target_modules},
    )


def train_donors(spec: BigBenchWorldSpec, out: Path, base: Path, info: dict[str, dict]) -> list[dict]:
    """Every donor of the pool, trained by `engine.finetune` unless its finished run already matches by content."""
    from tqdm import tqdm

    from engine.finetune import finetune
    from engine.run import finished_run

    entries = []
    pool = spec.pool()
    bar = tqdm(pool, desc="donors", unit="donor")
    for d in bar:
        ft = finetune_config(spec, d, out, base)
        bar.set_postfix_str(donor_id(d))
        stamp = Path(ft.out) / "donor_seconds.json"
        if not finished_run(ft):
            result = finetune(ft)
            atomic_write_text(stamp, json.dumps({"seconds": result.seconds, "steps": ft.steps}))
            log.info("donor %s trained in %.0f s", donor_id(d), result.seconds)
        seconds = json.loads(stamp.read_text())["seconds"] if stamp.exists() else None
        entries.append({"id": donor_id(d), "path": f"{donor_id(d)}/adapter", "task": d.task, "family": info[d.task]["family"],
                        "group": info[d.task]["group"], "kind": d.kind, "seed": d.seed, "steps": ft.steps,
                        "rank": ft.lora.r, "alpha": ft.lora.alpha, "target_modules": ft.lora.target_modules,
                        "train_seconds": seconds})
    return entries


def make_broken(kind: str, source: Path, dest: Path) -> None:
    """One adapter the engine must refuse, made from a trained one: NaN weights, a lora_A too narrow for the base,
    the weights as a pickle `.bin` only, or a wider model's shapes under another base name."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((source / "adapter_config.json").read_text())
    weights = load_file(str(source / "adapter_model.safetensors"))
    first = sorted(weights)[0]
    if kind == "nan":
        weights[first] = weights[first].clone()
        weights[first].view(-1)[0] = float("nan")
    elif kind == "shape":
        a = next(k for k in sorted(weights) if "lora_A" in k)
        weights[a] = weights[a][:, : weights[a].shape[1] // 2].contiguous()
    elif kind == "wrong_base":
        config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
        gen = torch.Generator().manual_seed(0)
        weights = {k: torch.randn(*[960 if s == 576 else s for s in v.shape], generator=gen) * 0.01
                   for k, v in weights.items()}
    if kind == "pickle":
        torch.save(weights, str(tmp / "adapter_model.bin"))
    else:
        save_file(weights, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    (tmp / "broken_kind.txt").write_text(kind + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def broken_donors(spec: BigBenchWorldSpec, out: Path, entries: list[dict]) -> list[dict]:
    from engine.core.adapter import fingerprint

    if not spec.broken:
        return []
    source = out / "donors" / entries[0]["path"]
    key = fingerprint(source)
    made = []
    for kind in spec.broken:
        dest = out / "donors" / "broken" / kind
        stamp = dest / "broken_kind.txt"
        if not (stamp.exists() and (dest / "source.txt").exists() and (dest / "source.txt").read_text() == key):
            make_broken(kind, source, dest)
            (dest / "source.txt").write_text(key)
        made.append({"id": f"broken/{kind}", "path": f"broken/{kind}", "task": None, "family": None, "group": None,
                     "kind": f"broken:{kind}"})
    return made


def build(spec: BigBenchWorldSpec, out: Path | None = None) -> Path:
    """Splits, donors, broken donors, manifests and world.json; returns the world folder."""
    from bench.world.build import deterministic
    from bench.world.smollm2 import ensure as ensure_model

    out = out or Path(".cache/worlds") / spec.name
    deterministic(spec.threads)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = ensure_model(spec.base).resolve()
    info = write_splits(spec, out)
    entries = train_donors(spec, out, base, info)
    entries += broken_donors(spec, out, entries)
    _write_jsonl(out / "donors" / "manifest.jsonl", entries)
    for target in spec.targets:
        _write_jsonl(out / "donors" / f"manifest-{target.replace('/', '__')}.jsonl",
                     [e for e in entries if e["task"] != target])
    old = json.loads((out / "world.json").read_text()) if (out / "world.json").exists() else {}
    atomic_write_text(out / "world.json", json.dumps({
        "spec": spec.model_dump(mode="json"), "base": str(base), "sdist_sha256": B.SDIST_SHA256, "tasks": info,
        "donors": entries, "build_seconds": time.perf_counter() - t0,
        "builds": [*old.get("builds", []), {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - t0}],
    }, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["ci", "cpu", "gpu"], default="ci")
    ap.add_argument("--config", type=Path, help="a bench config with a build: section (default: configs/bigbench_<scale>.yaml)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from engine.core.config import load_yaml, validate

    path = args.config or Path(f"configs/bigbench_{args.scale}.yaml")
    spec = validate(BigBenchWorldSpec, load_yaml(path)["build"], f"{path}: build")
    print(build(spec, args.out))


if __name__ == "__main__":
    main()
