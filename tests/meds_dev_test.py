"""The MEDS-DEV model entry (meds_dev/cvmae/) run as MEDS-DEV runs it, end to end on the
synthetic data: labels command -> pretraining -> probe -> predictions in MEDS-DEV's schema ->
meds-evaluation, whose AUROC must equal the one eval.py reports."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

pytest.importorskip("aces")
schema = pytest.importorskip("meds_evaluation.schema")
yaml = pytest.importorskip("yaml")

from cvmae_jax.data.synthetic import generate_synthetic_meds  # noqa: E402
from cvmae_jax.evaluation.meds_evaluation import score_file  # noqa: E402
from cvmae_jax.labels import make_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "meds_dev" / "cvmae"
STAGES = (("unsupervised", "train"), ("supervised", "train"), ("supervised", "predict"))
# meds-evaluation 0.0.3 (MEDS-DEV 0.0.14's pin) checks these types exactly; 0.0.6 casts.
MEDS_DEV_TYPES = {"subject_id": pa.int64(), "prediction_time": pa.timestamp("us"),
                  "boolean_value": pa.bool_(), "predicted_boolean_value": pa.bool_(),
                  "predicted_boolean_probability": pa.float64()}


def model_yaml() -> dict:
    return yaml.safe_load((ENTRY / "model.yaml").read_text())


def command(dataset_type: str, mode: str, **variables) -> str:
    """The entry's command for one stage, filled in as MEDS-DEV's fmt_command does."""
    return model_yaml()["commands"][dataset_type][mode].format(**variables)


def test_model_yaml_has_what_meds_dev_requires():
    entry = model_yaml()
    metadata = entry["metadata"]
    assert isinstance(metadata["description"], str) and metadata["description"]
    assert metadata["contacts"] and all(isinstance(c["name"], str) for c in metadata["contacts"])
    for dataset_type, mode in STAGES:
        line = command(dataset_type, mode, dataset_dir="D", labels_dir="L", output_dir="O",
                       model_initialization_dir="I", model_dir="M", split="held_out",
                       demo=False)
        assert line.startswith("python -m cvmae_jax.meds_dev ") and "{" not in line


def test_score_file_is_sklearns_auroc_and_undefined_for_one_class(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    p = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    table = pa.table({"subject_id": pa.array(np.arange(60) // 2, pa.int64()),
                      "prediction_time": pa.array(np.arange(60) * 10**9, pa.timestamp("us")),
                      "boolean_value": y, "predicted_boolean_value": p >= 0.5,
                      "predicted_boolean_probability": pa.array(p, pa.float64())})
    pq.write_table(table, tmp_path / "p.parquet")
    scores = score_file(str(tmp_path / "p.parquet"))
    assert scores["samples_equally_weighted"]["roc_auc_score"] == pytest.approx(
        roc_auc_score(y, p.astype(np.float32)), abs=1e-12)
    pq.write_table(table.set_column(2, "boolean_value", pa.array(np.zeros(60, bool))),
                   tmp_path / "one.parquet")
    assert score_file(str(tmp_path / "one.parquet")) == {
        "undefined": "the labels are all one class"}


def test_the_scorers_warnings_are_one_log_line(tmp_path, caplog):
    """scikit-learn's warnings inside meds-evaluation (an AUROC of a resample with one class,
    on small label sets) become one log line per file instead of interleaving with progress."""
    table = pa.table({"subject_id": pa.array([1, 2], pa.int64()),
                      "prediction_time": pa.array([0, 10**9], pa.timestamp("us")),
                      "boolean_value": [True, False], "predicted_boolean_value": [True, False],
                      "predicted_boolean_probability": [0.9, 0.1]})
    pq.write_table(table, tmp_path / "p.parquet")

    def warning_evaluate(predictions):
        for _ in range(3):
            warnings.warn("Only one class is present in y_true.\nROC AUC score is not defined",
                          UndefinedMetricWarning)
        return {"samples_equally_weighted": {"roc_auc_score": 1.0}}

    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        scores = score_file(str(tmp_path / "p.parquet"), warning_evaluate)
    assert escaped == [] and scores == {"samples_equally_weighted": {"roc_auc_score": 1.0}}
    assert [r.getMessage() for r in caplog.records if "from its metrics" in r.getMessage()] == [
        f"meds-evaluation on {tmp_path / 'p.parquet'}: 3 warning(s) from its metrics, e.g. "
        "Only one class is present in y_true."]


@pytest.mark.slow
def test_meds_dev_entry_end_to_end_on_synthetic_data(tmp_path):
    dataset = tmp_path / "meds"
    generate_synthetic_meds(dataset, num_subjects=80, seed=3)
    labels = tmp_path / "task_labels" / "in_hospital_mortality_24h"
    counts = make_labels(str(dataset), "in_hospital_mortality_24h", output_dir=str(labels))
    out = {stage: tmp_path / "_".join(stage) for stage in STAGES}
    init = {STAGES[1]: out[STAGES[0]], STAGES[2]: out[STAGES[1]]}
    for stage in STAGES:
        out[stage].mkdir()
        line = command(*stage, dataset_dir=dataset, labels_dir=labels, output_dir=out[stage],
                       model_initialization_dir=init.get(stage, ""), model_dir=ENTRY,
                       split="held_out", demo=True)
        run = subprocess.run(line, shell=True, cwd=out[stage], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO),
                                      PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
        assert run.returncode == 0, (line, run.stderr[-3000:])

    predictions = pq.read_table(out[STAGES[2]] / "predictions.parquet")
    assert {n: predictions.schema.field(n).type for n in MEDS_DEV_TYPES} == MEDS_DEV_TYPES
    schema.PredictionSchema.align(predictions)  # meds-evaluation's check
    held_out = pq.read_table(labels / "held_out.parquet")
    rows = dict(zip(zip(held_out["subject_id"].to_pylist(),
                        held_out["prediction_time"].to_pylist()),
                    held_out["boolean_value"].to_pylist()))
    predicted = list(zip(predictions["subject_id"].to_pylist(),
                         predictions["prediction_time"].to_pylist()))
    assert 0 < len(predicted) <= counts["held_out"]["rows"] == len(rows)
    assert [rows[k] for k in predicted] == predictions["boolean_value"].to_pylist()

    metrics = json.loads((out[STAGES[1]] / "run" / "eval" / "metrics.json").read_text())
    reported = metrics["downstream"]["tasks"]["task"]["auroc"]
    scored = metrics["meds_evaluation"]["task"]["held_out"]["samples_equally_weighted"]
    evaluation = tmp_path / "evaluation.json"
    cli = subprocess.run([str(Path(sys.executable).parent / "meds-evaluation-cli"),
                          f"predictions_path={out[STAGES[2]] / 'predictions.parquet'}",
                          f"output_file={evaluation}"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert cli.returncode == 0, cli.stderr[-3000:]
    by_cli = json.loads(evaluation.read_text())["samples_equally_weighted"]["roc_auc_score"]
    assert reported is not None and by_cli == pytest.approx(reported, abs=1e-12)
    assert scored["roc_auc_score"] == by_cli
    assert f"| {reported:.3f}" in (out[STAGES[1]] / "run" / "eval" / "report.md").read_text()
