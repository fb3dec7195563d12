"""Paired statistics: per-lab tests of a strategy against the reference, and the seeded
bootstrap resamples behind the AUROC-difference CIs of ``--compare`` and the probes' CIs."""

from __future__ import annotations

import numpy as np
from scipy import stats

NUM_BOOTSTRAP = 1000
_CHUNK = 100  # resamples per vectorized block (bounds memory for large label sets)


def lab_comparison(diffs) -> dict:
    """Win rate, paired Wilcoxon signed-rank test and Cohen's d of per-lab differences.

    ``diffs[i]`` = reference error - strategy error on lab i, so positive = strategy better.
    Ties (a zero difference) count as half a win; the Wilcoxon test (two-sided, scipy's
    default ``zero_method='wilcox'``) drops them. Cohen's d = mean / sd (ddof 1) of the diffs."""
    d = np.asarray(diffs, np.float64)
    wins, ties = int((d > 0).sum()), int((d == 0).sum())
    out = dict(n_labs=len(d), wins=wins, ties=ties, losses=len(d) - wins - ties,
               win_rate=(wins + 0.5 * ties) / len(d) if len(d) else None,
               mean_diff=float(d.mean()) if len(d) else None,
               wilcoxon_statistic=None, wilcoxon_p=None, cohens_d=None, reason=None)
    if not (d != 0).any():
        out["reason"] = f"{len(d)} labs, none with a non-zero difference: no test"
        return out
    test = stats.wilcoxon(d)
    out["wilcoxon_statistic"], out["wilcoxon_p"] = float(test.statistic), float(test.pvalue)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    if sd > 0:
        out["cohens_d"] = float(d.mean() / sd)
    else:
        out["reason"] = f"{len(d)} labs with identical differences: Cohen's d undefined"
    return out


def bootstrap_indices(n: int, seed: int, num: int = NUM_BOOTSTRAP) -> np.ndarray:
    """[num, n] row indices drawn with replacement; shared by every run, so resamples pair."""
    return np.random.default_rng(seed).integers(0, n, (num, n))


def resampled_aurocs(labels, scores, indices: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` on each resample (row of ``indices``); NaN where a resample has one
    class. Rank form of the Mann-Whitney U with average ranks for ties, which equals sklearn's
    ``roc_auc_score``, vectorized over resamples (1000 sklearn calls take seconds)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    out = []
    for lo in range(0, len(indices), _CHUNK):
        idx = indices[lo:lo + _CHUNK]
        y = labels[idx]
        ranks = stats.rankdata(scores[idx], axis=1)
        pos = y.sum(1)
        neg = y.shape[1] - pos
        with np.errstate(invalid="ignore", divide="ignore"):
            u = (ranks * y).sum(1) - pos * (pos + 1) / 2.0
            out.append(np.where((pos > 0) & (neg > 0), u / (pos * neg), np.nan))
    return np.concatenate(out) if out else np.zeros(0)


def percentile_ci(values) -> list[float] | None:
    """Percentile 95% interval of the finite values, or None when there are none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]
