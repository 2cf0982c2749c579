"""Merge methods by name. Adding a method: one file defining an instance, plus one line here.

Entries are import paths so that listing names (CLI help, config validation) does not import torch.
"""
from __future__ import annotations

import importlib

from engine.core.errors import ConfigError

METHODS: dict[str, str] = {
    "linear": "engine.merge.linear:LINEAR",
    "cat": "engine.merge.cat:CAT",
    "svd": "engine.merge.svd:SVD",
    "ties": "engine.merge.ties:TIES",
    "dare_linear": "engine.merge.dare_linear:DARE_LINEAR",
    "dare_ties": "engine.merge.dare_ties:DARE_TIES",
    "random-norm": "engine.merge.random_norm:RANDOM_NORM",
}
# Methods that keep the merge's scale and none of the donors' directions: an arm trained from one is a null control,
# which the report never credits as recycling (engine.report.verdict).
NULL_CONTROLS: frozenset[str] = frozenset({"random-norm"})


def get_method(name: str):
    """The method instance, imported on first use; an unknown name is a user error."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown {name!r}; choose one of {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)
