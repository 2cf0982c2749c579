"""mashup: recycle LoRA donors. `engine.select(...)` and `engine.merge(...)` are the script API.

Attributes load on first use so that `import engine` stays cheap (no torch, pandas or Ray).
"""
from __future__ import annotations

from typing import Any

__all__ = ["select", "merge"]


def __getattr__(name: str) -> Any:
    if name == "select":
        from engine.selection import select

        return select
    if name == "merge":
        import engine.merge as merge_package  # callable: engine.merge(...) runs a merge

        return merge_package
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
