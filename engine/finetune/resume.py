"""Resumable finetune state: what a killed run needs to continue exactly where its last save left it.

Every `save_every` steps, and when the run is asked to stop (SIGTERM or SIGINT), the single executor writes
`<out>/state/` atomically: the trainable LoRA tensors, AdamW's moments and step counts, the scheduler's counters,
the torch RNG states, and the step. The data order needs nothing more: it is a function of the seed and the step
(engine.finetune.common.BatchPlan). Tensors go to safetensors and everything else to JSON, so loading a state never
unpickles anything. A state records the run's identity (FinetuneConfig.identity: the init adapter's fingerprint,
the base, the data files' sha256 and every option that changes training) and is used only by a run with the same
identity; any other state is discarded and the run starts again from step 0.

Resumed, a run gives the same losses as an uninterrupted one, bit for bit on one CPU process (tests/engine/finetune/
test_resume.py). Its `seconds` keep counting from the last row the killed run logged, so the work lost between the
last state and the kill stays in the wall-clock; a `resume` row in log.jsonl says from which step it went on.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.atomic import atomic_dir

log = logging.getLogger("engine.finetune.resume")

STATE_DIR = "state"
TENSORS = "state.safetensors"
META = "state.json"


@dataclass
class ResumeState:
    step: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def save_state(out: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
               identity: dict[str, Any]) -> Path:
    """`<out>/state/` for `step`, replacing the previous one in one rename: a kill mid-write keeps the old one."""
    from safetensors.torch import save_file

    tensors = {f"model/{name}": p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{idx}/{key}"] = value.detach().contiguous().cpu()
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {"step": step, "identity": identity, "param_groups": opt["param_groups"], "optimizer_scalars": opt_scalars,
            "optimizer_slots": sorted(opt["state"]), "scheduler": scheduler.state_dict()}
    final = out / STATE_DIR
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return final


def load_state(out: Path, identity: dict[str, Any]) -> ResumeState | None:
    """The state in `out` when it belongs to a run with this identity; None (and the state removed) otherwise."""
    folder = out / STATE_DIR
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        return None
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / META).read_text())
        recorded = meta["identity"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("finetune state in %s is unreadable; starting again from step 0", folder)
        discard(out)
        return None
    if recorded != identity:
        moved = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        log.warning("finetune state in %s belongs to another run (%s differ); starting again from step 0",
                    folder, ", ".join(moved))
        discard(out)
        return None
    return ResumeState(int(meta["step"]), meta, load_file(str(folder / TENSORS)))


def matching_state(out: Path, identity: dict[str, Any]) -> bool:
    """Whether `out` holds a state this run can resume from (read without loading its tensors)."""
    try:
        return json.loads((out / STATE_DIR / META).read_text())["identity"] == identity and \
            (out / STATE_DIR / TENSORS).is_file()
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False


def restore(state: ResumeState, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Put the model's trainable tensors, the optimizer, the scheduler and the RNGs back as they were saved."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("model/"):] for k in state.tensors if k.startswith("model/")}
    if saved != set(params):
        raise RuntimeError(f"finetune state holds other trainable tensors than the model ({len(saved)} vs {len(params)})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.tensors[f"model/{name}"])
    meta = state.meta
    slots = {}
    for idx in meta["optimizer_slots"]:
        prefix = f"optimizer/{idx}/"
        slot = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}
        slot.update(meta["optimizer_scalars"].get(str(idx), {}))
        slots[int(idx)] = slot
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(state.tensors["rng/cpu"])
    cuda = [state.tensors[k] for k in sorted(state.tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def discard(out: Path) -> None:
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


class StopRequest:
    """SIGTERM / SIGINT ask the run to stop after its current step, once its state is saved (a clean stop).
    Installed only from the main thread (signal handlers cannot be set elsewhere, e.g. in a Ray Tune trial)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StoppedCleanly(SystemExit):
    """Raised once the state is saved after a stop request; the exit status says which signal asked."""

    def __init__(self, signum: int, step: int, out: Path):
        super().__init__(128 + signum)
        self.step, self.out = step, out
