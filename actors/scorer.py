"""The scoring actor: the base stays resident on its device; donors are fetched, validated and scored here.

Validation and Hub fetches run next to the files, on the node that scores them, so the driver never ships
adapter bytes and never loads the base model.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from actors.backends import get_backend
from actors.backends.base import BASE, DonorRequest, DonorScore
from engine.catalog import DonorEntry
from engine.data import EncodedSample
from engine.errors import DonorError


@dataclass(frozen=True)
class ScoreTask:
    entry: DonorEntry
    int_id: int


def score_row(task: ScoreTask | None, score: DonorScore) -> dict[str, Any]:
    entry = task.entry if task else None
    ok = score.error is None
    return {
        "donor": score.donor,
        "loss": score.loss if ok else math.nan,
        "token_accuracy": score.token_accuracy if ok else math.nan,
        "n_examples": score.n_examples,
        "n_tokens": score.n_tokens,
        "status": "ok" if ok else "failed",
        "error": score.error,
        "seconds": score.seconds,
        "path": entry.path if entry else "",
        "meta": entry.meta if entry else {},
        "revision": entry.revision if entry else None,
    }


class DonorScorer:
    """Plain class; `engine.scoring` wraps it with `ray.remote` and the resources the user asked for."""

    def __init__(self, backend: str, base: str, options: dict[str, Any], validation: dict[str, Any], threads: int = 0):
        import torch

        from engine.hub import resolve_base
        from engine.validate import base_spec

        if threads > 0:
            torch.set_num_threads(threads)
        base = resolve_base(base)
        cls = get_backend(backend)
        self.backend = cls(base, cls.Options.model_validate(options))
        self.spec = base_spec(base, trust_remote_code=self.backend.options.trust_remote_code)
        self.validation = validation

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def resident(self) -> list[str]:
        return self.backend.resident()

    def _prepare(self, task: ScoreTask) -> DonorRequest:
        from engine.hub import fetch
        from engine.validate import validate_donor

        entry = task.entry
        if entry.error:
            raise DonorError(entry.donor, entry.error)
        folder = entry.path
        if entry.is_hub:
            try:
                folder = fetch(entry.path)
            except Exception as exc:  # noqa: BLE001 - network/cache errors are per-donor
                raise DonorError(entry.donor, f"could not fetch {entry.path}: {type(exc).__name__}: {exc}") from None
        validate_donor(entry.donor, folder, self.spec, root=entry.root, **self.validation)
        return DonorRequest(entry.donor, str(folder), task.int_id)

    def score(self, tasks: list[ScoreTask | None], sample: EncodedSample) -> list[dict[str, Any]]:
        """`None` in `tasks` stands for the base model. Returns one row per task, in order."""
        rows: dict[str, dict[str, Any]] = {}
        requests, by_donor = [], {}
        for task in tasks:
            if task is None:
                requests.append(DonorRequest(BASE, "", 0))
                continue
            t0 = time.perf_counter()
            try:
                requests.append(self._prepare(task))
                by_donor[task.entry.donor] = task
            except DonorError as exc:
                rows[task.entry.donor] = score_row(task, DonorScore(task.entry.donor, error=exc.reason,
                                                                    seconds=time.perf_counter() - t0))
        for score in self.backend.score(requests, sample) if requests else []:
            rows[score.donor] = score_row(by_donor.get(score.donor), score)
        return [rows[BASE if t is None else t.entry.donor] for t in tasks]
