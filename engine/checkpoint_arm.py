"""`mashup run`'s checkpoint-merge arms: finetune, merge that run's own checkpoints (MWA), evaluate the merge beside
the final checkpoint.

An arm with `checkpoint_merge: {metric: loss|step|uniform, penalty: p}` trains as any other arm (with checkpoints
every `save_every` steps); afterwards each of its runs gets `<run>/checkpoint_merge/`, the MWA merge of its
checkpoints (engine/checkpoints.py), evaluated on the same validation examples as the run's own log and on the
held-out split. Evaluations are cached in the adapter folder, keyed by the adapter's and the examples' content.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator

from engine.core.atomic import atomic_write_text
from engine.core.config import StrictModel

MERGE_DIR = "checkpoint_merge"
EVALS_FILE = "evals.json"


class CheckpointMergeSpec(StrictModel):
    """An arm's `checkpoint_merge:` section."""

    metric: Literal["loss", "step", "uniform"] = "loss"
    penalty: float | None = Field(None, ge=0, description="MWA penalty p (default engine.checkpoints.DEFAULT_PENALTY)")
    save_every: int | None = Field(None, ge=1, description="checkpoint interval for this arm (default finetune.save_every)")
    method: str = Field("linear", description="merge method (the paper averages the LoRA weights: linear)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from engine.merge.registry import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown {v!r}; choose one of {', '.join(METHODS)}")
        return v

    def label(self) -> str:
        from engine.checkpoints import DEFAULT_PENALTY

        if self.metric == "uniform":
            return "uniform"
        return f"{self.metric} p={DEFAULT_PENALTY if self.penalty is None else self.penalty:g}"


def examples_digest(examples: Sequence[Any]) -> str:
    """Content key of an evaluation set: what a cached evaluation is valid for."""
    payload = json.dumps([[e.prompt, e.completion, list(e.choices or []), e.answer] for e in examples])
    return hashlib.sha256(payload.encode()).hexdigest()


class AdapterEvaluator:
    """The base loaded once; each adapter attached, evaluated (engine.evaluate, as the finetune log does), detached.
    `chat_template` is the run's prompt format; it joins the cache key, so a cached result of the other format is
    never reused (the plain format keeps the key it always had)."""

    def __init__(self, base: str | Path, chat_template: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = str(base)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32, use_safetensors=True)
        self.chat_template = chat_template

    def evaluate(self, adapter: str | Path, examples: Sequence[Any], name: str = "eval") -> dict[str, Any]:
        """The summary dict of `EvalResult`; cached in `adapter/evals.json` by adapter and examples content."""
        from peft import PeftModel

        from engine.evaluate import evaluate

        from engine.core.adapter import fingerprint
        from engine.core.identity import base_fingerprint

        adapter = Path(adapter)
        key = (f"{name}:{fingerprint(adapter)[:16]}:{examples_digest(examples)[:16]}:"
               f"{base_fingerprint(self.base_dir)[1]}" + (":chat_template" if self.chat_template else ""))
        cache_path = adapter / EVALS_FILE
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        if key in cache:
            return cache[key]
        peft_model = PeftModel.from_pretrained(self.model, str(adapter))
        try:
            result = evaluate(peft_model, self.tokenizer, examples, chat_template=self.chat_template).summary()
        finally:
            self.model = peft_model.unload()
        cache[key] = result
        atomic_write_text(cache_path, json.dumps(cache, indent=1))
        return result


def merge_run(run_dir: Path, spec: CheckpointMergeSpec) -> Path:
    """`<run>/checkpoint_merge`, the MWA merge of the run's checkpoints (reused while its inputs are unchanged)."""
    from engine.checkpoints import merge_checkpoints

    return merge_checkpoints(run_dir, run_dir / MERGE_DIR, spec.metric, spec.penalty, spec.method)


