"""A tiny `mashup run` world whose pool, data and options a test can change between reruns (tests/engine/test_run_scope.py).

Everything runs in this process (`executor: local`, the single finetune executor), so one run of the tiny Llama
takes a few seconds. `outcome` is what a rerun must share with a fresh folder: every arm's selection, a digest of
every merged adapter, and results.json without wall-clock figures.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_base(base_dir: Path, out: Path) -> Path:
    """The tiny base with a chat template, so the chat-template switch changes how rows are encoded."""
    from transformers import AutoTokenizer

    if not out.exists():
        shutil.copytree(base_dir, out)
        tok = AutoTokenizer.from_pretrained(str(out))
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(out))
    return out


def write_donor(base_dir: Path, pool: Path, name: str, seed: int, base_model=None) -> None:
    """A real PEFT LoRA (q/v, r=4) at pool/name, written afresh (a donor replaced in place keeps its id)."""
    from bench.world.tiny import write_lora_adapter

    shutil.rmtree(pool / name, ignore_errors=True)
    write_lora_adapter(base_dir, pool / name, seed=seed, r=4, alpha=8, init_std=0.15, base_model=base_model)


def write_manifest(pool: Path, donors: list[str]) -> Path:
    path = pool / "manifest.jsonl"
    path.write_text("".join(json.dumps({"id": d, "path": d}) + "\n" for d in donors))
    return path


def run_config(state: dict[str, Any], out: Path, paths: dict[str, Path]) -> dict[str, Any]:
    """The run config of a state: the keys a test changes, laid over a 2-step run of two arms."""
    score = {"samples": state["samples"], "seed": state["seed"], "executor": "local", "donors_per_call": 4,
             "backend_options": {"dtype": state["dtype"]}}
    finetune = {"steps": 2, "batch_size": 4, "eval_every": 1, "lr": state["lr"], "progress": False,
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    return {
        "out": str(out), "base": str(paths["base"]), "donors": [str(paths["pool"] / "manifest.jsonl")],
        "train": str(paths[state["data"]]), "val": str(paths["val"]), "eval": str(paths["val"]),
        "chat_template": state["chat"], "score": score, "select": {"k": state["k"], "metric": state["metric"], "weighting": state["weighting"]},
        "merge": {"method": state["method"]}, "finetune": finetune,
        "arms": [{"name": "mashup"}, {"name": "scratch", "init": "none"}],
        "sweep": {"lrs": [state["lr"]], "seeds": [state["sweep_seed"]]},
    }


def run(config: dict[str, Any]) -> Path:
    from engine.run import RunConfig, run as run_all

    run_all(RunConfig.model_validate(config))
    return Path(config["out"])


def _scrub(value: Any, out: Path) -> Any:
    """Drop wall-clock figures and the run folder's own path: what may differ between two equal runs."""
    if isinstance(value, dict):
        return {k: _scrub(v, out) for k, v in value.items()
                if not any(t in k for t in ("second", "wall", "time", "timing", "measured", "date"))}
    if isinstance(value, list):
        return [_scrub(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "<out>")
    return value


def outcome(out: Path) -> dict[str, Any]:
    """Selections, merged-adapter digests and results.json of a finished run, comparable across folders."""
    got: dict[str, Any] = {}
    for arm in sorted(p for p in (out / "arms").iterdir() if p.is_dir()):
        if (arm / "selection.json").exists():
            got[f"{arm.name}/selection"] = json.loads((arm / "selection.json").read_text())
        weights = arm / "merged" / "adapter_model.safetensors"
        if weights.exists():
            got[f"{arm.name}/merged"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    got["results"] = json.loads((out / "results.json").read_text())
    return _scrub(got, out)
