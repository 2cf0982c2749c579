"""Shared config machinery: strict pydantic models, YAML loading, and flag-over-file precedence.

Each stage owns its config model in its own module; this file only holds what they share so that every
command validates the same way and reports errors as one line naming the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.core.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem, each naming the dotted field path, joined into one message."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our own validators' words, without pydantic's "Value error, "
        else:
            msg = err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def validate(model_cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def build_config(model_cls: type[T], config_path: str | Path | None, overrides: dict[str, Any]) -> T:
    """Config file first, then every flag the user actually gave (None means 'not given')."""
    data = load_yaml(config_path) if config_path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(model_cls, data, str(config_path) if config_path else "flags")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`dotted.key=value` overrides (values parsed as YAML) applied in place to a config mapping, as torchtune's
    recipes take them; a malformed item or a path through a non-section is a one-line ConfigError."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return data

