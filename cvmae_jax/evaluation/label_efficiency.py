"""Label efficiency: held_out AUROC of the frozen-embedding probe fit on k train labels.

For k in K_SHOTS, R seeded draws of k train rows (stratified: each class gets its share of k
rounded, at least one row when it has any), a probe fit on each draw with C fixed to the value
the full-data probe took (chosen on tuning), AUROC on held_out. "all" is the full-data probe itself.
``kshot_curve`` draws the same rows for any other model (eval.py's fine-tuned classifier,
``cvmae_jax.evaluation.finetune``).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation.downstream import DEFAULT_C, TEST, Probe, fit_probe
from cvmae_jax.evaluation.paired_stats import one_class

K_SHOTS = (16, 64, 256)
NUM_DRAWS = 5
C_POLICY = (f"C fixed to the full-data probe's C (chosen on tuning by AUROC; {DEFAULT_C:g} when "
            "tuning has a single class)")


def kshot_indices(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct row indices of y (sorted), stratified by class: each class gets round(k *
    its share) rows, at least 1 and at most what leaves 1 for the other class, when both are
    present. Raises if k > len(y)."""
    y = np.asarray(y).astype(bool)
    if not 0 < k <= len(y):
        raise ValueError(f"k={k} must be in [1, {len(y)}]")
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    both = len(pos) > 0 and len(neg) > 0 and k >= 2
    n_pos = int(np.clip(round(k * len(pos) / len(y)), max(k - len(neg), int(both)),
                        min(len(pos), k - int(both))))
    chosen = np.r_[rng.choice(pos, n_pos, replace=False),
                   rng.choice(neg, k - n_pos, replace=False)]
    return np.sort(chosen).astype(np.int64)


def kshot_probe(train_x, train_y, idx: np.ndarray, probe: Probe, seed: int) -> Probe:
    """The curve's probe on train rows ``idx``: C fixed to the full-data ``probe``'s."""
    return fit_probe(train_x[idx], train_y[idx], probe.C, seed)


def settings(seed: int) -> dict:
    """What every curve shares, for metrics.json and the report."""
    return dict(seed=int(seed), ks=list(K_SHOTS), draws=NUM_DRAWS, c_policy=C_POLICY,
                split=TEST, draw_seeds="[seed, k, draw]")


def label_efficiency(train_x, train_y, test_x, test_y, probe: Probe | None, seed: int,
                     full_auroc: float | None, ks=K_SHOTS, draws: int = NUM_DRAWS) -> dict:
    """{"16": {...}, ..., "all": {...}} (k >= n_train skipped except "all"); each entry has
    n_train, draws, aurocs (one per draw), auroc_mean, auroc_std (ddof=1; None for one draw),
    seeds (each draw's [seed, k, draw]; none for "all"), C, split and n_test. Without a probe
    or a held_out AUROC every entry has draws 0, auroc_mean None and a reason."""
    train_y, test_y = np.asarray(train_y).astype(bool), np.asarray(test_y).astype(bool)
    common = dict(C=None if probe is None else probe.C, split=TEST, n_test=int(len(test_y)))
    if probe is None or full_auroc is None:
        reason = ("no probe (train has a single class)" if probe is None
                  else f"{TEST} AUROC undefined (single class or no rows)")
        return {str(k): dict(n_train=int(k) if k != "all" else int(len(train_y)), draws=0,
                             aurocs=[], auroc_mean=None, auroc_std=None, seeds=[],
                             reason=reason, **common)
                for k in (*[k for k in ks if k < len(train_y)], "all")}
    def auroc_of_draw(idx):
        fitted = kshot_probe(train_x, train_y, idx, probe, seed)
        return float(roc_auc_score(test_y, fitted.decision(test_x)))

    return kshot_curve(auroc_of_draw, train_y, seed, full_auroc, ks, draws, common)


def kshot_curve(auroc_of_draw, train_y, seed: int, full_auroc: float, ks=K_SHOTS,
                draws: int = NUM_DRAWS, common: dict | None = None) -> dict:
    """``label_efficiency``'s curve of any model: ``auroc_of_draw(indices)`` fits it on those
    train rows and returns its held_out AUROC; draw r of k takes the rows of seed [seed, k, r]
    (so models drawn alike see the same rows); ``common`` fields are copied into each entry."""
    train_y = np.asarray(train_y).astype(bool)
    common = common or {}
    curve = {}
    for k in ks:
        if k >= len(train_y):
            continue
        aurocs, seeds = [], []
        for r in range(draws):
            draw_seed = [int(seed), int(k), r]
            idx = kshot_indices(train_y, k, np.random.default_rng(draw_seed))
            if one_class(train_y[idx]):
                continue  # only when train itself has a single class
            aurocs.append(float(auroc_of_draw(idx)))
            seeds.append(draw_seed)
        curve[str(k)] = dict(n_train=int(k), draws=len(aurocs), aurocs=aurocs,
                             auroc_mean=float(np.mean(aurocs)) if aurocs else None,
                             auroc_std=float(np.std(aurocs, ddof=1)) if len(aurocs) > 1
                             else None, seeds=seeds, **common)
    curve["all"] = dict(n_train=int(len(train_y)), draws=1, aurocs=[float(full_auroc)],
                        auroc_mean=float(full_auroc), auroc_std=None, seeds=[], **common)
    return curve
