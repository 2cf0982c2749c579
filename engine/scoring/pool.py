"""The driver's actor loop: dispatch batches, collect rows, survive dead actors, lost nodes and hung donors.

An actor gets work only once its base model is loaded (its `pid()` call answered). So a replacement the cluster
cannot place, because a lost node took its CPUs with it, never holds a batch hostage: the live actors finish the
job and the unplaced one is cancelled at the end. Failure policy (engine/scoring/api.py): a dead actor costs its batch
a retry on another actor, up to `max_retries` per batch; a batch that raises or outlives `batch_timeout_s` is
split until the culprit is alone, then failed with the reason.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

from tqdm.auto import tqdm

from actors.backends.base import DonorScore
from actors.scorer import DonorScorer, ScoreTask, result_row
from engine.core.donor import DonorEntry
from engine.core.errors import MashupError
from engine.core.fault_hooks import fault_hook_env
from engine.core.scores import BASE_ROW as BASE, set_fields
from engine.core.ray_utils import WORKER_ENV, actor_cpus, cluster_has_gpus, ensure_ray

log = logging.getLogger("mashup.score")
WAIT_WARN_S = 60.0
PLACEMENT_LOG = "placement.jsonl"

Batch = list  # list[ScoreTask | None]; None stands for the base model


@dataclass
class Flight:
    actor: Any
    batch: Batch
    started: float


class ActorPoolRunner:
    """Runs one scoring job over `cfg.actors` actors; rows go to `store` as each batch returns."""

    actor_cls: type = DonorScorer  # a stage that needs more of its actors (engine.scoring.screen) subclasses it
    method = "score"  # the actor method each batch is sent to: (tasks, sample) -> rows

    def __init__(self, cfg, backend_options: dict[str, Any], sample, store):
        self.cfg = cfg
        self.options = backend_options
        self.sample = sample
        self.store = store
        self.validation = {"strict_base_name": cfg.strict_base_name, "check_finite": cfg.check_finite}
        self.attempts: dict[tuple[str, ...], int] = {}
        self.queue: deque[Batch] = deque()
        self.starting: dict[Any, Any] = {}  # pid() ref -> actor still loading its base
        self.idle: list[Any] = []
        self.inflight: dict[Any, Flight] = {}  # score() ref -> what it is working on
        self.target = 0
        self.start_failures = 0
        self.last_progress = time.monotonic()
        self.nodes: dict[str, str] = {}  # node id -> host of every node that returned rows
        self.round = 0  # the cascade's round of the rows this runner writes (0: exhaustive)
        self.local = None  # executor: local's in-process scorer
        self.saved_threads = 0

    def _new_actor(self) -> None:
        import ray

        gpus = self.cfg.gpus_per_actor
        if gpus == "auto":
            gpus = 1 if cluster_has_gpus() else 0
        hooks = fault_hook_env()
        cpus = actor_cpus(self.cfg.cpus_per_actor, self.cfg.actors)
        cls = ray.remote(self.actor_cls).options(**placement_options(self.cfg, gpus, cpus), max_restarts=0,
                                              max_task_retries=0, runtime_env={"env_vars": {**WORKER_ENV, **hooks}})
        threads = max(1, int(cpus))
        actor = cls.remote(self.cfg.backend, self.cfg.base, self.options, self.validation, threads,
                           self.cfg.hub_concurrency)
        self.starting[actor.pid.remote()] = actor

    def _rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            set_fields(row, backend=row.get("backend") or self.cfg.backend, sample_id=self.sample.fingerprint,
                       round=self.round, base_fingerprint=self.sample.base_fingerprint)
        return rows

    def _fail(self, batch: Batch, reason: str) -> list[dict[str, Any]]:
        return self._rows([result_row(t, DonorScore(BASE if t is None else t.entry.donor, error=reason)) for t in batch])

    @property
    def live(self) -> int:
        return len(self.idle) + len(self.starting) + len(self.inflight)

    def run(self, entries: list[DonorEntry], include_base: bool, summary, *,
            ids: Mapping[str, int] | None = None, keep_actors: bool = False) -> None:
        """Score `entries` (and the base) until every one has exactly one row in the store.

        A caller that runs several jobs on the same actors (the cascade's rounds) passes `keep_actors=True`, then
        `close()`, and `ids` that stay stable across runs: backends key resident adapters by these integer ids.
        """
        tasks: list[ScoreTask | None] = [ScoreTask(e, ids[e.donor] if ids else i + 1) for i, e in enumerate(entries)]
        n = self.cfg.donors_per_call
        self.queue = deque(tasks[i:i + n] for i in range(0, len(tasks), n))
        # The base goes first and alone: a backend that cannot run the base stops the job before any donor.
        self.base_pending = include_base
        if include_base:
            self.queue.appendleft([None])
        self.target = min(self.cfg.actors, len(self.queue))
        tasks = [None, *tasks] if include_base else tasks
        bar = tqdm(total=len(tasks), unit="donor", desc="scoring", dynamic_ncols=True)
        if self.cfg.executor == "local":
            try:
                self._run_here(summary, bar)
            finally:
                bar.close()
                if not keep_actors:
                    self.close()
            return
        import ray

        ensure_ray(self.cfg.ray_address)
        summary.mark("ray_ready")
        sample_ref = ray.put(self.sample)
        try:
            while self.queue or self.inflight:
                while self.live < self.target and self.queue:
                    self._new_actor()
                while self.idle and self.queue and not (self.base_pending and self.queue[0] != [None]):
                    actor, batch = self.idle.pop(), self.queue.popleft()
                    ref = getattr(actor, self.method).remote(batch, sample_ref)
                    self.inflight[ref] = Flight(actor, batch, time.monotonic())
                done, _ = ray.wait([*self.inflight, *self.starting], num_returns=1, timeout=1.0)
                for ref in done:
                    if ref in self.starting:
                        self._started(ref)
                        summary.mark("scorer_ready")
                    else:
                        self._returned(ref, summary, bar)
                self._check_timeouts(summary, bar)
                self._warn_if_stalled()
        except BaseException:
            self.close()
            raise
        finally:
            bar.close()
            if self.nodes:
                log.info("donors fetched and scored on %d node(s): %s", len(self.nodes),
                         ", ".join(f"{host} ({node[:8]})" for node, host in sorted(self.nodes.items())))
        if not keep_actors:
            self.close()

    def _run_here(self, summary, bar) -> None:
        """executor: local. The same queue, splitting and rows as the actors get, run by one scorer in this process:
        no Ray to start and no actor process to import torch into, at the price of the isolation (no retry after a
        crash, no timeout)."""
        if self.local is None:
            import torch

            self.saved_threads = torch.get_num_threads()
            cpus = self.cfg.cpus_per_actor
            threads = self.saved_threads if cpus == "auto" else max(1, int(cpus))
            try:
                self.local = self.actor_cls(self.cfg.backend, self.cfg.base, self.options, self.validation, threads,
                                            self.cfg.hub_concurrency)
            except Exception as exc:  # noqa: BLE001 - one line, as a Ray actor's start failure is reported
                torch.set_num_threads(self.saved_threads)
                raise MashupError(f"the {self.cfg.backend} scorer could not start in this process (executor: local): "
                                  f"{_one_line(exc)}") from None
        summary.mark("scorer_ready")
        while self.queue:
            batch = self.queue.popleft()
            try:
                rows = self._rows(getattr(self.local, self.method)(batch, self.sample))
            except Exception as exc:  # noqa: BLE001 - the batch's failure, isolated like an actor's
                self._split_or_fail(batch, f"backend error: {_one_line(exc)}", summary, bar)
                continue
            self._record(rows, summary, bar)

    def close(self) -> None:
        """Kill every actor this runner holds (or free the in-process scorer)."""
        if self.local is not None:
            import torch

            self.local = None
            torch.set_num_threads(self.saved_threads)
            return
        import ray

        for actor in [*self.idle, *self.starting.values(), *(f.actor for f in self.inflight.values())]:
            ray.kill(actor, no_restart=True)
        self.idle, self.starting, self.inflight = [], {}, {}

    def _started(self, ref) -> None:
        import ray

        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            ray.kill(actor, no_restart=True)
            self.start_failures += 1
            reason = _one_line(exc)
            log.warning("a scoring actor failed to start (%d so far): %s", self.start_failures, reason)
            if self.start_failures > self.target * (self.cfg.max_retries + 1):
                raise MashupError(f"scoring actors keep failing to start ({self.start_failures} tries): {reason}") from None
            return
        self.idle.append(actor)

    def _returned(self, ref, summary, bar) -> None:
        import ray

        flight = self.inflight.pop(ref)
        try:
            rows = self._rows(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:  # the call raised; the actor itself is fine
            self.idle.append(flight.actor)
            self._split_or_fail(flight.batch, f"backend error: {_one_line(exc)}", summary, bar)
            return
        except ray.exceptions.RayError as exc:  # the actor died (killed, OOM, lost node) or its result was lost
            ray.kill(flight.actor, no_restart=True)
            self._actor_died(exc, flight.batch, summary, bar)
            return
        self.idle.append(flight.actor)
        self._record(rows, summary, bar)

    def _record(self, rows: list[dict[str, Any]], summary, bar) -> None:
        base = next((r for r in rows if r["donor"] == BASE), None)
        if base is not None:
            self.base_pending = False
            if base["status"] != "ok":
                hint = ("; try --backend hf (score.backend: hf)" if self.cfg.backend != "hf"
                        else "; check the base model and the backend_options")
                raise MashupError(f"the {self.cfg.backend} backend cannot score the base model {self.cfg.base}: "
                                  f"{base['error']}. No donor was scored{hint}")
        self._log_placement(rows)
        self.store.append(rows)
        self.last_progress = time.monotonic()
        if any(row["donor"] != BASE for row in rows):
            summary.mark("first_donor")
        for row in rows:
            if row["status"] == "ok":
                summary.scored += 1
            else:
                summary.failed += 1
                summary.failures[row["donor"]] = row["error"]
        bar.update(len(rows))
        bar.set_postfix(failed=summary.failed, retries=summary.retries, refresh=False)

    def _log_placement(self, rows: list[dict[str, Any]]) -> None:
        """Where each donor was fetched and scored, one JSON line per row in `<out>/placement.jsonl`."""
        lines = []
        for row in rows:
            where = row.pop("placement", None)
            if where:
                self.nodes.setdefault(where["node"], where["host"])
                lines.append(json.dumps({"donor": row["donor"], "sample_id": row.get("sample_id"),
                                         "round": row.get("round"), **where}) + "\n")
        if lines:
            with (self.store.dir / PLACEMENT_LOG).open("a", encoding="utf-8") as fh:
                fh.writelines(lines)

    def _actor_died(self, exc: Exception, batch: Batch, summary, bar) -> None:
        key = tuple(BASE if t is None else t.entry.donor for t in batch)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        summary.retries += 1
        log.warning("actor died while scoring %d donors (retry %d/%d): %s",
                    len(batch), self.attempts[key], self.cfg.max_retries, type(exc).__name__)
        if self.attempts[key] > self.cfg.max_retries:
            self._split_or_fail(batch, f"actor died {self.attempts[key]} times scoring this batch", summary, bar)
        else:
            self.queue.appendleft(batch)

    def _split_or_fail(self, batch: Batch, reason: str, summary, bar) -> None:
        """Isolate the culprit: a multi-donor batch is requeued one donor at a time; a single donor fails."""
        if len(batch) > 1:
            log.warning("isolating a batch of %d donors (%s)", len(batch), reason)
            self.queue.extendleft([t] for t in reversed(batch))
        else:
            self._record(self._fail(batch, reason), summary, bar)

    def _check_timeouts(self, summary, bar) -> None:
        """Checked every turn of the loop, so that other actors' steady results cannot starve it."""
        import ray

        limit = self.cfg.batch_timeout_s or math.inf
        now = time.monotonic()
        for ref, flight in list(self.inflight.items()):
            if now - flight.started > limit:
                del self.inflight[ref]
                ray.kill(flight.actor, no_restart=True)
                summary.retries += 1
                log.warning("a batch of %d donors exceeded %.0fs; killed its actor", len(flight.batch), limit)
                self._split_or_fail(flight.batch, f"timed out after {limit:.0f}s", summary, bar)

    def _warn_if_stalled(self) -> None:
        if not self.inflight and self.starting and time.monotonic() - self.last_progress > WAIT_WARN_S:
            log.warning("waiting for %d scoring actors to be placed (does a node have the CPUs, GPUs, "
                        "actor_resources and node_labels asked for?)", len(self.starting))
            self.last_progress = time.monotonic()


def placement_options(cfg, gpus: float, cpus: float) -> dict[str, Any]:
    """Ray options that decide where an actor may run: its CPUs/GPUs, any custom resources (a node advertises
    them with `ray start --resources`) and node labels (`ray start --labels`), spread over nodes or packed."""
    opts: dict[str, Any] = {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "scheduling_strategy": "SPREAD" if cfg.placement == "spread" else "DEFAULT",
    }
    if cfg.actor_resources:
        opts["resources"] = dict(cfg.actor_resources)
    if cfg.node_labels:
        opts["label_selector"] = dict(cfg.node_labels)
    return opts


def _one_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
