"""Donor weights for the merge: uniform, loss-penalised (MWA), checkpoint-step and softmax weightings.

Every weighting returns weights that sum to 1 (docs/contracts.md, "selection.json"), computed in log space so
that large penalties or tiny temperatures concentrate the weight instead of overflowing to inf/NaN.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

from engine.core.errors import ConfigError, DataError

Weighting = Literal["uniform", "mwa", "mwa-steps", "softmax"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "mwa", "mwa-steps", "softmax")


def normalize_log_weights(log_weights: Sequence[float]) -> list[float]:
    """exp-normalise so that one huge log-weight yields weight 1 rather than inf/inf."""
    if not log_weights:
        raise ConfigError("weights: no donors to weight")
    top = max(log_weights)
    if top == -math.inf:
        raise DataError("weights: every donor has weight zero")
    raw = [math.exp(x - top) for x in log_weights]
    total = sum(raw)
    return [x / total for x in raw]


def uniform_weights(n: int) -> list[float]:
    """The Mashup default: every selected donor counts the same."""
    return normalize_log_weights([0.0] * n)


def mwa_weights(losses: Sequence[float], penalty: float) -> list[float]:
    """w_i ∝ loss_i^(-p): p = 0 is uniform, a larger p favours the donors that fit the task best."""
    if penalty < 0:
        raise ConfigError(f"penalty: must be >= 0, got {penalty}")
    for loss in losses:
        if not loss > 0 or not math.isfinite(loss):
            raise DataError(f"weighting mwa: losses must be finite and > 0, got {loss}")
    return normalize_log_weights([-penalty * math.log(loss) for loss in losses])


def step_weights(steps: Sequence[float], penalty: float) -> list[float]:
    """w_i ∝ step_i^p: later checkpoints of one run count more; p = 0 is uniform."""
    if penalty < 0:
        raise ConfigError(f"penalty: must be >= 0, got {penalty}")
    for step in steps:
        if not step >= 0 or not math.isfinite(step):
            raise DataError(f"weighting mwa-steps: steps must be finite and >= 0, got {step}")
    if penalty == 0:
        return uniform_weights(len(steps))
    return normalize_log_weights([penalty * math.log(s) if s > 0 else -math.inf for s in steps])


def softmax_weights(losses: Sequence[float], temperature: float) -> list[float]:
    """w_i ∝ exp(-loss_i / T): a smooth top-1 as T → 0, uniform as T → ∞."""
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    return normalize_log_weights([-loss / temperature for loss in losses])


def compute_weights(
    weighting: str,
    losses: Sequence[float],
    steps: Sequence[float | None] | None = None,
    penalty: float | None = None,
    temperature: float | None = None,
    donor_names: Sequence[str] | None = None,
) -> list[float]:
    """One entry point so that selection and `mashup run` weight donors identically."""
    if weighting == "uniform":
        return uniform_weights(len(losses))
    if weighting == "mwa":
        return mwa_weights(losses, 1.0 if penalty is None else penalty)
    if weighting == "mwa-steps":
        steps = list(steps or [None] * len(losses))
        for position, step in enumerate(steps):
            if step is None:
                name = donor_names[position] if donor_names else f"#{position}"
                raise DataError(f"donor {name!r}: weighting mwa-steps needs a 'step' in its manifest metadata")
        return step_weights([float(s) for s in steps], 1.0 if penalty is None else penalty)
    if weighting == "softmax":
        return softmax_weights(losses, 1.0 if temperature is None else temperature)
    raise ConfigError(f"weighting: unknown {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
