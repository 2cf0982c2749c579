"""The contract every scoring backend implements, and the small value objects that cross the Ray boundary.

A backend loads the base model once, keeps donors resident, and turns (donors, encoded sample) into per-donor
sums. Sums, not means, so that the driver can add up partial results exactly (docs/contracts.md, "Scores": a token-weighted loss).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import Field

from engine.core.config import StrictModel
from engine.core.data import EncodedSample
from engine.core.scores import BASE_ROW as BASE  # the base model's donor id, the same as its score row's


@dataclass(frozen=True)
class DonorRequest:
    """What an actor needs to score one donor: an id, a local adapter folder, and a stable integer id (from 1)."""

    donor: str
    path: str
    int_id: int
    # the weights already read by the scorer (engine.core.weights.read_weights), so the backend does not read again
    tensors: dict | None = field(default=None, compare=False, repr=False)

    @property
    def is_base(self) -> bool:
        return self.donor == BASE


BASE_REQUEST = DonorRequest(BASE, "", 0)


@dataclass
class DonorScore:
    donor: str
    nll_sum: float = 0.0
    n_correct: int = 0
    n_tokens: int = 0
    n_examples: int = 0
    seconds: float = 0.0
    error: str | None = None
    backend: str | None = None  # set when a backend hands a donor to another one (vllm → hf fallback)
    # Per-example moments (Σ nllᵢ², Σ nllᵢ·tokᵢ, Σ tokᵢ²): the loss's standard error, which the cascade prunes on.
    nll_sq_sum: float = 0.0
    nll_tok_sum: float = 0.0
    tok_sq_sum: int = 0
    # Per example, in the sample's order: NLL and completion tokens. Two donors scored on the same examples are
    # compared on their paired differences (engine.scoring.cascade.paired_stderr), far tighter than two SEs.
    example_nll: list[float] | None = None
    example_tokens: list[int] | None = None

    def add_example(self, nll: float, correct: int, tokens: int, index: int | None = None) -> None:
        """Accumulate one example's completion statistics; `index` (its place in the sample) keeps it per example."""
        if index is not None:
            if self.example_nll is None:
                self.example_nll, self.example_tokens = [math.nan] * self.n_examples, [0] * self.n_examples
            self.example_nll[index], self.example_tokens[index] = nll, tokens
        self.nll_sum += nll
        self.n_correct += correct
        self.n_tokens += tokens
        self.nll_sq_sum += nll * nll
        self.nll_tok_sum += nll * tokens
        self.tok_sq_sum += tokens * tokens

    @property
    def loss(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def token_accuracy(self) -> float:
        return self.n_correct / self.n_tokens if self.n_tokens else math.nan


class BackendOptions(StrictModel):
    """Options every backend understands; a backend subclasses this for its own."""

    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on GPU and float32 on CPU"
    )
    max_resident: int = Field(16, ge=2, description="adapters kept loaded in the actor (LRU)")
    batch_tokens: int = Field(8192, ge=64, description="padded tokens per forward pass")
    trust_remote_code: bool = False

    # Options that change only speed, never a score (each backend's parity tests hold them to that); every other
    # option joins the scores' identity (ScoreSettings.scorer_key), so rows computed otherwise are not reused.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"max_resident", "batch_tokens"})


class Backend(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, base: str, options: BackendOptions):
        self.base = base
        self.options = options

    @abstractmethod
    def score(self, donors: list[DonorRequest], sample: EncodedSample) -> list[DonorScore]:
        """Score each donor on the whole sample; a donor that fails gets `error` set, never an exception."""

    def resident(self) -> list[str]:
        """Donor ids currently loaded; for tests and logs."""
        return []


def short_error(exc: BaseException) -> str:
    """One line a donor's `error` can carry: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
