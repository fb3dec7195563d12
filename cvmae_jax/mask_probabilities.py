"""Masking strategies on the host: train-split statistics -> one masking probability per code.

A strategy turns train-split statistics into a probability vector ``probs`` of shape [V] (one
entry per lab code), which the compiled step draws the masks from (masking.py). NumPy only, so
preparing data and checking configs import no JAX.
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("random", "variance", "cv", "cv_rank", "cv_within")
# the two-tier strategies (p_high above the percentile, else p_low) and the train statistic
# (DataStats field) each splits
TIER_STATISTICS = dict(variance="variance", cv="cv", cv_within="within_subject_cv")
TWO_TIER_STRATEGIES = tuple(TIER_STATISTICS)


def percentile_threshold(score: np.ndarray, threshold_percentile: float) -> float:
    """The score percentile that splits codes into tiers; an infinite score (the CV of a
    mean-0 code) counts as the largest finite one, so it never makes the threshold infinite or
    NaN, and the code lands in the high tier. A NaN score (train statistics that are not
    finite) raises ValueError: it would silently put every code in the low tier."""
    score = np.asarray(score, dtype=np.float64)
    if np.isnan(score).any():
        raise ValueError(f"{int(np.isnan(score).sum())} of {score.size} codes have a NaN masking "
                         "score (CV, within-subject CV or variance): their train statistics are "
                         "not finite; prepare the dataset again")
    score = np.where(np.isposinf(score), np.finfo(np.float64).max, score)
    return float(np.percentile(score, threshold_percentile))


def two_tier_probs(score: np.ndarray, threshold_percentile: float, p_high: float,
                   p_low: float) -> np.ndarray:
    """p_high for codes whose score is strictly above the percentile threshold, else p_low. [V]."""
    above = np.asarray(score) > percentile_threshold(score, threshold_percentile)
    return np.where(above, p_high, p_low)


def expected_mask_rate(probs: np.ndarray, token_counts: np.ndarray) -> float:
    """Expected fraction of training tokens masked under ``probs`` (token-count weighted mean)."""
    counts = np.asarray(token_counts, dtype=np.float64)
    return float(np.sum(probs * counts) / np.sum(counts))


def rank_probs(score: np.ndarray, token_counts: np.ndarray, target_rate: float, p_high: float,
               p_low: float) -> np.ndarray:
    """Continuous mapping from score rank to probability with a given expected mask rate. [V].

    Probabilities rise linearly with the code's rank (0 = least volatile, 1 = most), spanning
    ``p_high - p_low``, shifted so the token-weighted mean equals ``target_rate`` (bisection on
    the shift; values are clipped to [0.01, 0.99]).
    """
    order = np.argsort(np.argsort(score, kind="stable"), kind="stable")
    rank = order / max(len(score) - 1, 1)
    slope = p_high - p_low

    def probs_for(shift: float) -> np.ndarray:
        return np.clip(shift + slope * rank, 0.01, 0.99)

    lo, hi = -1.0, 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if expected_mask_rate(probs_for(mid), token_counts) < target_rate:
            lo = mid
        else:
            hi = mid
    return probs_for(0.5 * (lo + hi))


def strategy_probs(strategy: str, *, cv: np.ndarray, variance: np.ndarray,
                   within_subject_cv: np.ndarray, token_counts: np.ndarray,
                   threshold_percentile: float, p_high: float, p_low: float) -> np.ndarray:
    """Per-code mask probabilities [V] for a strategy, from train-split statistics.

    ``random`` and ``cv_rank`` match the expected mask rate of ``cv`` on the training tokens,
    so they differ from ``cv`` only in which values they hide. ``variance`` and ``cv_within``
    apply the same two-tier rule to the variance and to each code's median within-subject CV
    (stats.py), so their rate is whatever share of tokens their top-tier codes hold (not
    matched: the paper's variance baseline, and CV-Masking with volatility measured within
    each subject's values, without the spread between subjects).
    """
    statistics = dict(cv=cv, variance=variance, within_subject_cv=within_subject_cv)
    if strategy in TIER_STATISTICS:
        return two_tier_probs(statistics[TIER_STATISTICS[strategy]], threshold_percentile,
                              p_high, p_low)
    cv_rate = expected_mask_rate(two_tier_probs(cv, threshold_percentile, p_high, p_low),
                                 token_counts)
    if strategy == "random":
        return np.full(len(cv), cv_rate)
    if strategy == "cv_rank":
        return rank_probs(cv, token_counts, cv_rate, p_high, p_low)
    raise ValueError(f"config.masking.strategy={strategy!r}: expected one of {STRATEGIES}")
