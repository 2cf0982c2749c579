"""The driver's actor loop: dispatch batches, collect rows, survive dead actors and hung donors."""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

from tqdm.auto import tqdm

from actors.backends.base import BASE, DonorScore
from actors.scorer import DonorScorer, ScoreTask, score_row
from engine.catalog import DonorEntry
from engine.ray_utils import WORKER_ENV, cluster_has_gpus, ensure_ray

log = logging.getLogger("mashup.score")


class ActorPoolRunner:
    def __init__(self, cfg, backend_options: dict[str, Any], sample, store):
        self.cfg = cfg
        self.options = backend_options
        self.sample = sample
        self.store = store
        self.validation = {"strict_base_name": cfg.strict_base_name, "check_finite": cfg.check_finite}
        self.attempts: dict[tuple, int] = {}
        self.ready: dict[Any, Any] = {}

    def _new_actor(self):
        import ray

        gpus = self.cfg.gpus_per_actor
        if gpus == "auto":
            gpus = 1 if cluster_has_gpus() else 0
        cls = ray.remote(DonorScorer).options(
            num_cpus=self.cfg.cpus_per_actor,
            num_gpus=gpus,
            scheduling_strategy="SPREAD" if self.cfg.placement == "spread" else "DEFAULT",
            max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": WORKER_ENV},
        )
        threads = max(1, int(self.cfg.cpus_per_actor))
        actor = cls.remote(self.cfg.backend, self.cfg.base, self.options, self.validation, threads)
        self.ready[actor._actor_id] = actor.pid.remote()  # the batch timeout starts once the base is loaded
        return actor

    def _rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            row.update(backend=self.cfg.backend, sample_id=self.sample.fingerprint, round=0)
        return rows

    def _fail(self, batch: list[ScoreTask | None], reason: str) -> list[dict[str, Any]]:
        return self._rows([score_row(t, DonorScore(BASE if t is None else t.entry.donor, error=reason)) for t in batch])

    def run(self, entries: list[DonorEntry], include_base: bool, summary) -> None:
        import ray

        ensure_ray(self.cfg.ray_address)
        tasks: list[ScoreTask | None] = [ScoreTask(e, i + 1) for i, e in enumerate(entries)]
        if include_base:
            tasks.insert(0, None)
        n = self.cfg.donors_per_call
        queue = deque(tasks[i:i + n] for i in range(0, len(tasks), n))
        sample_ref = ray.put(self.sample)
        idle = [self._new_actor() for _ in range(min(self.cfg.actors, len(queue)))]
        inflight: dict[Any, tuple[Any, list, float]] = {}
        bar = tqdm(total=len(tasks), unit="donor", desc="scoring", dynamic_ncols=True)
        try:
            while queue or inflight:
                while idle and queue:
                    actor, batch = idle.pop(), queue.popleft()
                    inflight[actor.score.remote(batch, sample_ref)] = (actor, batch, time.monotonic())
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                if not ready:
                    self._check_timeouts(inflight, queue, idle, summary, bar)
                    continue
                actor, batch, _ = inflight.pop(ready[0])
                try:
                    rows = self._rows(ray.get(ready[0]))
                except ray.exceptions.RayActorError as exc:
                    self._actor_died(exc, batch, queue, idle, summary, bar)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    idle.append(actor)
                    self._split_or_fail(batch, queue, f"backend error: {str(exc).strip().splitlines()[-1][:300]}", summary, bar)
                    continue
                idle.append(actor)
                self._record(rows, summary, bar)
        finally:
            bar.close()
            for actor in idle + [v[0] for v in inflight.values()]:
                ray.kill(actor, no_restart=True)

    def _record(self, rows: list[dict[str, Any]], summary, bar) -> None:
        self.store.append(rows)
        for row in rows:
            if row["status"] == "ok":
                summary.scored += 1
            else:
                summary.failed += 1
                summary.failures[row["donor"]] = row["error"]
        bar.update(len(rows))
        bar.set_postfix(failed=summary.failed, retries=summary.retries, refresh=False)

    def _actor_died(self, exc, batch, queue, idle, summary, bar) -> None:
        key = tuple(BASE if t is None else t.entry.donor for t in batch)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        summary.retries += 1
        log.warning("actor died while scoring %d donors (retry %d/%d): %s",
                    len(batch), self.attempts[key], self.cfg.max_retries, type(exc).__name__)
        idle.append(self._new_actor())
        if self.attempts[key] > self.cfg.max_retries:
            self._split_or_fail(batch, queue, f"actor died {self.attempts[key]} times scoring this batch", summary, bar)
        else:
            queue.appendleft(batch)

    def _split_or_fail(self, batch, queue, reason: str, summary, bar) -> None:
        """Isolate the culprit: a multi-donor batch is requeued one donor at a time; a single donor fails."""
        if len(batch) > 1:
            queue.extendleft([t] for t in reversed(batch))
        else:
            self._record(self._fail(batch, reason), summary, bar)

    def _check_timeouts(self, inflight, queue, idle, summary, bar) -> None:
        import ray

        limit = self.cfg.batch_timeout_s or math.inf
        now = time.monotonic()
        for ref, (actor, batch, started) in list(inflight.items()):
            if not ray.wait([self.ready[actor._actor_id]], timeout=0)[0]:
                inflight[ref] = (actor, batch, now)
            elif now - started > limit:
                del inflight[ref]
                ray.kill(actor, no_restart=True)
                summary.retries += 1
                log.warning("batch of %d donors exceeded %.0fs; isolating", len(batch), limit)
                idle.append(self._new_actor())
                self._split_or_fail(batch, queue, f"timed out after {limit:.0f}s", summary, bar)
