"""Fault-injection gates for the fault tests, inert unless their variables are set.

A gate announces that a piece of work is in flight (`<folder>/entered-<pid>.json`: its pid, node and whatever the
caller adds) and holds it until `<folder>/release` exists. A fault test waits for the marker, strikes (SIGKILL, node
removal), then releases: the fault lands inside the work on any machine, however fast. A released gate stays open,
so a retried or restarted attempt passes straight through. Drivers forward every MASHUP_TEST_* variable to the
processes they start (scoring actors, Ray Train workers).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

FAULT_HOOK_PREFIX = "MASHUP_TEST_"
GATE_DIR_HOOK = "MASHUP_TEST_GATE_DIR"
GATE_RELEASE = "release"


def fault_hook_env() -> dict[str, str]:
    """The MASHUP_TEST_* variables of this process, for the workers it starts."""
    return {k: v for k, v in os.environ.items() if k.startswith(FAULT_HOOK_PREFIX)}


def fault_gate(hook: str, matches: Callable[[str], bool], where: dict[str, Any], subfolder: str = "") -> None:
    """Hold here when `hook` is set, `matches(its value)` and the gate folder is set; otherwise return at once.
    `subfolder` gives each of several gates in one job its own markers and release."""
    from engine.core.atomic import atomic_write_text

    wanted, folder = os.environ.get(hook), os.environ.get(GATE_DIR_HOOK)
    if not wanted or not folder or not matches(wanted):
        return
    gate = Path(folder) / subfolder
    gate.mkdir(parents=True, exist_ok=True)
    if (gate / GATE_RELEASE).exists():
        return
    atomic_write_text(gate / f"entered-{os.getpid()}.json", json.dumps({"pid": os.getpid(), "node": _node_id(), **where}))
    while not (gate / GATE_RELEASE).exists():
        time.sleep(0.02)


def _node_id() -> str | None:
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()
