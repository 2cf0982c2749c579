"""`finetune(config) -> FinetuneResult`: the stage's Python entry point, shared by the CLI and `mashup run`."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.finetune.common import check_init_dir, load_task, load_tokenizer
from engine.finetune.config import FinetuneConfig
from engine.finetune.outputs import ADAPTER_DIR, CHECKPOINTS_DIR, LOG_JSONL, LOG_PARQUET, read_log

log = logging.getLogger(__name__)


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
    _preflight(config)
    if config.executor == "deepspeed":
        from engine.finetune.deepspeed_ray import run_deepspeed

        run_deepspeed(config)
    else:
        from engine.finetune.single import run_single

        run_single(config)
    out = config.out_path
    checkpoints = sorted((out / CHECKPOINTS_DIR).glob("step-*")) if (out / CHECKPOINTS_DIR).is_dir() else []
    if checkpoints:  # the run's checkpoints as a donor pool with step and training loss (engine/checkpoints.py)
        from engine.checkpoints import write_manifest

        write_manifest(out)
    return FinetuneResult(out / ADAPTER_DIR, read_log(out), time.perf_counter() - t0, checkpoints)


def _preflight(config: FinetuneConfig) -> None:
    """Fail on user errors (missing files, bad data) in the driver, in seconds, before any worker starts."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(config)
    model_config = AutoConfig.from_pretrained(config.base, trust_remote_code=config.trust_remote_code)
    data = load_task(config, tokenizer, getattr(model_config, "max_position_embeddings", None))
    if config.init is not None:
        check_init_dir(config.init)
    _claim_out_dir(config)
    log.info(
        "finetune: %s examples, %s steps x %s, init=%s, executor=%s",
        len(data.train), config.steps, config.batch_size, config.init or "fresh LoRA", config.executor,
    )


def _claim_out_dir(config: FinetuneConfig) -> None:
    """A run's outputs never mix with an older run's: refuse, or clear them with `overwrite`."""
    out = config.out_path
    previous = [out / name for name in (ADAPTER_DIR, CHECKPOINTS_DIR, LOG_JSONL, LOG_PARQUET) if (out / name).exists()]
    if previous and not config.overwrite:
        raise ConfigError(f"out: {out} already holds a finetune run ({previous[0].name}); choose another folder or overwrite")
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
