"""A real-language world on a real pretrained model: SmolLM2-135M-Instruct, template tasks, donors trained by
`mashup finetune` (engine.finetune, the recipe users get), chat template on.

Usage: python -m bench.world.lang_build [--scale cpu|gpu] [--out DIR]

Resumable and deterministic like bench.world.build: the model folder is converted once (bench.world.smollm2),
split files are written once, and a donor whose adapter exists is not retrained. The target's pool holds its close
relatives (the same capitals table asked another way) and unrelated tasks (antonyms, plurals, number words, sums,
sentiment); relatives and target hold out the same facts, so evaluation asks about capitals no donor saw.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from pydantic import Field

from bench.world import language as L
from bench.world.smollm2 import DEFAULT_OUT as MODEL_DIR
from bench.world.smollm2 import ensure as ensure_model
from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel

log = logging.getLogger("mashup.world")


class LangWorldSpec(StrictModel):
    name: str
    target: str = "capital-city-name"
    donor_tasks: list[str] = ["capital-of", "country-of-capital", "antonym", "plural", "number-words", "sentiment"]
    donor_steps: int = 24
    donor_batch: int = 4
    donor_lr: float = 2e-3
    rank: int = 8
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    train_rows: int = Field(64, description="drawn from the train keys (with replacement when fewer)")
    val_rows: int = 12
    eval_rows: int = 20
    choices: int = 4


SCALES = {
    "cpu": LangWorldSpec(name="lang-cpu"),
    "gpu": LangWorldSpec(name="lang-gpu", donor_tasks=[*LangWorldSpec.model_fields["donor_tasks"].default, "sum"],
                         donor_steps=200, donor_batch=16, donor_lr=1e-3, train_rows=512, val_rows=22, eval_rows=22),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_splits(spec: LangWorldSpec, out: Path) -> dict[str, Path]:
    """train.jsonl from the train keys; val.jsonl and eval.jsonl (multiple choice) from the held-out keys."""
    folders = {}
    for name in [spec.target, *spec.donor_tasks]:
        task, folder = L.TASKS[name], out / "tasks" / name
        if not (folder / "eval.jsonl").exists():
            train, held = L.split_keys(task)
            _write_jsonl(folder / "train.jsonl", L.rows(task, train, spec.train_rows, seed=0))
            _write_jsonl(folder / "val.jsonl", L.rows(task, held, spec.val_rows, seed=1, choices=spec.choices))
            _write_jsonl(folder / "eval.jsonl", L.rows(task, held, spec.eval_rows, seed=2, choices=spec.choices))
        folders[name] = folder
    return folders


def train_donors(spec: LangWorldSpec, out: Path, base: Path, folders: dict[str, Path]) -> list[dict]:
    from engine.finetune import FinetuneConfig, finetune

    entries = []
    for i, name in enumerate(spec.donor_tasks):
        final = out / "donors" / name
        if not (final / "adapter_model.safetensors").exists():
            log.info("donor %d/%d: %s", i + 1, len(spec.donor_tasks), name)
            run = out / "donor_runs" / name
            shutil.rmtree(run, ignore_errors=True)
            result = finetune(FinetuneConfig(
                base=str(base), data=str(folders[name] / "train.jsonl"), out=str(run), seed=1000 + i,
                steps=spec.donor_steps, batch_size=spec.donor_batch, lr=spec.donor_lr,
                warmup_steps=spec.donor_steps // 10, progress=False, chat_template=True,
                lora={"r": spec.rank, "alpha": 2 * spec.rank, "target_modules": spec.target_modules},
            ))
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(result.adapter, final.with_suffix(".tmp"), dirs_exist_ok=True)
            final.with_suffix(".tmp").replace(final)
            shutil.rmtree(run, ignore_errors=True)
        entries.append({"id": name, "path": name, "task": name, "table": L.TASKS[name].table,
                        "related": L.TASKS[name].table == L.TASKS[spec.target].table})
    return entries


def build(spec: LangWorldSpec, out: Path, model_dir: Path = MODEL_DIR) -> Path:
    """The converted model, the splits, the donors and a manifest; returns the world folder."""
    import time

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    old = json.loads((out / "world.json").read_text()) if (out / "world.json").exists() else {}
    base = ensure_model(model_dir)
    folders = write_splits(spec, out)
    missing = [n for n in spec.donor_tasks if not (out / "donors" / n / "adapter_model.safetensors").exists()]
    entries = train_donors(spec, out, base, folders)
    _write_jsonl(out / "donors" / "manifest.jsonl", entries)
    # summed over the builds that trained something (a resumed build adds its part; a cached one adds nothing)
    seconds = old.get("build_seconds", 0.0) + (time.perf_counter() - t0 if missing or not old else 0.0)
    atomic_write_text(out / "world.json", json.dumps({"spec": spec.model_dump(), "base": str(base), "donors": entries,
                                                      "build_seconds": seconds}, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(build(SCALES[args.scale], args.out or Path(".cache/worlds") / SCALES[args.scale].name))


if __name__ == "__main__":
    main()
