"""Platt scaling: probabilities for the prediction exports from scores that are not calibrated
ones (a sum of scaled log-odds; a network early-stopped on tuning AUROC), fit on the tuning
split's labels, which only choose settings: P = sigmoid(slope * score + intercept) from an
unpenalized logistic regression of the tuning labels on the tuning scores. It is used only where
it keeps the report's ranking of every split: a positive, finite slope that rounds no two
distinct scores to one probability; otherwise ``reason`` says why not."""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from cvmae_jax.evaluation.downstream import TUNING
from cvmae_jax.evaluation.paired_stats import one_class


def platt(scores: dict[str, np.ndarray], tuning_y: np.ndarray
          ) -> tuple[dict, dict[str, np.ndarray] | None]:
    """({slope, intercept, reason}, P(label = True) float64 [N] per split of ``scores``, or
    None where ``reason`` says why the scaling is not used), fit on ``scores[TUNING]`` [N] and
    the tuning labels [N]."""
    out = dict(slope=None, intercept=None, reason=None)
    tuning_scores, tuning_y = np.asarray(scores[TUNING], np.float64), np.asarray(tuning_y)
    if one_class(tuning_y):
        out["reason"] = "tuning split has one class or no rows"
    elif not np.isfinite(tuning_scores).all():
        out["reason"] = "tuning scores are not all finite"
    elif tuning_scores[tuning_y == 0].max() < tuning_scores[tuning_y == 1].min():
        out["reason"] = "the tuning scores separate the classes: no finite slope"
    if out["reason"]:
        return out, None
    fit = LogisticRegression(C=np.inf).fit(tuning_scores.reshape(-1, 1), tuning_y)
    out.update(slope=float(fit.coef_[0, 0]), intercept=float(fit.intercept_[0]))
    if out["slope"] <= 0:
        out["reason"] = "the tuning labels do not rise with the score"
        return out, None
    probabilities = {s: expit(out["slope"] * np.asarray(v, np.float64) + out["intercept"])
                     for s, v in scores.items()}
    if any(np.unique(p).size < np.unique(scores[s]).size for s, p in probabilities.items()):
        out["reason"] = "the scaling rounds distinct scores to one probability"
        return out, None
    return out, probabilities
