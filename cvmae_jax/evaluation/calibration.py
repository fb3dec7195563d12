"""Platt scaling: probabilities for the prediction exports from scores that are not calibrated
ones (a sum of scaled log-odds; a network early-stopped on tuning AUROC), fit on the tuning
split's labels, which only choose settings: P = sigmoid(slope * score + intercept) from an
unpenalized logistic regression of the tuning labels on the tuning scores. Only a positive
slope keeps the rows' order, and so the AUROC the report gives; otherwise there is no
calibration and ``reason`` says why."""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from cvmae_jax.evaluation.paired_stats import one_class


def platt(tuning_scores: np.ndarray, tuning_y: np.ndarray) -> dict:
    """{slope, intercept, reason} of scores [N] and labels [N] on tuning; reason None when the
    calibration can be used, else why not (one class or no rows, a slope <= 0)."""
    if one_class(tuning_y):
        return dict(slope=None, intercept=None, reason="tuning split has one class or no rows")
    fit = LogisticRegression(C=np.inf).fit(np.reshape(tuning_scores, (-1, 1)), tuning_y)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    return dict(slope=slope, intercept=intercept,
                reason=None if slope > 0 else "the tuning labels do not rise with the score")


def calibrated(calibration: dict, scores: np.ndarray) -> np.ndarray:
    """P(label = True) [N], float64, of scores [N] under a usable ``platt`` calibration."""
    return expit(calibration["slope"] * np.asarray(scores, np.float64)
                 + calibration["intercept"])
