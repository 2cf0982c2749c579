"""Input paths checked before any work, by one helper that every command and `mashup run` use.

A mistyped path is the most common user error. Left alone, a missing base folder reaches `transformers`, which
takes it for a Hub repo id and fails with several chained huggingface_hub tracebacks. Here it is one line that
names the field and says the folder does not exist. `hf://` and `hf-collection://` values are left to the Hub code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from engine.core.errors import ConfigError

Kind = Literal["base", "file", "adapter", "scores", "donors"]
HUB_PREFIXES = ("hf://", "hf-collection://")


def check_path(field: str, value: str | Path | None, kind: Kind) -> None:
    """Raise ConfigError(one line naming `field`) unless `value` is usable as `kind`; None is not checked.

    Kinds: `base` (a model folder, or hf://…), `file` (a data file), `adapter` (a PEFT adapter folder, or hf://…),
    `scores` (scores.parquet or the folder holding it), `donors` (a folder, a manifest file, hf://… or hf-collection://…).
    """
    if value is None:
        return
    text = str(value)
    if kind in ("base", "donors", "adapter") and text.startswith(HUB_PREFIXES):
        return
    p = Path(text).expanduser()
    if not p.exists():
        what = {"base": "folder", "file": "file", "adapter": "folder", "scores": "path", "donors": "path"}[kind]
        raise ConfigError(f"{field}: {what} does not exist: {text}")
    if kind in ("base", "adapter") and not p.is_dir():
        raise ConfigError(f"{field}: not a folder: {text}")
    if kind == "base" and not (p / "config.json").is_file():
        raise ConfigError(f"{field}: {text} is not a model folder (no config.json)")
    if kind == "adapter" and not (p / "adapter_config.json").is_file():
        raise ConfigError(f"{field}: {text} is not a PEFT adapter directory (no adapter_config.json)")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{field}: not a file: {text}")


def check_paths(config: object, kinds: dict[str, Kind], prefix: str = "") -> None:
    """`check_path` for each named field of a config (lists checked item by item); `prefix` names the section."""
    for field, kind in kinds.items():
        value = getattr(config, field, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            check_path(f"{prefix}{field}", item, kind)
