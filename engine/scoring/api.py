"""Scoring orchestration: spread donors over N resident-base actors, store rows as they finish, resume on rerun.

Failure policy: a donor's own failure is a `failed` row (decided in the actor). A dead actor (killed process,
lost node) costs a retry: its batch is requeued onto a fresh actor, up to `max_retries` times per batch. A batch
that exceeds `batch_timeout_s` is split so the donor that hangs is isolated and the others are rescored.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.scoring.cascade import CascadeConfig
from engine.core.config import StrictModel
from engine.core.errors import ConfigError
from engine.core.scores import BASE_ROW
from engine.scoring.screen import ScreenConfig

log = logging.getLogger("mashup.score")


class ScoreSettings(StrictModel):
    """How to score: everything but what is scored (base, donors, data) and where to (out). The `score:` section of
    `mashup run` is one of these; `mashup score` takes a ScoreConfig, which adds those four."""

    trusted_roots: list[Path] = Field(default_factory=list, description="absolute folders a manifest's paths may "
                                      "point into besides its own (adds to MASHUP_TRUSTED_ROOTS)")
    samples: int | None = Field(256, ge=1, description="examples scored per donor (None: all)")
    seed: int = 0
    chat_template: bool = False
    backend: str = "hf"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    actors: int = Field(1, ge=1)
    cpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="CPUs each actor reserves, and its torch threads. auto: executor local uses this "
        "process's threads (torch.get_num_threads); Ray actors share the cluster's CPUs equally, at least 1 each and "
        "at most the smallest node's")
    gpus_per_actor: float | Literal["auto"] = "auto"
    placement: Literal["pack", "spread"] = "spread"
    donors_per_call: int = Field(8, ge=1, description="donors per actor call (and per mixed forward)")
    max_retries: int = Field(3, ge=0, description="actor deaths tolerated per batch")
    batch_timeout_s: float | None = Field(None, gt=0, description="kill and split a batch that takes longer")
    strict_base_name: bool = False
    check_finite: bool = True
    ray_address: str | None = Field(None, description="cluster address; none starts a local Ray (or uses RAY_ADDRESS)")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each actor reserves (pins actors to nodes that have them)"
    )
    node_labels: dict[str, str] = Field(default_factory=dict, description="Ray label selector for the actors' nodes")
    hub_concurrency: int = Field(8, ge=1, description="Hub downloads in flight per actor, and revision look-ups")
    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: actors (isolated processes, retries, timeouts, clusters); local: one scorer in this "
        "process, no Ray start-up and no actor to load (one machine, actors: 1; a crash in the backend ends the job)")
    strategy: Literal["exhaustive", "cascade", "screen"] = Field(
        "exhaustive", description="exhaustive: every donor on the whole sample (the paper); cascade: successive "
        "halving; screen: first-order screen + exact probe, then exact scoring of the survivors (engine.scoring.screen)"
    )
    cascade: CascadeConfig = Field(default_factory=CascadeConfig, description="options of strategy: cascade")
    screen: ScreenConfig = Field(default_factory=ScreenConfig, description="options of strategy: screen")

    @model_validator(mode="after")
    def _cascade_options_need_the_cascade(self) -> "ScoreSettings":
        """Options the user gave must belong to the chosen strategy (configs are passed on with exclude_unset, so
        what was set stays what the user wrote)."""
        screen_cascade = self.strategy == "screen" and self.screen.then == "cascade"
        if self.cascade.model_fields_set and self.strategy != "cascade" and not screen_cascade:
            raise ValueError(f"cascade: options given but strategy is {self.strategy!r}; set strategy: cascade")
        if self.screen.model_fields_set and self.strategy != "screen":
            raise ValueError(f"screen: options given but strategy is {self.strategy!r}; set strategy: screen")
        return self

    @model_validator(mode="after")
    def _local_runs_one_scorer_here(self) -> "ScoreSettings":
        if self.executor != "local":
            return self
        clash = [name for name, given in (("actors", self.actors > 1), ("ray_address", self.ray_address),
                                          ("batch_timeout_s", self.batch_timeout_s), ("actor_resources", self.actor_resources),
                                          ("node_labels", self.node_labels)) if given]
        if clash:
            raise ValueError(f"executor: local runs one scorer in this process, so {', '.join(clash)} cannot apply; "
                             "remove them or use executor: ray")
        return self

    @field_validator("cpus_per_actor")
    @classmethod
    def _positive_cpus(cls, v: float | str) -> float | str:
        if v != "auto" and v <= 0:
            raise ValueError("cpus_per_actor must be positive, or auto")
        return v

    @field_validator("samples", mode="before")
    @classmethod
    def _all(cls, v: Any) -> Any:
        return None if v in ("all", 0) else v

    def scorer_key(self) -> str:
        """What, besides the base and the tokenized sample, changes the numbers a row holds: the backend and every
        backend option that is not declared speed-only (dtype, device, slot dtype, …). It joins the sample id, so
        fp32 rows and bf16 rows, or hf rows and vllm rows, are never reused or ranked together."""
        from engine.core.identity import key_of

        opts = self.backend_opts()
        numeric = {k: v for k, v in opts.model_dump().items() if k not in type(opts).SPEED_ONLY}
        return key_of({"backend": self.backend, "options": numeric})[:16]

    def backend_opts(self):
        from actors.backends import get_backend

        cls = get_backend(self.backend)
        try:
            opts = cls.Options.model_validate(self.backend_options)
        except Exception as exc:  # pydantic ValidationError → one line
            from engine.core.config import format_validation_error

            raise ConfigError(format_validation_error(exc, "backend_options")) from None
        if opts.max_resident < self.donors_per_call + 1:
            raise ConfigError(
                f"backend_options.max_resident ({opts.max_resident}) must exceed donors_per_call ({self.donors_per_call})"
            )
        return opts


class ScoreConfig(ScoreSettings):
    base: str = Field(description="base model folder or hf://org/name[@rev]")
    donors: list[str] = Field(min_length=1, description="donor sources: folders, manifests, hf://, hf-collection://")
    data: Path
    out: Path


@dataclass
class ScoreSummary:
    out: Path
    scored: int = 0
    failed: int = 0
    skipped_done: int = 0
    retries: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    donor_examples: int = 0  # donor × example pairs scored by this call (the base excluded): the compute used
    sample_id: str | None = None  # the scope this call scored (engine.core.pools): what selection must rank
    pool: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)  # the cascade's rounds (cascade.json), else empty
    # seconds from the call's start to: ray_ready, scorer_ready (the first scorer has its base loaded), first_donor
    startup: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter, repr=False)

    def mark(self, event: str) -> None:
        """Record when `event` first happened, for the fixed-cost breakdown (bench/bench_startup.py)."""
        self.startup.setdefault(event, round(time.perf_counter() - self.started, 3))


def pin_base(cfg: ScoreConfig) -> tuple[ScoreConfig, str]:
    """The config with its base pinned (an hf:// branch becomes the commit it points to now), and the base's
    content fingerprint: every score is keyed by it (engine.core.identity)."""
    from engine.core.identity import base_fingerprint

    pinned, fp = base_fingerprint(cfg.base)
    return (cfg if pinned == cfg.base else cfg.model_copy(update={"base": pinned})), fp


def prepare_sample(cfg: ScoreConfig, base_fp: str):
    """Load, sample, tokenize and check the data on the driver (tokenizer only, never the model). The sample id
    hashes the base's fingerprint with the token ids, so a changed base, data file, sampling or template all
    give a new sample id, and nothing scored for another one is reused."""
    from transformers import AutoConfig, AutoTokenizer

    from engine.core.data import encode_sample, load_jsonl, sample_examples
    from engine.core.hub import TOKENIZER_FILES, resolve_base

    base = resolve_base(cfg.base, TOKENIZER_FILES)  # the driver needs the tokenizer, never the weights
    trust = cfg.backend_opts().trust_remote_code
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    model_cfg = AutoConfig.from_pretrained(base, trust_remote_code=trust)
    examples = sample_examples(load_jsonl(cfg.data), cfg.samples, cfg.seed)
    sample = encode_sample(tok, examples, getattr(model_cfg, "max_position_embeddings", None), cfg.chat_template,
                           str(cfg.data), salt=f"{base_fp}|scorer:{cfg.scorer_key()}")
    sample.base_fingerprint = base_fp
    return sample


def score(cfg: ScoreConfig) -> ScoreSummary:
    """Score every donor not already `ok` for this sample (or run the cascade); safe to rerun after any interruption."""
    from engine.scoring.catalog import build_catalog, stale_donors
    from engine.scoring.pool import ActorPoolRunner
    from engine.scoring.store import ScoreStore

    from engine.core.paths import check_paths
    from engine.core.pools import write_pool

    t0 = time.perf_counter()
    check_paths(cfg, {"base": "base", "donors": "donors", "data": "file"})  # one line per typo, for the API too
    opts = cfg.backend_opts()
    cfg, base_fp = pin_base(cfg)
    sample = prepare_sample(cfg, base_fp)
    catalog = build_catalog(cfg.donors, cfg.hub_concurrency, cfg.trusted_roots)
    store = ScoreStore(cfg.out)
    record = write_pool(cfg.out, sample.fingerprint, [e.donor for e in catalog], cfg.strategy, len(sample.examples))
    summary = ScoreSummary(cfg.out, started=t0, sample_id=record.sample_id, pool=record.pool)
    summary.mark("prepared")  # base pinned, sample tokenized, catalog built: the driver's own share
    if cfg.strategy in ("cascade", "screen"):
        from engine.scoring.cascade import run_cascade
        from engine.scoring.screen import run_screen

        (run_cascade if cfg.strategy == "cascade" else run_screen)(cfg, opts, sample, catalog, store, summary)
        return _finish(cfg, store, summary)
    done = store.completed(sample.fingerprint) - stale_donors(catalog, store.read(), sample.fingerprint)
    pending = [e for e in catalog if e.donor not in done]
    summary.skipped_done = len(catalog) - len(pending)
    include_base = BASE_ROW not in done
    log.info("%d donors (%d already scored for sample %s), %d examples, %d completion tokens",
             len(catalog), summary.skipped_done, sample.fingerprint, len(sample.examples), sample.n_tokens)
    if pending or include_base:
        runner = ActorPoolRunner(cfg, opts.model_dump(), sample, store)
        runner.run(pending, include_base, summary)
        summary.donor_examples = len(pending) * len(sample.examples)
    return _finish(cfg, store, summary)


def _finish(cfg: ScoreConfig, store, summary: ScoreSummary) -> ScoreSummary:
    """Fold the journal into scores.parquet, stamp the job's seconds, and log where its fixed cost went."""
    store.compact()
    summary.seconds = time.perf_counter() - summary.started
    if len(summary.startup) > 1:  # more than "prepared": something was scored
        log.info("start-up (%s executor): %s", cfg.executor,
                 ", ".join(f"{k} after {v:.1f} s" for k, v in summary.startup.items()))
    return summary
