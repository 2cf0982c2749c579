"""The scoring actor: the base stays resident on its device; donors are fetched, validated and scored here.

Validation and Hub fetches run next to the files, on the node that scores them, so the driver never ships
adapter bytes and never loads the base model. A call's Hub donors are downloaded together, `fetch_workers` at a
time, into this node's HF cache; each row says which node, host and process fetched and scored it.

A donor can leave the backend unable to score anything (a PEFT wrapper that refuses mixed batches stays in the
model after its donor is evicted); the actor notices with a one-example probe of the base, rebuilds the backend
and rescores that call's failures one at a time.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from actors.backends import get_backend
from actors.backends.base import DonorRequest, DonorScore
from engine.core.donor import DonorEntry
from engine.core.data import EncodedSample
from engine.core.errors import DonorError
from engine.core.fault_hooks import fault_gate
from engine.core.scores import BASE_ROW as BASE, score_row, set_fields

# Fault-injection hooks, inert unless set (engine/core/fault_hooks.py); the driver forwards them to its actors.
HANG_HOOK = "MASHUP_TEST_HANG_DONOR"  # a donor id: any call that includes it sleeps (a stand-in for a hung backend)
GATE_HOOK = "MASHUP_TEST_GATE_DONOR"  # a donor id: a call that includes it waits at the gate (MASHUP_TEST_GATE_DIR)


@dataclass(frozen=True)
class ScoreTask:
    entry: DonorEntry
    int_id: int


def result_row(task: ScoreTask | None, score: DonorScore) -> dict[str, Any]:
    """A backend's result (or a donor's failure) as a score row (engine/core/scores.py), with the donor's path,
    metadata and revision from its task; the driver fills in the sample, round and base it was scored against."""
    entry = task.entry if task else None
    ok = score.error is None
    return score_row(
        score.donor,
        loss=score.loss if ok else math.nan,
        token_accuracy=score.token_accuracy if ok else math.nan,
        n_examples=score.n_examples,
        n_tokens=score.n_tokens,
        nll_sq_sum=score.nll_sq_sum,
        nll_tok_sum=score.nll_tok_sum,
        tok_sq_sum=score.tok_sq_sum,
        example_nll=score.example_nll if ok else None,
        example_tokens=score.example_tokens if ok else None,
        status="ok" if ok else "failed",
        error=score.error,
        seconds=score.seconds,
        path=entry.path if entry else "",
        meta=entry.meta if entry else {},
        revision=entry.revision if entry else None,
        backend=score.backend,
    )


class DonorScorer:
    """Plain class; `engine.scoring` wraps it with `ray.remote` and the resources the user asked for."""

    def __init__(self, backend: str, base: str, options: dict[str, Any], validation: dict[str, Any], threads: int = 0,
                 fetch_workers: int = 4):
        import torch
        from transformers.utils import logging as hf_logging

        from engine.core.hub import resolve_base
        from engine.core.validate import base_spec

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor and rebuild is noise in the job log
        if threads > 0:
            torch.set_num_threads(threads)
        self.base = resolve_base(base)
        self.backend_cls = get_backend(backend)
        self.options = self.backend_cls.Options.model_validate(options)
        self.backend = self.backend_cls(self.base, self.options)
        self.spec = base_spec(self.base, trust_remote_code=self.options.trust_remote_code)
        self.validation = validation
        self.fetch_workers = fetch_workers
        self.rebuilds = 0
        self.layouts: dict = {}  # parsed headers, shared by donors of one shape (bounded by open_adapter)
        self.where = {"node": self.node(), "host": socket.gethostname(), "pid": os.getpid(),
                      "threads": torch.get_num_threads()}

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node id, or "local" for the in-process scorer (executor: local), which never imports Ray (half a
        second of its start-up): a process that has not imported Ray is not running in it."""
        ray = sys.modules.get("ray")
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"

    def resident(self) -> list[str]:
        return self.backend.resident()

    def _prepare(self, task: ScoreTask, fetched: dict[str, str | BaseException]) -> tuple[DonorRequest, ScoreTask]:
        """The request for one donor, and its task as scored: a Hub donor's path and revision name the commit
        this node's cache actually holds, which is what its row records."""
        from engine.core.adapter import WEIGHTS_FILE, fingerprint, stat_signature
        from engine.core.weights import read_weights
        from engine.core.hub import HubRef, hub_error, snapshot_commit
        from engine.core.validate import check_finite_weights, validate_donor

        entry = task.entry
        if entry.error:
            raise DonorError(entry.donor, entry.error)
        folder = entry.path
        if entry.is_hub:
            got = fetched[entry.path]
            if isinstance(got, BaseException):
                raise DonorError(entry.donor, hub_error(entry.path, got))
            folder, commit = got, snapshot_commit(got)
            uri = HubRef(HubRef.parse(entry.path).repo_id, commit).uri
            task = ScoreTask(replace(entry, path=uri, revision=commit), task.int_id)
        options = dict(self.validation)
        check = options.pop("check_finite", True)
        validate_donor(entry.donor, folder, self.spec, root=entry.root, check_finite=False, layouts=self.layouts,
                       **options)
        # What this row is computed from: the bytes hashed here, next to the files (the driver never reads them).
        # The stat comes first: a file rewritten after it no longer matches it, so its row is not reused.
        stat = stat_signature(folder)
        weights = Path(folder) / WEIGHTS_FILE
        loaded = read_weights(weights)  # small files: one read for the hash, the check and the slot load
        if check:
            tensors, flat = (loaded.tensors, loaded.flat) if loaded else (None, None)
            check_finite_weights(entry.donor, weights, tensors, flat)
        self.identity[entry.donor] = {"donor_sha256": fingerprint(folder, loaded.sha256 if loaded else None),
                                      "donor_stat": stat}
        return DonorRequest(entry.donor, str(folder), task.int_id, tensors=loaded.tensors if loaded else None), task

    def score(self, tasks: list[ScoreTask | None], sample: EncodedSample) -> list[dict[str, Any]]:
        """`None` in `tasks` stands for the base model. Returns one row per task, in order."""
        from engine.core.hub import fetch_all

        hub = [t.entry.path for t in tasks if t is not None and t.entry.is_hub and not t.entry.error]
        fetched = fetch_all(hub, self.fetch_workers)
        rows: dict[str, dict[str, Any]] = {}
        requests, by_donor = [], {}
        self.identity: dict[str, dict[str, str | None]] = {}
        for task in tasks:
            if task is None:
                requests.append(DonorRequest(BASE, "", 0))
                continue
            t0 = time.perf_counter()
            try:
                request, scored = self._prepare(task, fetched)
                requests.append(request)
                by_donor[task.entry.donor] = scored
            except DonorError as exc:
                rows[task.entry.donor] = result_row(task, DonorScore(task.entry.donor, error=exc.reason,
                                                                     seconds=time.perf_counter() - t0))
        hang = os.environ.get(HANG_HOOK)
        if hang and hang in by_donor:
            time.sleep(3600)
        donors = list(by_donor)
        fault_gate(GATE_HOOK, lambda donor: donor in donors, {**self.where, "donors": donors})
        for score in self._score_recovering(requests, sample) if requests else []:
            rows[score.donor] = set_fields(result_row(by_donor.get(score.donor), score),
                                           **self.identity.get(score.donor, {}))
        out = [rows[BASE if t is None else t.entry.donor] for t in tasks]
        for row, task in zip(out, tasks):
            row["placement"] = {**self.where, "source": "hub" if task and task.entry.is_hub else "path"}
        return out

    def _score_recovering(self, requests: list[DonorRequest], sample: EncodedSample) -> list[DonorScore]:
        """Backend scores; when some failed and the backend can no longer score the base, rebuild and rescore
        the failures alone, rebuilding again after each one that still fails and leaves the backend broken."""
        try:
            scores = {s.donor: s for s in self.backend.score(requests, sample)}
        except Exception:
            if not self._healthy(sample):  # the driver splits the call; the pieces must find a working backend
                self._rebuild()
            raise
        failed = [r for r in requests if scores[r.donor].error]
        if failed and not self._healthy(sample):
            self._rebuild()
            for req in failed:
                [scores[req.donor]] = self.backend.score([req], sample)
                if scores[req.donor].error and not self._healthy(sample):
                    self._rebuild()
        return [scores[r.donor] for r in requests]

    def _healthy(self, sample: EncodedSample) -> bool:
        probe = EncodedSample(sample.examples[:1], f"{sample.fingerprint}-probe")
        try:
            [score] = self.backend.score([DonorRequest(BASE, "", 0)], probe)
        except Exception:  # noqa: BLE001 - any failure of the probe means the backend is unusable
            return False
        return score.error is None

    def _rebuild(self) -> None:
        import gc

        self.backend = None
        gc.collect()
        try:
            self.backend = self.backend_cls(self.base, self.options)
        except BaseException:  # an actor without a backend is useless: die, so the driver retries elsewhere
            os._exit(1)
        self.rebuilds += 1
