"""Checks a finetune makes in the driver, in seconds, before any worker starts (used by every executor)."""
from __future__ import annotations

import logging
import shutil

from engine.core.errors import ConfigError
from engine.finetune.common import check_init_dir, load_task, load_tokenizer
from engine.finetune.config import FinetuneConfig
from engine.finetune.outputs import ADAPTER_DIR, CHECKPOINTS_DIR, LOG_JSONL, LOG_PARQUET

log = logging.getLogger("engine.finetune.api")


def preflight(config: FinetuneConfig) -> None:
    """Fail on user errors (missing files, bad data) in the driver, in seconds, before any worker starts."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(config)
    model_config = AutoConfig.from_pretrained(config.base, trust_remote_code=config.trust_remote_code)
    data = load_task(config, tokenizer, getattr(model_config, "max_position_embeddings", None))
    if config.init is not None:
        check_init_dir(config.init)
    claim_out_dir(config)
    log.info(
        "finetune: %s examples, %s steps x %s, init=%s, executor=%s",
        len(data.train), config.steps, config.batch_size, config.init or "fresh LoRA", config.executor,
    )


def claim_out_dir(config: FinetuneConfig) -> None:
    """A run's outputs never mix with an older run's: refuse, or clear them with `overwrite`. An unfinished run
    of this same config (a matching resumable state, engine/finetune/resume.py) is kept and resumed."""
    from engine.finetune.resume import RAY_TRAIN_DIR, STATE_DIR, has_state

    out = config.out_path
    if not config.overwrite and not (out / ADAPTER_DIR).exists() and has_state(config):
        log.info("finetune: resuming the unfinished run in %s from its saved state", out)
        return
    previous = [out / name for name in (ADAPTER_DIR, CHECKPOINTS_DIR, LOG_JSONL, LOG_PARQUET, STATE_DIR, RAY_TRAIN_DIR)
                if (out / name).exists()]
    if previous and not config.overwrite:
        raise ConfigError(f"out: {out} already holds a finetune run ({previous[0].name}); choose another folder or overwrite")
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if config.executor == "deepspeed" and config.overwrite:
        forget_ray_train_states(config)


def forget_ray_train_states(config: FinetuneConfig) -> None:
    """`overwrite` starts again from step 0: this run's Ray Train states go too, wherever storage_path points."""
    from engine.finetune.resume import local_ray_train_folder, ray_train_name, ray_train_storage

    folder = local_ray_train_folder(config)
    if folder is None:
        log.warning("finetune: overwrite does not clear remote states; delete %s/%s for a run from step 0",
                    ray_train_storage(config), ray_train_name(config))
        return
    shutil.rmtree(folder, ignore_errors=True)
