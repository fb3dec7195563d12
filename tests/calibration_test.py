"""Platt scaling of exported probabilities: fit on tuning, used only where it keeps every
split's ranking."""

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import rankdata

from cvmae_jax.evaluation.calibration import platt


def _overlapping(rng, n=400, shift=1.0, offset=-3.0):
    y = rng.random(n) < 0.2
    return y, offset + shift * y + rng.normal(size=n)


def test_platt_scaling_matches_the_tuning_rate_and_keeps_the_order():
    rng = np.random.default_rng(0)
    y, tuning = _overlapping(rng)
    held_out = _overlapping(rng)[1]
    calibration, probabilities = platt(dict(tuning=tuning, held_out=held_out), y)
    assert calibration["reason"] is None and calibration["slope"] > 0
    assert probabilities["tuning"].mean() == pytest.approx(y.mean(), abs=1e-4)
    assert abs(expit(tuning).mean() - y.mean()) > 0.05  # the scores themselves are not
    np.testing.assert_array_equal(rankdata(probabilities["held_out"]), rankdata(held_out))


def test_classes_that_meet_at_one_tuning_score_are_not_separated():
    scores = np.array([-2.0, -1.0, 0.0, 0.0, 1.0, 2.0])  # a negative and a positive at 0
    calibration, probabilities = platt(dict(tuning=scores, held_out=scores),
                                       np.array([0, 0, 0, 1, 1, 1], bool))
    assert calibration["reason"] is None and calibration["slope"] > 0
    assert probabilities is not None


@pytest.mark.parametrize("case, reason", [
    ("one_class", "tuning split has one class"), ("nan", "tuning scores are not all finite"),
    ("separated", "the tuning scores separate the classes"),
    ("falling", "the tuning labels do not rise"),
    ("rounding", "the scaling rounds distinct scores")])
def test_platt_scaling_is_not_used_where_it_would_change_a_ranking(case, reason):
    rng = np.random.default_rng(1)
    y, tuning = _overlapping(rng)
    other = tuning.copy()
    if case == "one_class":
        y = np.zeros_like(y)
    elif case == "nan":
        tuning[3] = np.nan
    elif case == "separated":
        tuning = np.where(y, 1.0, -1.0) + 0.01 * rng.normal(size=len(y))
    elif case == "falling":
        tuning = -tuning
    else:  # a steep tuning fit and held_out scores far beyond its range: sigmoid rounds to 1
        y, tuning = _overlapping(rng, shift=3.0)
        other = np.array([50.0, 60.0, 70.0])
    calibration, probabilities = platt(dict(tuning=tuning, held_out=other), y)
    assert probabilities is None and calibration["reason"].startswith(reason)
