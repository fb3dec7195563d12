"""eval.py's fine-tuning end to end on a tiny run, the pretrained model's head starting from the
probe: both models on every task with paired CIs, the k-shot points, MEDS-DEV predictions
(theirs and the aggregates models') that join back to the label files, the report, and the
per-code vectors exported as embeddings."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation.run_eval import evaluate_run, run_config_with
from cvmae_jax.pooling import pooled_width
from cvmae_jax.train import train_and_evaluate
from cvmae_jax.trained import load_trained

from train_test import tiny_config

SPLITS = ("tuning", "held_out")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(tmp_path_factory.mktemp("data"), num_steps=20, log_every=10,
                         eval_every=20, checkpoint_every=20)
    config.data.synthetic_subjects = 200  # held_out label rows of both classes
    train_and_evaluate(config, workdir)
    config = run_config_with(workdir, {"eval.single_code": False, "eval.finetune.steps": 30,
                                       "eval.finetune.eval_every": 10,
                                       "eval.finetune.kshot_draws": 1,
                                       "eval.finetune.head_init": "probe",
                                       "eval.pooling": "per_code"})
    return workdir, evaluate_run(workdir, config=config)


def test_both_models_are_trained_and_compared_on_every_task(evaluated):
    _, result = evaluated
    downstream = result["downstream"]
    settings = downstream["finetune"]
    assert settings["steps"] == 30 and settings["devices"] == 8
    assert settings["pooling"] == "per_code"  # the heads read the probe's pooling
    assert settings["train_step_traces"] == 1  # every task, model and k-shot draw
    assert any(r["auroc"] is not None for r in downstream["tasks"].values())
    for task, r in downstream["tasks"].items():
        f = r["finetune"]
        assert f["n_train"] == r["n_train"] and f["n"] == r["n"]
        for model in ("pretrained", "scratch"):
            m = f[model]
            first_check = 0 if model == "pretrained" else 1  # the probe's head, checked at 0
            assert first_check <= m["best_step"] <= m["steps_run"] <= 30
            assert m["nonfinite_steps"] == 0
            assert m["encoder_lr_scale"] == (0.1 if model == "pretrained" else 1.0)
            if r["auroc"] is not None:  # held_out with both classes
                assert 0 <= m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1] <= 1
        if r["auroc"] is not None:
            d = f["pretrained_vs_scratch"]
            assert d["delta"] == pytest.approx(f["pretrained"]["auroc"] - f["scratch"]["auroc"])
            assert d["ci"][0] <= d["ci"][1]
            kshot = f["label_efficiency"]
            assert list(kshot) == list(r["label_efficiency"])  # the probe's k
            assert kshot["all"]["auroc_mean"] == f["pretrained"]["auroc"]
            assert all(e["draws"] == 1 for k, e in kshot.items() if k != "all")


def test_predictions_join_back_to_the_label_files(evaluated):
    """The fine-tuned networks' and the aggregates models' MEDS-DEV files."""
    workdir, result = evaluated
    labels = result["downstream"]["labels_dir"]
    calibrated = 0
    for task, r in result["downstream"]["tasks"].items():
        exports = result["exports"][task]["models"]
        expected = {"pretrained", "scratch"}
        if r["aggregates"]["reason"] is None:  # fit: held_out has both classes
            expected |= {"aggregates_logistic_regression", "aggregates_gradient_boosting"}
            if r["aggregates"]["probe_plus_aggregates"]["calibration"]["reason"] is None:
                expected.add("probe_plus_aggregates")
        assert set(exports) == expected
        for split in SPLITS:
            rows = pq.read_table(os.path.join(labels, task, f"{split}.parquet"))
            probe = pq.read_table(os.path.join(workdir, "eval", "predictions", task,
                                               f"{split}.parquet"))
            for model in exports:
                pred = pq.read_table(os.path.join(workdir, "eval", f"predictions_{model}",
                                                  task, f"{split}.parquet"))
                assert exports[model][split] == pred.num_rows == probe.num_rows
                assert pred.select(rows.column_names).equals(rows)  # the label rows as read
                keys = set(zip(rows["subject_id"].to_pylist(),
                               rows["prediction_time"].to_pylist()))
                assert set(zip(pred["subject_id"].to_pylist(),
                               pred["prediction_time"].to_pylist())) == keys
                p = pred["predicted_boolean_probability"].to_numpy()
                assert pred.schema.field("predicted_boolean_probability").type == pa.float64()
                assert ((p > 0) & (p < 1)).all() and np.ptp(p) > 0
                np.testing.assert_array_equal(
                    pred["predicted_boolean_value"].to_numpy(zero_copy_only=False), p >= 0.5)
                calibration = _calibration(r, model)
                if split == "tuning" and calibration and calibration["reason"] is None:
                    y = pred["boolean_value"].to_numpy(zero_copy_only=False)
                    assert p.mean() == pytest.approx(y.mean(), abs=1e-3)  # Platt on tuning
                    calibrated += 1
        if r["auroc"] is not None:  # the held_out files score as metrics.json says
            aggregates = r["aggregates"]
            reported = dict(
                pretrained=r["finetune"]["pretrained"]["auroc"],
                scratch=r["finetune"]["scratch"]["auroc"],
                aggregates_logistic_regression=aggregates["logistic_regression"]["auroc"],
                aggregates_gradient_boosting=aggregates["gradient_boosting"]["auroc"],
                probe_plus_aggregates=aggregates["probe_plus_aggregates"]["auroc"])
            for model in set(reported) & set(exports):
                pred = pq.read_table(os.path.join(workdir, "eval", f"predictions_{model}", task,
                                                  "held_out.parquet"))
                assert roc_auc_score(pred["boolean_value"].to_numpy(zero_copy_only=False),
                                     pred["predicted_boolean_probability"].to_numpy()) == \
                    pytest.approx(reported[model], abs=1e-9)
    assert calibrated > 0  # some tuning file was Platt-scaled and checked


def _calibration(task_result: dict, model: str) -> dict | None:
    """The Platt scaling behind a model's exported probabilities (None: its own)."""
    if model in ("pretrained", "scratch"):
        return task_result["finetune"][model]["calibration"]
    if model == "probe_plus_aggregates":
        return task_result["aggregates"][model]["calibration"]
    return None


