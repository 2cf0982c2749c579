"""`finetune(config) -> FinetuneResult`: the stage's Python entry point, shared by the CLI and `mashup run`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.finetune.config import FinetuneConfig
from engine.finetune.outputs import ADAPTER_DIR, CHECKPOINTS_DIR, read_log
from engine.finetune.preflight import preflight

@dataclass
class FinetuneResult:
    adapter: Path
    log: list[dict[str, Any]]
    seconds: float
    checkpoints: list[Path] = field(default_factory=list)

    def frame(self):
        """The per-step log as a DataFrame (one row per train step and per evaluation)."""
        import pandas as pd

        return pd.DataFrame(self.log)

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.log if r["event"] == "eval"]

    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.log if r["event"] == "train"]


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Train a LoRA from `config.init` (or from scratch) and return where the adapter is and what happened."""
    t0 = time.perf_counter()
    config = config.resolved()
    preflight(config)
    if config.executor == "deepspeed":
        from engine.finetune.deepspeed_ray import run_deepspeed

        run_deepspeed(config)
    else:
        from engine.finetune.single import run_single

        run_single(config)
    out = config.out_path
    checkpoints = sorted((out / CHECKPOINTS_DIR).glob("step-*")) if (out / CHECKPOINTS_DIR).is_dir() else []
    if checkpoints:  # the run's checkpoints as a donor pool with step and training loss (engine/checkpoints.py)
        from engine.core.run_folder import write_manifest

        write_manifest(out)
    return FinetuneResult(out / ADAPTER_DIR, read_log(out), time.perf_counter() - t0, checkpoints)
