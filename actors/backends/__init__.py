"""Backend registry: one line per backend. Imports are lazy so that `vllm` is only imported when chosen."""
from __future__ import annotations

import importlib

from actors.backends.base import Backend
from engine.core.errors import ConfigError

BACKENDS: dict[str, str] = {
    "hf": "actors.backends.hf:HFBackend",
    "vllm": "actors.backends.vllm:VLLMBackend",
}


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ConfigError(f"backend: unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
