"""eval.py's predictions scored by ``meds-evaluation``, the MEDS ecosystem's scorer (the
``[scoring]`` extra), as a check that the exported files mean what the report says.

For every exported ``predictions/<task>/<split>.parquet`` (the probe's) and
``predictions_<model>/<task>/<split>.parquet`` (the other models'), meds-evaluation's
``evaluate_binary_classification`` (the function behind ``meds-evaluation-cli
predictions_path=... output_file=...``, with its defaults) gives AUROC, average precision,
Brier score, calibration error, accuracy and F1, over rows ("samples_equally_weighted") and
over up to 4 rows drawn per subject ("subjects_equally_weighted"). meds-evaluation reads the
probabilities as float32. A split whose labels are all one class has no AUROC: it is recorded
as undefined, not scored. Without meds-evaluation installed nothing is scored.
"""

from __future__ import annotations

import os
import warnings

from absl import logging

from cvmae_jax.jsonio import json_float

SCORER = "meds-evaluation"


def _evaluator():
    """meds-evaluation's binary-classification function, or None when it is not installed."""
    try:
        from meds_evaluation.evaluate import evaluate_binary_classification
    except ImportError:
        return None
    return evaluate_binary_classification


def score_file(path: str, evaluate=None) -> dict:
    """meds-evaluation's metrics of one predictions file ({block: {metric: float}}), or
    {"undefined": reason} when its labels are all one class."""
    import polars as pl

    evaluate = evaluate or _evaluator()
    predictions = pl.read_parquet(path)
    if predictions["boolean_value"].n_unique() < 2:
        return {"undefined": "the labels are all one class"}
    with warnings.catch_warnings(record=True) as caught:  # one line instead of a few per file
        warnings.simplefilter("always")
        result = evaluate(predictions)
    if caught:
        logging.info("meds-evaluation on %s: %d warning(s) from its metrics, e.g. %s", path,
                     len(caught), str(caught[0].message).splitlines()[0])
    return {block: {name: json_float(value) for name, value in metrics.items()}
            for block, metrics in result.items()}


def score_exports(eval_dir: str, exports: dict) -> tuple[dict, dict]:
    """``score_file`` of every predictions file in ``exports`` (``run_eval``'s {task:
    {"predictions": {split: rows}, "models": {model: {split: rows}}}}): the probe's
    {task: {split: score}} and the other models' {model: {task: {split: score}}}; both {}
    without meds-evaluation."""
    evaluate = _evaluator()
    if evaluate is None:
        logging.info("eval: meds-evaluation is not installed; predictions not scored by it "
                     "(pip install -e '.[scoring]' in the checkout)")
        return {}, {}
    probe, models = {}, {}
    for task, written in exports.items():
        if written["predictions"]:
            probe[task] = _score_folder(evaluate, eval_dir, "predictions", task,
                                        written["predictions"])
            _log(task, "probe", probe[task])
        for model, splits in written.get("models", {}).items():
            models.setdefault(model, {})[task] = scores = _score_folder(
                evaluate, eval_dir, f"predictions_{model}", task, splits)
            _log(task, model, scores)
    return probe, models


def _score_folder(evaluate, eval_dir: str, folder: str, task: str, splits) -> dict:
    """{split: score_file(...)} of ``<eval_dir>/<folder>/<task>/<split>.parquet``."""
    return {split: score_file(os.path.join(eval_dir, folder, task, f"{split}.parquet"), evaluate)
            for split in splits}


def _log(task: str, model: str, scores: dict) -> None:
    for split, score in scores.items():
        auroc = score.get("samples_equally_weighted", {}).get("roc_auc_score")
        logging.info("eval %s %s %s: %s AUROC %s", task, split, model, SCORER,
                     "undefined (one class)" if auroc is None else f"{auroc:.4f}")
