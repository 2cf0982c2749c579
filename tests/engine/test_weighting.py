"""Weightings against their closed forms; all sum to 1 and stay finite at extreme settings."""
from __future__ import annotations

import math

import pytest

from engine.core.errors import ConfigError, DataError
from engine.weighting import compute_weights, mwa_weights, softmax_weights, step_weights, uniform_weights

LOSSES = [0.8, 1.0, 1.5, 3.0]


def test_uniform_weights_are_equal_and_sum_to_one():
    assert uniform_weights(4) == pytest.approx([0.25] * 4)


def test_mwa_with_zero_penalty_is_uniform():
    assert mwa_weights(LOSSES, 0.0) == pytest.approx(uniform_weights(len(LOSSES)))


def test_mwa_matches_inverse_power_of_loss():
    p = 2.0
    raw = [loss ** -p for loss in LOSSES]
    assert mwa_weights(LOSSES, p) == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)


def test_larger_penalty_concentrates_weight_on_the_lowest_loss():
    best = [mwa_weights(LOSSES, p)[0] for p in (0.0, 0.5, 1.0, 2.0, 8.0, 200.0)]
    assert best == sorted(best) and best[0] == pytest.approx(0.25)
    assert best[-1] > 0.999
    weights = mwa_weights(LOSSES, 2.0)
    assert weights == sorted(weights, reverse=True)  # lower loss, more weight


def test_step_weights_follow_step_power():
    steps = [100.0, 200.0, 400.0]
    assert step_weights(steps, 1.0) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert step_weights(steps, 0.0) == pytest.approx([1 / 3] * 3)
    assert step_weights([0.0, 10.0], 1.0) == pytest.approx([0.0, 1.0])


def test_softmax_matches_closed_form_and_survives_tiny_temperature():
    t = 0.5
    raw = [math.exp(-loss / t) for loss in LOSSES]
    assert softmax_weights(LOSSES, t) == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert softmax_weights(LOSSES, 1e-9) == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert softmax_weights(LOSSES, 1e9) == pytest.approx([0.25] * 4)


def test_mwa_steps_needs_a_step_for_every_donor():
    with pytest.raises(DataError, match="'b'.*step"):
        compute_weights("mwa-steps", [1.0, 2.0], [10, None], donor_names=["a", "b"])


@pytest.mark.parametrize("call", [
    lambda: mwa_weights(LOSSES, -1.0),
    lambda: softmax_weights(LOSSES, 0.0),
    lambda: compute_weights("median", LOSSES),
])
def test_invalid_parameters_are_config_errors(call):
    with pytest.raises(ConfigError):
        call()


def test_non_positive_loss_is_rejected_by_mwa():
    with pytest.raises(DataError, match="> 0"):
        mwa_weights([0.0, 1.0], 1.0)
