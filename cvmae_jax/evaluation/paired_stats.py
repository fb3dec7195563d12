"""Paired statistics: per-lab tests of a strategy against the reference, and the seeded
subject-level bootstrap behind the AUROC-difference CIs of ``--compare`` and the probes' CIs."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

NUM_BOOTSTRAP = 1000
_CHUNK = 100  # resamples per vectorized block (bounds memory for large label sets)


def one_class(y) -> bool:
    """True when labels ``y`` [N] hold fewer than two classes (no rows included): no AUROC."""
    return np.unique(np.asarray(y)).size < 2


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


class SubjectBootstrap:
    """Bootstrap resamples of label rows that resample SUBJECTS with replacement, so the
    correlated rows of one subject (several prediction times) enter or leave a resample
    together. A resample is a weight per row: the number of times its subject was drawn.

    ``groups[i]`` is row i's subject id. The resamples are regenerated from ``seed`` on each
    ``weights()`` call, so every run scored with the same object (or the same groups and seed)
    sees the same resamples: the AUROC differences of ``--compare`` are paired."""

    def __init__(self, groups, seed: int, num: int = NUM_BOOTSTRAP):
        _, self.group_of_row = np.unique(np.asarray(groups), return_inverse=True)
        self.group_of_row = self.group_of_row.reshape(-1)
        self.n_subjects = int(self.group_of_row.max()) + 1 if self.group_of_row.size else 0
        self.seed, self.num = seed, num

    def weights(self):
        """Yields [<=_CHUNK, n] int64 row weights, ``num`` resamples in all (bounded memory)."""
        rng = np.random.default_rng(self.seed)
        k = self.n_subjects
        for lo in range(0, self.num, _CHUNK):
            size = min(_CHUNK, self.num - lo)
            counts = rng.multinomial(k, np.full(k, 1.0 / k), size=size) if k else (
                np.zeros((size, 0), np.int64))
            yield counts[:, self.group_of_row]


def resampled_aurocs(labels, scores, bootstrap: SubjectBootstrap) -> np.ndarray:
    """[num] AUROC of ``scores`` on each resample; NaN where a resample has one class. The
    weighted Mann-Whitney U with ties counted half, which equals sklearn's ``roc_auc_score`` on
    the resample's rows (each row repeated by its weight), vectorized over resamples."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    _, tie_group = np.unique(scores, return_inverse=True)  # ascending score order
    num_groups = int(tie_group.max()) + 1 if tie_group.size else 0
    out = []
    for w in bootstrap.weights():
        offsets = np.arange(len(w))[:, None] * num_groups + tie_group[None, :]  # [c, n]

        def per_group(rows):  # [c, num_groups] summed weights of `rows` in each tie group
            return np.bincount(offsets[:, rows].ravel(), w[:, rows].ravel().astype(np.float64),
                               len(w) * num_groups).reshape(len(w), num_groups)

        pos, neg = per_group(labels), per_group(~labels)
        below = np.cumsum(neg, 1) - neg  # negatives' weight with a lower score
        u = (pos * (below + 0.5 * neg)).sum(1)
        pos_w, neg_w = pos.sum(1), neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where((pos_w > 0) & (neg_w > 0), u / (pos_w * neg_w), np.nan))
    return np.concatenate(out) if out else np.zeros(0)


def paired_auroc_difference(labels, scores_a, scores_b, bootstrap: SubjectBootstrap) -> dict:
    """AUROC(a) - AUROC(b) on the same rows (both classes present), with the percentile 95% CI
    of the differences on the same resamples (paired): {delta, ci, bootstrap_used}."""
    a = resampled_aurocs(labels, scores_a, bootstrap)
    b = resampled_aurocs(labels, scores_b, bootstrap)  # NaN on the same resamples as a
    labels = np.asarray(labels, bool)
    return dict(delta=float(roc_auc_score(labels, scores_a) - roc_auc_score(labels, scores_b)),
                ci=percentile_ci(a - b), bootstrap_used=int(np.isfinite(a - b).sum()))


def percentile_ci(values) -> list[float] | None:
    """Percentile 95% interval of the finite values, or None when there are none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]
