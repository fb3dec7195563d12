"""As-of aggregate features of label windows (nothing after prediction_time, missing codes) and
the aggregates baseline models beside the probe."""

import dataclasses
import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cvmae_jax.data import labels
from cvmae_jax.evaluation import aggregates
from cvmae_jax.evaluation.aggregates import (FEATURES, aggregate_features, aggregates_baseline,
                                             fit_gradient_boosting)
from cvmae_jax.evaluation.downstream import TEST, TRAIN, TUNING, TaskData, fit_task_probe
from cvmae_jax.evaluation.paired_stats import one_class

from meds_reference import compute_stats, read_numeric_events

A, B = "LAB//A", "LAB//B"
T0 = datetime.datetime(2100, 1, 1)


def _hours(h):
    return T0 + datetime.timedelta(hours=h)


def _meds_with_events_after_prediction_time(root):
    """Subject 1: A = 1 at 0 h and 3 at 1 h, then A = 100 at 5 h and B = 7 at 6 h, after its
    prediction time (2 h); subject 2 gives B train values; subject 3 has no lab event."""
    rows = [(1, 0, A, 1.0), (1, 1, A, 3.0), (1, 5, A, 100.0), (1, 6, B, 7.0),
            (2, 0, A, 2.0), (2, 1, B, 4.0), (2, 2, B, 6.0)]
    (root / "data/train").mkdir(parents=True)
    pq.write_table(pa.table({"subject_id": pa.array([r[0] for r in rows], pa.int64()),
                             "time": pa.array([_hours(r[1]) for r in rows], pa.timestamp("us")),
                             "code": [r[2] for r in rows],
                             "numeric_value": pa.array([r[3] for r in rows], pa.float32())}),
                   root / "data/train/0.parquet")
    (root / "metadata").mkdir()
    pq.write_table(pa.table({"subject_id": pa.array([1, 2, 3], pa.int64()),
                             "split": ["train"] * 3}), root / "metadata/subject_splits.parquet")
    (root / "labels/task").mkdir(parents=True)
    pq.write_table(pa.table({"subject_id": pa.array([1, 3], pa.int64()),
                             "prediction_time": pa.array([_hours(2), _hours(2)],
                                                         pa.timestamp("us")),
                             "boolean_value": [True, False]}),
                   root / "labels/task/train.parquet")
    stats = compute_stats(read_numeric_events(root, "train"), (A, B), clip_quantiles=(0, 1))
    return list(labels.label_windows(root, root / "labels/task/train.parquet", stats, 8)), stats


def test_aggregates_see_nothing_after_prediction_time_and_flag_missing_codes(tmp_path):
    windows, stats = _meds_with_events_after_prediction_time(tmp_path)
    features = aggregate_features(windows, 2).reshape(2, 2, len(FEATURES))
    assert np.isfinite(features).all()
    a, b = (dict(zip(FEATURES, features[0, code])) for code in range(2))
    norm = stats.normalize(np.zeros(3, np.int32), np.array([1.0, 3.0, 2.0]))
    np.testing.assert_allclose([a["last"], a["min"], a["max"], a["mean"]],
                               [norm[1], norm[0], norm[1], norm[2]], rtol=1e-6)
    assert (a["count"], a["hours_since_last"], a["missing"]) == (2, 1.0, 0)  # not A = 100 at 5 h
    assert b == dict.fromkeys(FEATURES, 0.0) | dict(missing=1.0)  # B's only value is at 6 h
    assert (features[1, :, FEATURES.index("missing")] == 1).all()  # an empty window
    assert features[1].sum() == 2


def test_each_codes_last_value_and_time_are_its_own():
    window = dict(codes=np.array([0, 1, 0, 1]), values=np.array([1.0, 2.0, 3.0, 4.0], np.float32),
                  times=np.array([0.0, 1.0, 2.0, 5.0], np.float32), start_time_us=0,
                  prediction_time_us=6 * 3_600_000_000)
    features = aggregate_features([window], 2).reshape(2, len(FEATURES))
    a, b = (dict(zip(FEATURES, features[code])) for code in range(2))
    assert (a["last"], a["hours_since_last"], a["mean"], a["count"]) == (3.0, 4.0, 2.0, 2)
    assert (b["last"], b["hours_since_last"], b["mean"], b["count"]) == (4.0, 1.0, 3.0, 2)


