"""The test side of the scorer's gate hook (actors/scorer.py, `MASHUP_TEST_GATE_DONOR`): a fault test waits until
a scoring call is known to be inside its batch, strikes, then releases the gate, whatever the machine's speed.

Imported by the tests and by cluster_job.py (as a sibling module), so it imports nothing from the repository.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

GATE_DONOR, GATE_DIR, RELEASE = "MASHUP_TEST_GATE_DONOR", "MASHUP_TEST_GATE_DIR", "release"


def gate_env(folder: Path, donor: str) -> dict[str, str]:
    """The variables that hold every scoring call which includes `donor` at the gate in `folder`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {GATE_DONOR: donor, GATE_DIR: str(folder)}


def wait_until(ready: Callable[[], object], job_alive: Callable[[], bool], what: str, timeout_s: float = 240) -> object:
    """`ready()`'s first truthy value, polled; fails (naming `what`) if the job ends first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        assert job_alive(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"not in {timeout_s:.0f}s: {what}"
        time.sleep(0.02)


def wait_entered(folder: Path, job_alive: Callable[[], bool], timeout_s: float = 240) -> dict:
    """The first call that reached the gate: its pid, node and donors. Polls for the call's own marker file (the
    gate holds the call until `release`, so the marker cannot be missed); fails if the job ends first."""
    def entered() -> dict | None:
        found = sorted(Path(folder).glob("entered-*.json"))
        return json.loads(found[0].read_text()) if found else None

    return wait_until(entered, job_alive, "any scoring call reached the gate", timeout_s)


def wait_gone(pid: int, timeout_s: float = 60) -> None:
    """Until process `pid` no longer exists: a released gate must not let a dying actor finish its batch."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its parent
                return
        except psutil.NoSuchProcess:
            return
        assert time.monotonic() < deadline, f"process {pid} still runs {timeout_s:.0f}s after it was struck"
        time.sleep(0.02)


def release(folder: Path) -> None:
    """Open the gate: the held call (if it still lives) and every later one go on."""
    (Path(folder) / RELEASE).touch()
