"""The yardstick of the frozen-embedding probe: as-of aggregate features of each label window
and the models a clinician-statistician would fit on them instead of pretraining.

Features per selected code, from exactly the events the probe encodes (the label row's window,
``sequences.window_rows``: the last max_len selected events at or before prediction_time, or every
code's latest and then the last others; the same usable label rows and splits): last, mean,
min, max, count, hours from the last one to prediction_time, and a missing indicator (no event
of the code in the window: values then the code's train mean, 0, count and hours 0). Values
are in normalized units (clipped at the train quantiles, then z-scored), a per-code affine map
of the clipped raw values that changes neither the standardized logistic regression nor the
splits of the trees.

Two models, fit on train with their settings chosen on tuning by AUROC and reported on held_out
like the probe: the probe's own standardized logistic regression (``fit_task_probe``: C by
tuning AUROC) and scikit-learn's HistGradientBoostingClassifier (``GBM_GRID``; no early
stopping, so the fit is deterministic). Each gets the paired subject-bootstrap CI of the
difference probe - model in held_out AUROC. The fits run on one thread: OpenMP and BLAS thread
pools that wait for busy cores make them many times slower on a shared CPU.

The probe and the aggregates together (``probe_plus_aggregates``): the probe's log-odds plus
those of the aggregates model with the higher tuning AUROC (logistic regression when tuning has
one class or no rows), each scaled to unit spread on tuning, no setting of its own. Its paired
difference to that model answers the question the probe alone cannot: does the encoder's vector
add anything to the hand-made features, whichever of the two is ahead? Its probability (for the
prediction exports) is the sum's Platt scaling on tuning (``calibration``), so that a threshold
of 0.5 means what it says; it has no predictions where that cannot be used
(``calibration.platt``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from cvmae_jax.data.labels import window_words
from cvmae_jax.data.sequences import US_PER_HOUR
from cvmae_jax.evaluation.calibration import platt
from cvmae_jax.evaluation.downstream import (TEST, TRAIN, TUNING, TaskData, fit_task_probe,
                                             held_out_metrics)
from cvmae_jax.evaluation.exports import PREDICTION_SPLITS
from cvmae_jax.evaluation.paired_stats import (SubjectBootstrap, one_class,
                                               paired_auroc_difference)

FEATURES = ("last", "mean", "min", "max", "count", "hours_since_last", "missing")
GBM_GRID = tuple(dict(max_leaf_nodes=leaves, max_iter=iters, learning_rate=0.05,
                      l2_regularization=1.0) for leaves in (7, 15) for iters in (100, 300))
MODELS = ("logistic_regression", "gradient_boosting")
TOGETHER = "probe_plus_aggregates"
PREDICTION_MODELS = (*(f"aggregates_{m}" for m in MODELS), TOGETHER)  # exported by eval.py


def aggregate_features(windows: list[dict], vocab_size: int) -> np.ndarray:
    """float64 [N, vocab_size * len(FEATURES)] of ``label_windows`` dicts (events in time
    order); column ``code * len(FEATURES) + k`` holds FEATURES[k] of that code."""
    out = np.zeros((len(windows), vocab_size, len(FEATURES)))
    out[:, :, FEATURES.index("missing")] = 1.0
    for row, w in zip(out, windows):
        codes, values = w["codes"], np.asarray(w["values"], np.float64)
        if not len(codes):
            continue
        count = np.bincount(codes, minlength=vocab_size).astype(np.float64)
        lowest, highest = np.full(vocab_size, np.inf), np.full(vocab_size, -np.inf)
        np.minimum.at(lowest, codes, values)
        np.maximum.at(highest, codes, values)
        last = np.full(vocab_size, -1)
        np.maximum.at(last, codes, np.arange(len(codes)))
        hours_to_prediction = (w["prediction_time_us"] - w["start_time_us"]) / US_PER_HOUR
        seen = count > 0
        row[seen] = np.stack([
            values[last[seen]], np.bincount(codes, values, vocab_size)[seen] / count[seen],
            lowest[seen], highest[seen], count[seen],
            hours_to_prediction - np.asarray(w["times"], np.float64)[last[seen]],
            np.zeros(seen.sum())], axis=1)
    return out.reshape(len(windows), vocab_size * len(FEATURES))


def _fit_gbm(x, y, settings: dict, seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(early_stopping=False, random_state=seed,
                                          **settings).fit(x, y)


def fit_gradient_boosting(train_x, train_y, tuning_x, tuning_y, seed: int = 0
                          ) -> tuple[HistGradientBoostingClassifier, dict]:
    """The GBM_GRID model with the best tuning AUROC (ties: the earlier, smaller one; the
    first when tuning has one class) fit on train, and {settings, selection, tuning_auroc}."""
    if one_class(tuning_y):
        return _fit_gbm(train_x, train_y, GBM_GRID[0], seed), dict(
            settings=GBM_GRID[0], selection="default (tuning split has one class or no rows)",
            tuning_auroc=None)
    fits = [_fit_gbm(train_x, train_y, s, seed) for s in GBM_GRID]
    scores = [roc_auc_score(tuning_y, m.decision_function(tuning_x)) for m in fits]
    best = int(np.argmax(scores))
    return fits[best], dict(settings=GBM_GRID[best], selection="tuning AUROC",
                            tuning_auroc=float(scores[best]))


def aggregates_baseline(data: TaskData, probe_result: dict, vocab_size: int, max_len: int,
                        seed: int = 0, each_code_latest: bool = False
                        ) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """One task's yardstick: {"features": what the models see, "logistic_regression" and
    "gradient_boosting": held_out metrics as the probe's plus ``probe_minus_model`` (AUROC
    difference with its paired CI), "probe_plus_aggregates": ``_probe_plus_model``}, and the
    probabilities for the prediction exports {"aggregates_<model>" | "probe_plus_aggregates":
    {split: float64 [N]}} on tuning and held_out. Without a held_out probe AUROC
    (``probe_result``'s reason: one class or no rows) the models are not fit, ``reason`` says
    why and there are no probabilities."""
    windows = data.windows
    out = dict(features=dict(
        per_code=list(FEATURES), codes=int(vocab_size), columns=int(vocab_size * len(FEATURES)),
        units="normalized (clipped at train quantiles, z-scored)",
        window=f"the probe's: {window_words(max_len, each_code_latest)}",
        windows_at_max_len={s: sum(len(w["codes"]) >= max_len for w in ws)
                            for s, ws in windows.items()}), reason=None)
    if probe_result.get("auroc") is None:
        out["reason"] = f"as for the probe: {probe_result.get('reason')}"
        return out, {}
    with threadpool_limits(limits=1):
        models, probabilities = _fit_models(data, vocab_size, seed)
    out.update(models)
    return out, probabilities


def _fit_models(data: TaskData, vocab_size: int, seed: int
                ) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """``aggregates_baseline``'s model entries and probabilities."""
    windows, out = data.windows, {}
    x = {s: aggregate_features(ws, vocab_size) for s, ws in windows.items()}
    y = {s: data.y[s].astype(int) for s in windows}
    subjects = [int(w["subject_id"]) for w in windows[TEST]]
    bootstrap = SubjectBootstrap(subjects, seed)
    lr_result, lr = fit_task_probe(x[TRAIN], y[TRAIN], x[TUNING], y[TUNING], x[TEST], y[TEST],
                                   seed, subjects)
    gbm, gbm_result = fit_gradient_boosting(x[TRAIN], y[TRAIN], x[TUNING], y[TUNING], seed)
    # log-odds [N] per model and split
    scores = dict(probe={s: data.probe.decision(data.x[s]) for s in PREDICTION_SPLITS},
                  logistic_regression={s: lr.decision(x[s]) for s in PREDICTION_SPLITS},
                  gradient_boosting={s: _gbm_log_odds(gbm, x[s]) for s in PREDICTION_SPLITS})
    gbm_result.update(n=len(y[TEST]), **held_out_metrics(
        y[TEST], scores["gradient_boosting"][TEST], seed, subjects))
    for name, result in (("logistic_regression", lr_result), ("gradient_boosting", gbm_result)):
        result["probe_minus_model"] = paired_auroc_difference(
            y[TEST], scores["probe"][TEST], scores[name][TEST], bootstrap)
        out[name] = result
    tuning_has_both = not one_class(y[TUNING])
    chosen = (max(MODELS, key=lambda m: out[m]["tuning_auroc"]) if tuning_has_both  # ties: 1st
              else MODELS[0])
    together = _together_scores(scores["probe"], scores[chosen])
    out[TOGETHER] = _probe_plus_model(scores["probe"], scores[chosen], together, y, chosen,
                                      tuning_has_both, subjects, seed, bootstrap)
    probabilities = {f"aggregates_{m}": {s: expit(v) for s, v in scores[m].items()}
                     for m in MODELS}
    out[TOGETHER]["calibration"], calibrated = platt(together, y[TUNING])
    if calibrated is not None:
        probabilities[TOGETHER] = calibrated
    return out, probabilities


def _gbm_log_odds(gbm: HistGradientBoostingClassifier, x: np.ndarray) -> np.ndarray:
    """The model's decision function (log-odds) [N] of features [N, F], also of no rows."""
    return gbm.decision_function(x) if len(x) else np.zeros(0)


def _together_scores(probe: dict, model: dict) -> dict:
    """The probe's and the model's log-odds [N] per split (tuning, held_out) summed, each
    divided by its standard deviation on tuning (no label used; unscaled where that is 0 or
    there are no tuning rows), so neither dominates by its scale (a strongly regularized
    probe's log-odds spread little)."""
    return {s: probe[s] / _spread(probe[TUNING]) + model[s] / _spread(model[TUNING])
            for s in PREDICTION_SPLITS}


def _probe_plus_model(probe: dict, model: dict, together: dict, y: dict, model_name: str,
                      tuning_has_both: bool, subjects: list[int], seed: int,
                      bootstrap: SubjectBootstrap) -> dict:
    """The probe and the aggregates model chosen on tuning together (``together``: the
    ``_together_scores`` of their log-odds ``probe`` and ``model`` [N] per split, both fit on
    train only): held_out metrics as the probe's, its tuning AUROC (None unless tuning has both
    classes), and paired differences to the probe and to the model: above 0 against the model,
    the encoder's vector adds to what the aggregates give that model."""
    result = dict(aggregates_model=model_name, model_selection=(
        "tuning AUROC" if tuning_has_both else "default (tuning split has one class or no rows)"),
        tuning_auroc=float(roc_auc_score(y[TUNING], together[TUNING])) if tuning_has_both
        else None, n=len(y[TEST]), **held_out_metrics(y[TEST], together[TEST], seed, subjects))
    result["minus_probe"] = paired_auroc_difference(y[TEST], together[TEST], probe[TEST],
                                                    bootstrap)
    result["minus_model"] = paired_auroc_difference(y[TEST], together[TEST], model[TEST],
                                                    bootstrap)
    return result


def _spread(scores: np.ndarray) -> float:
    """Standard deviation of ``scores`` [N]; 1 when there is none (no rows, all equal)."""
    spread = float(np.std(scores)) if len(scores) else 0.0
    return spread if spread > 0 else 1.0