def _task(rng, n=120):
    """Windows of one code whose last value is the label's signal, embeddings of noise."""
    windows, ys, xs = {}, {}, {}
    for split in (TRAIN, TUNING, TEST):
        y = rng.random(n) < 0.4
        windows[split] = [dict(codes=np.zeros(3, np.int32),
                               values=(rng.normal(size=3) + 2.0 * yi).astype(np.float32),
                               times=np.arange(3, dtype=np.float32), start_time_us=0,
                               prediction_time_us=3 * 3_600_000_000, subject_id=i // 2)
                          for i, yi in enumerate(y)]
        ys[split], xs[split] = y, rng.normal(size=(n, 4)).astype(np.float32)
    probe_result, probe = fit_task_probe(xs[TRAIN], ys[TRAIN], xs[TUNING], ys[TUNING], xs[TEST],
                                         ys[TEST])
    return TaskData(None, windows, xs, ys, probe), probe_result


def test_aggregates_beat_a_probe_on_noise_with_a_paired_difference():
    data, probe_result = _task(np.random.default_rng(0))
    out, probabilities = aggregates_baseline(data, probe_result, vocab_size=1, max_len=3)
    assert out["features"]["windows_at_max_len"] == {TRAIN: 120, TUNING: 120, TEST: 120}
    for name in ("logistic_regression", "gradient_boosting"):
        r = out[name]
        assert r["auroc"] > 0.8 and r["auroc_ci"][0] < r["auroc"] < r["auroc_ci"][1]
        diff = r["probe_minus_model"]
        np.testing.assert_allclose(diff["delta"], probe_result["auroc"] - r["auroc"])
        assert diff["ci"][1] < 0 and r["n_subjects"] == 60  # two rows per subject
    assert out["gradient_boosting"]["selection"] == "tuning AUROC"
    together = out["probe_plus_aggregates"]
    chosen = max(("logistic_regression", "gradient_boosting"),
                 key=lambda m: out[m]["tuning_auroc"])
    assert together["aggregates_model"] == chosen
    np.testing.assert_allclose(together["minus_model"]["delta"],
                               together["auroc"] - out[chosen]["auroc"])
    assert together["minus_probe"]["ci"][0] > 0  # the aggregates carry the signal
    x = {s: aggregate_features(data.windows[s], 1) for s in (TUNING, TEST)}
    lr = fit_task_probe(aggregate_features(data.windows[TRAIN], 1), data.y[TRAIN], x[TUNING],
                        data.y[TUNING], x[TEST], data.y[TEST])[1]
    gbm = fit_gradient_boosting(aggregate_features(data.windows[TRAIN], 1), data.y[TRAIN],
                                x[TUNING], data.y[TUNING])[0]
    for split in (TUNING, TEST):  # the fits' own probabilities, for the prediction exports
        np.testing.assert_allclose(probabilities["aggregates_logistic_regression"][split],
                                   lr.probability(x[split]))
        np.testing.assert_allclose(probabilities["aggregates_gradient_boosting"][split],
                                   gbm.predict_proba(x[split])[:, 1])
    no_auroc, none = aggregates_baseline(data, dict(auroc=None, reason="one class"), 1, 3)
    assert no_auroc["reason"] == "as for the probe: one class" and "gradient_boosting" not in no_auroc
    assert none == {}


def test_probe_plus_aggregates_sums_scaled_log_odds_and_gains_what_each_misses():
    """Labels from two independent signals: one in the lab values, one only in the vectors."""
    rng = np.random.default_rng(1)
    data, _ = _task(rng, n=400)
    for split in (TRAIN, TUNING, TEST):
        hidden = rng.normal(size=400)
        values = np.array([w["values"].mean() for w in data.windows[split]])
        data.y[split][:] = values + hidden + 0.3 * rng.normal(size=400) > 1.0
        data.x[split][:, 0] = hidden
    probe_result, probe = fit_task_probe(data.x[TRAIN], data.y[TRAIN], data.x[TUNING],
                                         data.y[TUNING], data.x[TEST], data.y[TEST])
    data = dataclasses.replace(data, probe=probe)
    out, probabilities = aggregates_baseline(data, probe_result, vocab_size=1, max_len=3)
    together = out["probe_plus_aggregates"]
    model = together["aggregates_model"]
    x = {s: aggregate_features(data.windows[s], 1) for s in (TRAIN, TUNING, TEST)}
    if model == "logistic_regression":  # the same deterministic fits as aggregates_baseline's
        model_fit = fit_task_probe(x[TRAIN], data.y[TRAIN], x[TUNING], data.y[TUNING], x[TEST],
                                   data.y[TEST])[1].decision
    else:
        model_fit = fit_gradient_boosting(x[TRAIN], data.y[TRAIN], x[TUNING],
                                          data.y[TUNING])[0].decision_function
    expected = (probe.decision(data.x[TEST]) / probe.decision(data.x[TUNING]).std()
                + model_fit(x[TEST]) / model_fit(x[TUNING]).std())
    assert together["auroc"] == pytest.approx(roc_auc_score(data.y[TEST], expected))
    calibrated = probabilities["probe_plus_aggregates"]  # in the sum's order, fit to tuning
    assert together["calibration"]["slope"] > 0 and together["calibration"]["reason"] is None
    assert roc_auc_score(data.y[TEST], calibrated[TEST]) == pytest.approx(together["auroc"])
    assert calibrated[TUNING].mean() == pytest.approx(data.y[TUNING].mean(), abs=1e-3)
    assert together["minus_model"]["ci"][0] > 0 and together["minus_probe"]["ci"][0] > 0
    assert together["tuning_auroc"] > max(out[m]["tuning_auroc"]
                                          for m in ("logistic_regression", "gradient_boosting"))


def test_probe_plus_aggregates_takes_the_model_better_on_tuning_not_on_held_out(monkeypatch):
    data, probe_result = _task(np.random.default_rng(0))

    class Backwards:  # ranks every split backwards by the last value, which carries the label
        def decision_function(self, x):
            return -x[:, FEATURES.index("last")]

    monkeypatch.setattr(aggregates, "fit_gradient_boosting", lambda *args, **kwargs: (
        Backwards(), dict(settings={}, selection="tuning AUROC", tuning_auroc=1.0)))
    out, _ = aggregates_baseline(data, probe_result, vocab_size=1, max_len=3)
    assert out["gradient_boosting"]["auroc"] < 0.5 < out["logistic_regression"]["auroc"]
    assert out["probe_plus_aggregates"]["aggregates_model"] == "gradient_boosting"


def test_probe_plus_aggregates_without_a_tuning_choice_takes_logistic_regression():
    data, probe_result = _task(np.random.default_rng(2))
    data.y[TUNING][:] = False  # one class: no model can be chosen on tuning
    out, probabilities = aggregates_baseline(data, probe_result, vocab_size=1, max_len=3)
    together = out["probe_plus_aggregates"]
    assert together["aggregates_model"] == "logistic_regression"
    assert together["tuning_auroc"] is None and together["model_selection"].startswith("default")
    assert together["minus_probe"]["ci"][0] > 0  # held_out still scored
    assert "probe_plus_aggregates" not in probabilities  # nothing to calibrate it on
    assert set(probabilities) == {"aggregates_logistic_regression", "aggregates_gradient_boosting"}
    assert together["calibration"]["reason"].startswith("tuning split has one class")


def test_probe_plus_aggregates_has_no_predictions_when_tuning_labels_fall_with_it():
    data, probe_result = _task(np.random.default_rng(4))
    data.y[TUNING][:] = ~data.y[TUNING]  # tuning labels against the signal every split carries
    out, probabilities = aggregates_baseline(data, probe_result, vocab_size=1, max_len=3)
    calibration = out["probe_plus_aggregates"]["calibration"]
    assert calibration["slope"] < 0 and calibration["reason"].startswith("the tuning labels do")
    assert "probe_plus_aggregates" not in probabilities  # it would reverse the held_out order
    assert out["probe_plus_aggregates"]["auroc"] > 0.8  # the sum itself is still scored


def test_aggregates_with_an_empty_tuning_split():
    data, probe_result = _task(np.random.default_rng(5))
    data.windows[TUNING], data.x[TUNING], data.y[TUNING] = [], np.zeros((0, 4)), np.zeros(0, bool)
    out, probabilities = aggregates_baseline(data, probe_result, vocab_size=1, max_len=3)
    assert out["gradient_boosting"]["selection"].startswith("default")
    assert out["probe_plus_aggregates"]["tuning_auroc"] is None
    assert out["probe_plus_aggregates"]["auroc"] > 0.8
    assert {m: {s: len(p) for s, p in by_split.items()} for m, by_split in probabilities.items()} \
        == dict.fromkeys(("aggregates_logistic_regression", "aggregates_gradient_boosting"),
                         {TUNING: 0, TEST: 120})


@pytest.mark.parametrize("labels, expected", [([], True), ([1, 1], True), ([0, 1, 1], False),
                                              (np.array([True, False]), False)])
def test_one_class(labels, expected):
    assert one_class(labels) is expected