def test_report_and_metrics_show_fine_tuning_beside_the_probe(evaluated):
    workdir, result = evaluated
    with open(os.path.join(workdir, "eval", "report.md")) as f:
        report = f.read()
    assert "## Fine-tuning on `held_out`" in report
    assert "each code's events, with each code's presence (`per_code`, as the probe)" in report
    assert "`pretrained`'s head starts at the probe's weights" in report
    for task in result["downstream"]["tasks"]:
        for model in ("probe", "pretrained", "scratch"):
            assert f"| {task} | {model} |" in report
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        saved = json.load(f)
    assert saved["downstream"]["finetune"]["train_step_traces"] == 1
    for task in result["downstream"]["tasks"].values():
        assert task["finetune"]["pretrained"]["head_init"] == "probe"
        assert task["finetune"]["pretrained"]["tuning_curve"][0][0] == 0  # the probe's check


def test_every_exported_file_is_scored_by_meds_evaluation(evaluated):
    pytest.importorskip("meds_evaluation")
    workdir, result = evaluated
    report = open(os.path.join(workdir, "eval", "report.md")).read()
    assert "## The exported predictions scored by meds-evaluation (held_out)" in report
    scored = result["meds_evaluation_models"]
    for task, r in result["downstream"]["tasks"].items():
        models = result["exports"][task]["models"]
        assert {m for m in scored if task in scored[m]} == set(models)
        for model in models:
            assert set(scored[model][task]) == {"tuning", "held_out"}
            held_out = scored[model][task]["held_out"].get("samples_equally_weighted")
            if held_out is None:  # one class
                continue
            auroc = held_out["roc_auc_score"]
            assert f"| {task} | {model} | {auroc:.3f} |" in report
            if model in ("pretrained", "scratch"):  # float32 in meds-evaluation
                assert auroc == pytest.approx(r["finetune"][model]["auroc"], abs=1e-3)


def test_exported_embeddings_are_the_per_code_vectors_the_probe_reads(evaluated):
    workdir, result = evaluated
    run = load_trained(workdir)
    width = pooled_width("per_code", run.config.model.d_model, run.stats.vocab_size)
    assert width > run.config.model.d_model
    for task in result["downstream"]["tasks"]:
        exported = pq.read_table(os.path.join(workdir, "eval", "embeddings", f"{task}.parquet"))
        assert exported.num_rows > 0
        assert {len(e) for e in exported["embedding"].to_pylist()} == {width}
