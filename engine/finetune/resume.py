"""Resumable finetune state: what a killed run needs to continue exactly where its last save left it.

Every `save_every` steps (and, single executor, when the run is asked to stop by SIGTERM or SIGINT) each rank saves
its part: the trainable LoRA tensors, the optimizer (AdamW's moments and step counts; under DeepSpeed, this rank's
ZeRO partition of them and of the float32 master weights), the scheduler's counters and the torch RNG states. The
data order needs nothing more: it is a function of the seed and the step (engine.finetune.common.BatchPlan). A state
folder holds `state.json` (the step, the world size and the run's identity) and one `rank-<r>.safetensors` +
`rank-<r>.json` per rank (engine/finetune/state_codec.py), so loading a state never unpickles anything.

Where the folder lives is the executor's: the single executor writes `<out>/state/` atomically (`LocalStates`);
the DeepSpeed executor reports each state to Ray Train as a checkpoint, which Ray Train hands back to the workers it
restarts after a fault (engine/finetune/deepspeed_ray.py). A state records the run's identity (FinetuneConfig.
identity: the init adapter's fingerprint, the base, the data files' sha256 and every option that changes training)
and is used only by a run with the same identity; any other state is discarded and the run starts from step 0.

Resumed, a run gives the same losses as an uninterrupted one: bit for bit on one CPU process (tests/engine/finetune/
test_resume.py), to the gloo reduction's noise under DeepSpeed (tests/reliability/test_finetune_faults.py). Its
`seconds` keep counting from the last row the killed run logged, so the work lost between the last state and the
kill stays in the wall-clock; a `resume` row in log.jsonl says from which step it went on.
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
from engine.finetune.state_codec import read_tree, write_tree

log = logging.getLogger("engine.finetune.resume")

STATE_DIR = "state"
RAY_TRAIN_DIR = "ray_train"
META = "state.json"


@dataclass
class ResumeState:
    step: int
    meta: dict[str, Any]
    parts: list[Any]  # one decoded state dict per rank, in rank order (a single-process run has one)


def rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def load_trainable(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Copy a state's trainable tensors into the model's, refusing a state that holds other tensors."""
    if set(saved) != set(params):
        raise RuntimeError(f"finetune state holds other trainable tensors than the model ({len(saved)} vs {len(params)})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def write_state(folder: Path, step: int, rank: int, world_size: int, part: Any, identity: dict[str, Any]) -> None:
    """One rank's part of a state (`rank-<r>.safetensors` + `.json`); rank 0 also writes the meta (step, identity)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tree(folder, f"rank-{rank}", part)
    if rank == 0:
        (folder / META).write_text(json.dumps({"step": step, "world_size": world_size, "identity": identity}, indent=1))


def read_state(folder: Path, identity: dict[str, Any]) -> ResumeState | None:
    """The state in `folder` when it belongs to a run with this identity and is whole; None (and why, logged) else."""
    try:
        meta = json.loads((folder / META).read_text())
        recorded, world_size = meta["identity"], int(meta["world_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("finetune state in %s is unreadable; starting again from step 0", folder)
        return None
    if recorded != identity:
        moved = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        log.warning("finetune state in %s belongs to another run (%s differ); starting again from step 0",
                    folder, ", ".join(moved))
        return None
    try:
        parts = [read_tree(folder, f"rank-{r}") for r in range(world_size)]
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        log.warning("finetune state in %s is incomplete (%s); starting again from step 0", folder, exc)
        return None
    return ResumeState(int(meta["step"]), meta, parts)


def save_state(out: Path, step: int, part: Any, identity: dict[str, Any]) -> Path:
    """`<out>/state/` of a single-process run, replaced in one rename: a kill mid-write keeps the old one."""
    final = out / STATE_DIR
    with atomic_dir(final) as tmp:
        write_state(tmp, step, 0, 1, part, identity)
    return final


def load_state(out: Path, identity: dict[str, Any]) -> ResumeState | None:
    """The state in `out` when it belongs to a run with this identity; None (and the state removed) otherwise."""
    if not (out / STATE_DIR / META).is_file():
        return None
    state = read_state(out / STATE_DIR, identity)
    if state is None:
        discard(out)
    return state


def matching_state(out: Path, identity: dict[str, Any]) -> bool:
    """Whether `out` holds a state this run can resume from (read without loading its tensors)."""
    try:
        meta = json.loads((out / STATE_DIR / META).read_text())
        return meta["identity"] == identity and all(
            (out / STATE_DIR / f"rank-{r}.safetensors").is_file() for r in range(int(meta["world_size"])))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return False


def ray_train_storage(cfg: Any) -> str:
    """Where a DeepSpeed run's Ray Train keeps its states: `deepspeed.storage_path`, or `<out>/ray_train`."""
    return cfg.deepspeed.storage_path or str(cfg.out_path / RAY_TRAIN_DIR)


def ray_train_name(cfg: Any) -> str:
    """The Ray Train run name, from the run's identity and its out folder: a rerun of the same run finds its states;
    another config, init or data never does, nor the same config writing to another folder (a shared storage_path
    serves many runs)."""
    from engine.core.identity import key_of

    return f"finetune-{key_of({**cfg.identity(), 'out': str(cfg.out_path)})[:16]}"


def local_ray_train_folder(cfg: Any) -> Path | None:
    """This DeepSpeed run's folder in its Ray Train storage, when that storage is a local (or mounted) path; None
    for an object store URI (s3://...), which mashup never looks into."""
    storage = ray_train_storage(cfg)
    return None if "://" in storage else Path(storage) / ray_train_name(cfg)


def has_state(cfg: Any) -> bool:
    """Whether this run (either executor) has a state of its own to resume from, read without loading tensors.
    A DeepSpeed run whose states live on remote storage (s3://...) is not looked into: Ray Train finds them."""
    identity = cfg.identity()
    if cfg.executor != "deepspeed":
        return matching_state(cfg.out_path, identity)
    run_folder = local_ray_train_folder(cfg)
    for folder in run_folder.glob("state-*") if run_folder is not None else []:
        try:
            if json.loads((folder / META).read_text())["identity"] == identity:
                return True
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return False


class LocalStates:
    """The single executor's states: `<out>/state/`, written every `save_every` steps and removed when the run ends."""

    def __init__(self, out: Path, identity: dict[str, Any]):
        self.out, self.identity = out, identity

    def load(self) -> ResumeState | None:
        return load_state(self.out, self.identity)

    def save(self, step: int, part: Any) -> None:
        save_state(self.out, step, part, self.identity)

    def finish(self) -> None:
        discard(self.out)


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