def merge_finished_runs(cfg) -> dict[str, float]:
    """Merge the checkpoints of every finished run of every checkpoint-merge arm. Returns the seconds of each merge
    that was written (`<arm>/<run name>`), so the run records the cost of what it holds, not of a cache hit."""
    import time

    from engine.merge.streaming import MERGE_INFO_FILE

    def key(info: Path) -> str | None:
        return json.loads(info.read_text()).get("key") if info.exists() else None

    written = {}
    for arm in cfg.arms:
        if arm.checkpoint_merge is None:
            continue
        for lr in cfg.lrs():
            for seed in cfg.sweep.seeds:
                run_dir = cfg.run_dir(arm, lr, seed)
                if (run_dir / "log.parquet").exists():
                    info = run_dir / MERGE_DIR / MERGE_INFO_FILE
                    before, t0 = key(info), time.perf_counter()
                    merge_run(run_dir, arm.checkpoint_merge)
                    if before is None or key(info) != before:  # a reused merge keeps its key
                        written[f"{arm.name}/{run_dir.name}"] = time.perf_counter() - t0
    return written


def report_rows(cfg, arms: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint-merge arm, at its best LR: the merge beside the final checkpoint (validation and held-out)."""
    from engine.analysis import mean_std
    from engine.core.data import load_jsonl, sample_examples

    specs = [a for a in cfg.arms if a.checkpoint_merge is not None]
    if not specs:
        return []
    evaluator = None
    out = []
    for arm in specs:
        runs, row = arms[arm.name], next(r for r in rows if r["arm"] == arm.name)
        metric = row["metric"]
        val, val_loss, held, held_final = [], [], [], []
        for seed in runs.curves:
            ft = cfg.finetune_config(arm, runs.lr, seed)
            evaluator = evaluator or AdapterEvaluator(cfg.base, cfg.chat_template)
            run_dir = cfg.run_dir(arm, runs.lr, seed)
            merged = merge_run(run_dir, arm.checkpoint_merge)
            if ft.eval:
                v = evaluator.evaluate(merged, sample_examples(load_jsonl(ft.eval), ft.eval_samples, ft.seed), "val")
                val.append(v[metric])
                val_loss.append(v["loss"])
            if cfg.eval is not None:
                examples = load_jsonl(cfg.eval)
                key = "accuracy" if row.get("heldout_metric") == "accuracy" else "loss"
                held.append(evaluator.evaluate(merged, examples, "heldout")[key])
                held_final.append(evaluator.evaluate(run_dir / "adapter", examples, "heldout")[key])
        entry = {"arm": arm.name, "rule": arm.checkpoint_merge.label(), "metric": metric, "lr": runs.lr,
                 "final": row["final"], "final_loss": row["final_loss"]}
        if val:
            entry.update(merged=mean_std(val)[0], merged_std=mean_std(val)[1], merged_loss=mean_std(val_loss)[0])
        if held:
            entry.update(heldout_final=mean_std(held_final)[0], heldout_merged=mean_std(held)[0])
        out.append(entry)
    return out


def render_rows(entries: list[dict[str, Any]]) -> list[str]:
    """The report's "Checkpoint merges" section (empty when no arm merges its checkpoints)."""
    if not entries:
        return []

    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    lines = ["## Checkpoint merges (MWA, arXiv 2504.18580)", "",
             "Each run's own checkpoints merged with MWA weights, beside the run's final checkpoint, at the arm's best "
             "LR; validation on the same examples as the run's log, mean over seeds.", "",
             "| arm | rule | final | merged ± std | final loss | merged loss | held-out final | held-out merged |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['arm']} | {e['rule']} | {f(e['final'])} | {f(e.get('merged'))} ± {f(e.get('merged_std'))} | "
                     f"{f(e['final_loss'])} | {f(e.get('merged_loss'))} | {f(e.get('heldout_final'))} | "
                     f"{f(e.get('heldout_merged'))} |")
    return lines + [""]
