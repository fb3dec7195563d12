"""k-shot label draws and the label-efficiency curve on constructed features."""

from unittest import mock

import numpy as np
import pytest

from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation import report
from cvmae_jax.evaluation.downstream import fit_probe
from cvmae_jax.evaluation.label_efficiency import (kshot_curve, kshot_indices,
                                                  label_efficiency, settings)


@pytest.mark.parametrize("n_pos", [1, 2, 30, 299])
@pytest.mark.parametrize("k", [2, 16, 64, 256])
def test_kshot_draws_have_k_rows_and_both_classes(n_pos, k):
    y = np.zeros(300, bool)
    y[np.random.default_rng(0).choice(300, n_pos, replace=False)] = True
    idx = kshot_indices(y, k, np.random.default_rng([5, k, 0]))
    assert len(idx) == k and len(np.unique(idx)) == k and idx.min() >= 0 and idx.max() < 300
    assert y[idx].any() and not y[idx].all()
    if n_pos == 30:  # stratified: about 10% positives
        assert y[idx].sum() == max(1, round(k * 0.1))
    again = kshot_indices(y, k, np.random.default_rng([5, k, 0]))
    np.testing.assert_array_equal(idx, again)  # seeded
    if k < 256 and 2 < n_pos:
        other = kshot_indices(y, k, np.random.default_rng([5, k, 1]))
        assert not np.array_equal(idx, other)


def test_kshot_with_one_class_or_bad_k():
    y = np.ones(20, bool)
    assert len(kshot_indices(y, 5, np.random.default_rng(0))) == 5
    with pytest.raises(ValueError):
        kshot_indices(y, 21, np.random.default_rng(0))


def test_a_k_of_all_train_rows_is_the_all_entry_not_a_draw():
    y = np.arange(64) % 4 == 0
    curve = kshot_curve(lambda idx: 0.5, y, seed=0, full_auroc=0.7, ks=(16, 64), draws=2)
    assert list(curve) == ["16", "all"] and curve["all"]["auroc_mean"] == 0.7


def _data(rng, n, prevalence=0.2):
    y = rng.random(n) < prevalence
    y[:2] = [True, False]
    x = np.c_[y + 0.8 * rng.normal(size=n), rng.normal(size=(n, 3))]
    return x, y


def test_label_efficiency_curve():
    rng = np.random.default_rng(0)
    train, test = _data(rng, 200), _data(rng, 150)
    probe = fit_probe(*train, c=0.1)  # as chosen on tuning by the full-data probe
    full_auroc = roc_auc_score(test[1], probe.decision(test[0]))
    curve = label_efficiency(*train, *test, probe, seed=3, full_auroc=full_auroc)
    assert list(curve) == ["16", "64", "all"]  # 256 >= n_train is skipped
    for k in ("16", "64"):
        e = curve[k]
        assert e["n_train"] == int(k) and e["draws"] == 5 and len(e["aurocs"]) == 5
        assert e["auroc_mean"] == pytest.approx(np.mean(e["aurocs"]))
        assert e["auroc_std"] == pytest.approx(np.std(e["aurocs"], ddof=1)) and e["auroc_std"] > 0
        assert e["C"] == 0.1 and e["split"] == "held_out" and e["n_test"] == 150
        assert e["seeds"] == [[3, int(k), r] for r in range(5)]
        assert all(0.5 < a <= 1.0 for a in e["aurocs"])  # a real signal is found from 16 rows
    assert curve["all"] == dict(n_train=200, draws=1, aurocs=[full_auroc],
                                auroc_mean=full_auroc, auroc_std=None, seeds=[],
                                C=0.1, split="held_out", n_test=150)
    assert curve["64"]["auroc_mean"] > 0.7
    again = label_efficiency(*train, *test, probe, seed=3, full_auroc=full_auroc)
    assert again == curve  # seeded
    other = label_efficiency(*train, *test, probe, seed=4, full_auroc=full_auroc)
    assert other["16"]["aurocs"] != curve["16"]["aurocs"]
    empty = label_efficiency(*train, *test, None, seed=3, full_auroc=None)
    assert list(empty) == ["16", "64", "all"] and empty["all"]["n_train"] == 200
    assert all(e["auroc_mean"] is None and e["draws"] == 0 and e["reason"] for e in empty.values())


def test_report_table_of_a_task_without_probe():
    """A task whose train labels hold one class has no probe (C None): its rows read n/a."""
    rng = np.random.default_rng(0)
    (x, _), test = _data(rng, 100), _data(rng, 50)
    empty = label_efficiency(x, np.zeros(100, bool), *test, None, seed=3, full_auroc=None)
    downstream = dict(seed=3, label_efficiency=settings(3),
                      tasks={"mortality": dict(label_efficiency=empty)})
    lines = report._label_efficiency_lines(downstream)
    rows = [line for line in lines if line.startswith("| mortality |")]
    assert [row.split(" | ")[1] for row in rows] == ["16", "64", "all"]
    assert all(row.split(" | ")[5:] == ["n/a", "n/a", "n/a |"] for row in rows)


def test_report_names_the_skipped_k_and_the_plot_keeps_bars_within_0_and_1(tmp_path):
    rng = np.random.default_rng(1)
    train, test = _data(rng, 200), _data(rng, 150)
    probe = fit_probe(*train, c=0.1)
    full_auroc = roc_auc_score(test[1], probe.decision(test[0]))
    curve = label_efficiency(*train, *test, probe, seed=3, full_auroc=full_auroc)
    curve["64"].update(auroc_mean=0.95, auroc_std=0.2)  # mean + std would pass 1
    downstream = dict(seed=3, label_efficiency=settings(3),
                      tasks={"mortality": dict(label_efficiency=curve)})
    lines = report._label_efficiency_lines(downstream)
    assert "- mortality: k = 256 left out (not fewer than its 200 train label rows)" in lines
    assert [r.split(" | ")[7] for r in lines if r.startswith("| mortality | all")] == ["n/a |"]
    with mock.patch.object(report.plt.Axes, "errorbar") as errorbar:
        report.plot_label_efficiency(str(tmp_path / "le.png"), downstream)
    low, high = errorbar.call_args.kwargs["yerr"]
    means = np.array(errorbar.call_args.args[1])
    assert (means + high <= 1.0).all() and (means - low >= 0.0).all()
    assert high[1] == pytest.approx(0.05) and high[2] == 0.0  # clipped at 1; "all": no bar
