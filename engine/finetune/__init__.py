"""LoRA finetuning from a merged init (or from scratch, the baseline) with per-step logs and evaluations."""
from engine.finetune.api import FinetuneResult, finetune
from engine.finetune.config import DeepSpeedSettings, FinetuneConfig, FinetuneSettings, LoraSettings

__all__ = ["DeepSpeedSettings", "FinetuneConfig", "FinetuneResult", "FinetuneSettings", "LoraSettings", "finetune"]
