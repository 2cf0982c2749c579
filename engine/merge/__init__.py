"""Streaming LoRA merges with a method registry (docs/contracts.md, "Merge semantics").

The script API is `engine.api.merge(...)`; `engine.merge.streaming.merge_with_config` is the config-driven entry.
"""
from __future__ import annotations

from engine.merge.config import MergeConfig, MergeSettings

__all__ = ["MergeConfig", "MergeSettings"]
