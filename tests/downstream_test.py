"""Downstream linear probes: probe metrics on constructed data and end to end on a tiny run,
with eval.py's single-code, label-efficiency, perturbation and export outputs.
(That label windows never reach past their prediction time is tested in data/labels_test.py,
and at the embedding level in eval_exports_test.py.)"""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cvmae_jax import run_setup
from cvmae_jax.data import meds
from cvmae_jax.data.prepare import prepare_dataset
from cvmae_jax.data.synthetic import synthetic_meds_root
from cvmae_jax.data.pipeline import padded_rows
from cvmae_jax.evaluation.downstream import (C_GRID, embed_label_windows, fit_probe,
                                             fit_task_probe, probe_task, read_label_tasks,
                                             task_windows)
from cvmae_jax.evaluation.results import per_lab_table
from cvmae_jax.evaluation import run_eval
from cvmae_jax.evaluation.run_eval import evaluate_run
from cvmae_jax.evaluation.staging import NoRoom
from cvmae_jax.run_setup import check_eval_dataset, resolve_meds_dir
from cvmae_jax.damaged_checkpoints import DamagedCheckpointError
from cvmae_jax.train import train_and_evaluate
from cvmae_jax.trained import load_trained
from cvmae_jax.workdir import run_config
from cvmae_jax.workdir_lock import WorkdirLock, evaluation

from train_test import tiny_config

TASKS = ("in_hospital_mortality_24h", "readmission_30d")


def _split(rng, n, signal):
    y = rng.random(n) < 0.3
    y[:2] = [True, False]  # both classes present
    noise = rng.normal(size=(n, 3))
    x = np.c_[y.astype(float) if signal else rng.normal(size=n), noise]
    return x, y


def test_probe_separates_a_perfect_feature():
    rng = np.random.default_rng(0)
    r = probe_task(*_split(rng, 200, True), *_split(rng, 100, True), *_split(rng, 150, True),
                   seed=3)
    assert r["auroc"] == pytest.approx(1.0) and r["auprc"] == pytest.approx(1.0)
    assert r["auroc_ci"] == pytest.approx([1.0, 1.0])
    assert r["n"] == 150 and r["seed"] == 3 and r["split"] == "held_out"
    assert r["c_selection"] == "tuning AUROC" and r["reason"] is None


def test_the_probe_takes_c_by_tuning_auroc_and_fits_on_train_alone():
    rng = np.random.default_rng(0)
    (train_x, train_y), (tuning_x, tuning_y), (test_x, test_y) = (
        _weak_split(rng, n) for n in (120, 80, 100))
    r, probe = fit_task_probe(train_x, train_y, tuning_x, tuning_y, test_x, test_y)
    fits = {c: fit_probe(train_x, train_y, c) for c in C_GRID}
    on_train = {c: roc_auc_score(train_y, f.decision(train_x)) for c, f in fits.items()}
    on_tuning = {c: roc_auc_score(tuning_y, f.decision(tuning_x)) for c, f in fits.items()}
    assert max(on_train, key=on_train.get) != r["C"]  # train alone would choose another C
    assert on_tuning[r["C"]] == r["tuning_auroc"] == max(on_tuning.values())
    np.testing.assert_allclose(probe.decision(test_x), fits[r["C"]].decision(test_x))
    assert r["auroc"] == pytest.approx(roc_auc_score(test_y, fits[r["C"]].decision(test_x)))


def _weak_split(rng, n):
    """Labels and one weak signal among 20 noise features: a large C overfits train."""
    y = rng.random(n) < 0.4
    return np.c_[0.8 * y + rng.normal(size=n), rng.normal(size=(n, 20))], y


def test_probe_on_noise_is_near_chance():
    rng = np.random.default_rng(1)
    r = probe_task(*_split(rng, 300, False), *_split(rng, 200, False),
                   *_split(rng, 400, False), seed=0)
    assert abs(r["auroc"] - 0.5) < 0.1
    lo, hi = r["auroc_ci"]
    assert lo <= 0.5 <= hi and lo <= r["auroc"] <= hi
    assert r["bootstrap_used"] == 1000


def test_probe_cis_resample_subjects_so_repeated_rows_add_no_evidence():
    """Each held_out subject's label row repeated 3 times (several prediction times with the
    same outcome and features): resampling subjects gives the CIs of the rows taken once."""
    rng = np.random.default_rng(5)
    train, tuning, (x_test, y_test) = (_split(rng, n, False) for n in (300, 200, 120))
    x_test[:, 0] += 0.8 * y_test  # some signal, so the CIs are not degenerate
    once = probe_task(*train, *tuning, x_test, y_test, seed=0)
    repeated = probe_task(*train, *tuning, np.repeat(x_test, 3, 0), np.repeat(y_test, 3),
                          seed=0, test_subjects=np.repeat(np.arange(120), 3))
    assert repeated["n"] == 360 and repeated["n_subjects"] == once["n_subjects"] == 120
    assert repeated["auroc"] == pytest.approx(once["auroc"])
    assert repeated["auroc_ci"] == pytest.approx(once["auroc_ci"], rel=1e-12)
    assert repeated["auprc_ci"] == pytest.approx(once["auprc_ci"], rel=1e-12)
    by_row = probe_task(*train, *tuning, np.repeat(x_test, 3, 0), np.repeat(y_test, 3), seed=0)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_row["auroc_ci"]) < 0.8 * width(once["auroc_ci"])  # rows: too narrow


def test_probe_single_class_held_out_and_tuning():
    rng = np.random.default_rng(2)
    x_test, _ = _split(rng, 50, True)
    x_tune, _ = _split(rng, 40, True)
    r = probe_task(*_split(rng, 200, True), x_tune, np.zeros(40, bool), x_test,
                   np.zeros(50, bool), seed=0)
    assert r["auroc"] is None and r["auroc_ci"] is None and r["auprc"] is None
    assert "single class" in r["reason"] and r["n"] == 50 and r["prevalence"] == 0.0
    assert r["C"] == 1.0 and r["c_selection"].startswith("default")
    from cvmae_jax.evaluation.downstream import report_lines

    text = "\n".join(report_lines(dict(tasks=dict(death=r), probe="a probe", seed=0)))
    assert ("- death: C=1, the default (tuning split has one class): nothing on this task is "
            "chosen on tuning (C, the aggregates' settings, fine-tuning's stopping step)") in text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(data, num_steps=30, log_every=15, eval_every=30, checkpoint_every=30)
    train_and_evaluate(config, workdir)
    return workdir, config


def quick_eval_config(workdir):
    """The run's config with the single-code pass and fine-tuning off (eval.py in seconds)."""
    config = run_config(str(workdir))
    with config.unlocked():
        config.eval.single_code = False
        config.eval.finetune.enabled = False
    return config


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    workdir, _ = tiny_run
    return workdir, evaluate_run(workdir, split="held_out")


def test_eval_reports_downstream_probes(evaluated):
    workdir, result = evaluated
    tasks = result["downstream"]["tasks"]
    assert set(TASKS) <= set(tasks)
    for task in TASKS:
        r = tasks[task]
        assert r["n"] > 0 and r["n_train"] > 0, (task, r)
        assert r["split"] == "held_out" and r["seed"] == result["downstream"]["seed"]
        if r["auroc"] is None:
            assert r["reason"]
        else:
            assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["auprc"] <= 1.0
            for key in ("auroc_ci", "auprc_ci"):
                lo, hi = r[key]
                assert 0.0 <= lo <= hi <= 1.0, (task, key, r[key])
    with open(os.path.join(workdir, "eval", "report.md")) as f:
        report = f.read()
    assert "## Downstream prediction" in report
    assert all(f"| {task} |" in report for task in TASKS)
    assert "# Reconstruction on `held_out`" in report  # the reconstruction part is unchanged
    assert result["downstream"]["embed_traces"] == 1  # one compile for every task and split
    for task in TASKS:  # the same probe on the network before pretraining
        r = tasks[task]
        if r["auroc"] is None:
            assert r["untrained"]["reason"]
            continue
        untrained = r["untrained"]
        assert untrained["n"] == r["n"] and untrained["c_selection"] == "tuning AUROC"
        assert untrained["probe_minus_untrained"]["delta"] == pytest.approx(
            r["auroc"] - untrained["auroc"])
        assert f"| {task} | {r['auroc']:.3f}" in report.split("probe - untrained")[1]


def test_eval_reports_the_yardstick_beside_the_model(evaluated):
    workdir, result = evaluated
    overall = result["overall"]
    assert 0 < overall["locf_fallback_share"] < 1 and overall["locf_masked_mse"] > 0
    assert overall["mse_vs_locf"] == overall["masked_mse"] / overall["locf_masked_mse"]
    for task in TASKS:
        probe = result["downstream"]["tasks"][task]
        aggregates = probe["aggregates"]
        assert aggregates["reason"] or aggregates["gradient_boosting"]["n"] == probe["n"]
    with open(os.path.join(workdir, "eval", "report.md")) as f:
        report = f.read()
    assert "## Does pretraining earn its keep?" in report
    assert f"| carry-forward (LOCF) | {overall['locf_masked_mse']:.4f} |" in report
    assert any(f"| {task} | {result['downstream']['tasks'][task]['n']} |" in report
               for task in TASKS)


def test_eval_names_labs_from_the_synthetic_codes_metadata(evaluated):
    workdir, result = evaluated
    names = {r["code"]: r["name"] for r in result["per_code"]}
    assert names["LAB//50912//mg/dL"] == "Creatinine [mg/dL]"
    with open(os.path.join(workdir, "eval", "report.md")) as f:
        assert "| Creatinine [mg/dL] | `LAB//50912//mg/dL` |" in f.read()
    labs = per_lab_table(workdir)  # the DataFrame of the same rows
    assert list(labs["code"]) == [r["code"] for r in result["per_code"]]
    assert dict(zip(labs["code"], labs["name"])) == names


def test_empty_window_embeds_to_zeros_and_padding_does_not_matter():
    from cvmae_jax.model import ModelConfig
    from cvmae_jax.steps import init_state, make_optimizer

    config = tiny_config("unused")
    graphdef, state = init_state(ModelConfig.from_config(config.model, 10),
                                 make_optimizer(config.train), 0)
    empty = dict(times=np.zeros(0, np.float32), codes=np.zeros(0, np.int32),
                 values=np.zeros(0, np.float32))
    full = dict(times=np.arange(5, dtype=np.float32), codes=np.arange(1, 6, dtype=np.int32),
                values=np.linspace(-1, 1, 5).astype(np.float32))
    x = embed_label_windows(graphdef, state.params, [empty, full, full], 8, 2)
    assert x.shape == (3, config.model.d_model)
    np.testing.assert_array_equal(x[0], 0.0)
    assert np.abs(x[1]).sum() > 0
    np.testing.assert_allclose(x[1], x[2], rtol=1e-5, atol=1e-6)  # batch position/pad free


def test_eval_writes_single_code_label_efficiency_and_perturbation(evaluated):
    workdir, result = evaluated
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        saved = json.load(f)
    single = saved["single_code"]
    rows = [r for r in single["per_code"] if r["num_masked"]]
    assert len(single["per_code"]) == len(result["per_code"]) and rows
    for r in rows:
        assert {"code", "num_masked", "mse", "mae", "rmse", "baseline_mse", "raw_rmse",
                "raw_mae", "cv"} <= set(r)
    # Every real value of the split is hidden exactly once, more than under the 30% mask.
    assert single["overall"]["num_masked"] == saved["perturbation"]["n"]
    assert single["overall"]["num_masked"] > result["overall"]["num_masked"]
    tiers = single["by_cv_tier"]
    assert (tiers["high_cv"]["num_masked"] + tiers["low_cv"]["num_masked"]
            == single["overall"]["num_masked"])
    for task in TASKS:
        r = saved["downstream"]["tasks"][task]
        curve = r["label_efficiency"]
        assert list(curve) == [str(k) for k in (16, 64, 256) if k < r["n_train"]] + ["all"]
        assert curve["all"]["n_train"] == r["n_train"]
        for k, e in curve.items():
            assert e["split"] == "held_out" and e["n_test"] == r["n"]
            if r["auroc"] is None:  # the tiny held_out split may have one class
                assert e["auroc_mean"] is None and e["draws"] == 0 and e["reason"]
                continue
            assert e["draws"] == len(e["aurocs"]) == (1 if k == "all" else 5)
            assert all(0.0 <= a <= 1.0 for a in e["aurocs"])
            assert (e["auroc_std"] is None) == (k == "all")
        if r["auroc"] is not None:
            assert curve["all"]["auroc_mean"] == pytest.approx(r["auroc"])
    p = saved["perturbation"]
    assert p["split"] == "held_out" and p["seed"] == 0 and p["n"] > 0
    for kind in ("shuffle_within_code", "code_mean"):
        rec = p[kind]["reconstruction"]
        assert rec["masked_mse_clean"] == pytest.approx(result["overall"]["masked_mse"])
        assert rec["ratio"] == pytest.approx(rec["masked_mse_corrupted"] / rec["masked_mse_clean"])
        assert rec["num_masked"] == result["overall"]["num_masked"]  # the same uniform mask
        for task in TASKS:
            d, r = p[kind]["downstream"][task], saved["downstream"]["tasks"][task]
            assert d["n"] == r["n"] and d["mean_abs_prob_change"] > 0
            if r["auroc"] is None:
                assert d["auroc_clean"] is None and d["reason"]
            else:
                assert d["auroc_clean"] == pytest.approx(r["auroc"])
                assert 0.0 <= d["auroc_corrupted"] <= 1.0
    assert p["code_mean"]["reconstruction"]["masked_mse_corrupted"] != \
        p["shuffle_within_code"]["reconstruction"]["masked_mse_corrupted"]
    assert result["downstream"]["embed_traces"] == 1  # perturbed windows reuse the compile
    with open(os.path.join(workdir, "eval", "report.md")) as f:
        report = f.read()
    for heading in ("## Single-code reconstruction on `held_out`", "## Label efficiency",
                    "## Perturbation sensitivity", "## Exports"):
        assert heading in report
    assert os.path.getsize(os.path.join(workdir, "eval", "label_efficiency.png")) > 0


def test_eval_exports_match_the_label_files(evaluated):
    workdir, result = evaluated
    with open(os.path.join(workdir, "config.json")) as f:
        d_model = json.load(f)["model"]["d_model"]
    labels = result["downstream"]["labels_dir"]
    splits = ("train", "tuning", "held_out")
    for task in TASKS:
        files = {s: pq.read_table(os.path.join(labels, task, f"{s}.parquet")) for s in splits}
        emb = pq.read_table(os.path.join(workdir, "eval", "embeddings", f"{task}.parquet"))
        assert emb.schema.field("subject_id").type == pa.int64()
        assert emb.schema.field("prediction_time").type == pa.timestamp("us")
        assert emb.schema.field("split").type == pa.string()
        assert emb.schema.field("embedding").type == pa.list_(pa.float32())
        assert emb.num_rows == sum(t.num_rows for t in files.values())
        assert emb["split"].to_pylist() == [s for s in splits for _ in range(files[s].num_rows)]
        assert {len(e) for e in emb["embedding"].to_pylist()} == {d_model}
        for s in splits:  # label-file order within each split
            mine = emb.filter(pc.equal(emb["split"], s))
            assert mine["subject_id"].equals(files[s]["subject_id"].cast(pa.int64()))
            assert mine["prediction_time"].equals(files[s]["prediction_time"])
        for s in ("tuning", "held_out"):
            pred = pq.read_table(os.path.join(workdir, "eval", "predictions", task,
                                              f"{s}.parquet"))
            assert pred.num_rows == files[s].num_rows
            assert pred.select(files[s].column_names).equals(files[s])  # label rows as read
            prob = pred["predicted_boolean_probability"]
            assert prob.type == pa.float64()
            assert pred.schema.field("predicted_boolean_value").type == pa.bool_()
            p = prob.to_numpy()
            assert ((p >= 0) & (p <= 1)).all()
            np.testing.assert_array_equal(pred["predicted_boolean_value"].to_numpy(
                zero_copy_only=False), p >= 0.5)
        assert result["exports"][task]["embeddings"] == emb.num_rows


def _meds_dir(tiny_run):
    workdir, config = tiny_run
    return resolve_meds_dir(config, workdir)


def test_bad_label_files_stop_eval_before_any_output(tiny_run, tmp_path):
    workdir, config = tiny_run
    labels = tmp_path / "labels"
    os.makedirs(labels / TASKS[0])
    table = pq.read_table(os.path.join(_meds_dir(tiny_run), "labels", TASKS[0], "train.parquet"))
    pq.write_table(table.drop(["prediction_time"]), labels / TASKS[0] / "train.parquet")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.eval.labels_dir = str(labels)
    out = os.path.join(workdir, "eval")
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    with pytest.raises(meds.MEDSFormatError, match="train.parquet: column 'prediction_time' is "
                                                   "missing"):
        evaluate_run(workdir, config=config)
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before


def test_an_explicit_labels_dir_must_hold_tasks(tiny_run, tmp_path):
    meds_dir, stats = _meds_dir(tiny_run), None  # stats: never reached, the folder check is first
    with pytest.raises(FileNotFoundError, match="labels_dir=.*missing: no such folder"):
        read_label_tasks(meds_dir, stats, 32, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no task folder with"):
        read_label_tasks(meds_dir, stats, 32, str(tmp_path))
    # the default <meds_dir>/labels may be absent: no downstream tasks then
    assert read_label_tasks(str(tmp_path), stats, 32) == (str(tmp_path / "labels"), {})


def test_eval_of_a_chosen_step_writes_its_own_folder(tmp_path):
    data, workdir = tmp_path / "data", str(tmp_path / "run")
    train_and_evaluate(tiny_config(data, num_steps=30, log_every=15, eval_every=30,
                                   checkpoint_every=15), workdir)
    result = evaluate_run(workdir, config=quick_eval_config(workdir), step=15)
    assert result["step"] == 15 and not os.path.exists(os.path.join(workdir, "eval"))
    written = json.load(open(os.path.join(workdir, "eval_step15", "metrics.json")))
    assert written["step"] == 15 and written["overall"] == result["overall"]
    with pytest.raises(ValueError, match=r"checkpoints: --step=20: no complete checkpoint of "
                                         r"that step \(complete: 15, 30\)"):
        evaluate_run(workdir, config=quick_eval_config(workdir), step=20)
    assert sorted(p for p in os.listdir(workdir) if p.startswith("eval")) == ["eval_step15"]
    os.remove(os.path.join(workdir, "checkpoints", "15", "state", "_METADATA"))
    with pytest.raises(DamagedCheckpointError, match="15"):  # said as it is, not as deleted
        evaluate_run(workdir, config=quick_eval_config(workdir), step=15)


def test_eval_builds_the_model_from_the_checkpoints_own_settings(tiny_run, tmp_path, caplog):
    """A config.json that differs from the checkpoint's settings (copied from another run,
    edited, or rewritten by a resume with allow_config_change that stopped before its next
    save): the checkpoint is evaluated with its own settings, and a warning names the fields."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    saved = json.loads((workdir / "config.json").read_text())
    saved["model"]["d_model"] = 64
    (workdir / "config.json").write_text(json.dumps(saved))
    config = quick_eval_config(workdir)
    with caplog.at_level("WARNING"):
        result = evaluate_run(str(workdir), config=config)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(
        "eval: config.json differs from the settings the checkpoint at step 30 was saved with "
        "(checkpoint -> config.json: model.d_model: 32 -> 64); evaluating the checkpoint with "
        "its own")]
    assert result["step"] == 30 and np.isfinite(result["overall"]["masked_mse"])
    assert "finetune" not in result["downstream"]  # the caller's eval.* fields kept


def test_sigterm_while_eval_writes_leaves_the_earlier_results(evaluated, tmp_path,
                                                             monkeypatch):
    """A SIGTERM (a preemption) during the evaluation raises Terminated (eval.py: one line,
    exit 143): the staged results are removed and the earlier ones stay as they were."""
    from cvmae_jax.evaluation import report
    from cvmae_jax.preemption import Terminated

    workdir = tmp_path / "run"
    shutil.copytree(evaluated[0], workdir)
    out = workdir / "eval"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config = quick_eval_config(workdir)

    def terminated(*args):
        if signal.getsignal(signal.SIGTERM) is handler:  # the kill would end the test run
            raise AssertionError("the evaluation installed no SIGTERM handler")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
        raise AssertionError("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(report, "write_report", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="the earlier results are as they were"):
        evaluate_run(str(workdir), config=config)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.glob(".incomplete-*"))
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_eval_results_move_in_metrics_last_and_only_where_there_is_room(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    config = quick_eval_config(workdir)
    (workdir / "eval" / "report.md").mkdir(parents=True)  # a folder where a file goes
    with pytest.raises(NoRoom, match="report.md: a folder where eval.py writes a file"):
        evaluate_run(str(workdir), config=config)
    assert sorted(os.listdir(workdir / "eval" / "report.md")) == []
    assert not (workdir / "eval" / "metrics.json").exists()
    shutil.rmtree(workdir / "eval")
    with mock.patch.object(shutil, "move", wraps=shutil.move) as move:
        evaluate_run(str(workdir), config=config)
    moved = [os.path.relpath(call.args[1], workdir / "eval") for call in move.call_args_list]
    assert "report.md" in moved and moved[-1] == "metrics.json"
    assert not [name for name in os.listdir(workdir / "eval") if name.startswith(".")]


def test_one_evaluation_per_results_folder_which_removes_what_a_killed_one_left(
        tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    config = quick_eval_config(workdir)
    ended = subprocess.Popen(["true"])
    ended.wait()
    staging = f".incomplete-{socket.gethostname()}-{ended.pid}-"
    killed = workdir / "eval" / f"{staging}a1b2"  # a `kill -9` while it wrote
    (killed / "embeddings").mkdir(parents=True)
    (killed / "embeddings" / "death.parquet").write_text("half written")
    waiting = workdir / "eval" / f"{staging}c3d4"  # finished, but NoRoom kept it out
    waiting.mkdir()
    (waiting / "metrics.json").write_text("{}")
    held = WorkdirLock(str(workdir), evaluation("eval"))
    with pytest.raises(ValueError, match=r"run: another eval.py \(or study\) is writing "
                                         r"this run's eval/ now; wait for it to end"):
        evaluate_run(str(workdir), config=config)
    assert killed.is_dir() and not (workdir / "eval" / "metrics.json").exists()
    evaluate_run(str(workdir), config=config, split="tuning")  # another folder: side by side
    assert (workdir / "eval_tuning" / "metrics.json").is_file()
    held.release()
    with config.unlocked():
        config.train.num_steps = 60  # config.json's plan: the run is still training
    with mock.patch.object(run_eval.logging, "warning") as warning:
        evaluate_run(str(workdir), config=config)
    assert any(call.args[1:] == (30, 60) and "its training has not ended" in call.args[0]
               for call in warning.call_args_list)
    assert not killed.exists() and (waiting / "metrics.json").is_file()
    assert [call.args[1] for call in warning.call_args_list
            if "never moved into" in call.args[0]] == [str(waiting)]
    assert (workdir / "eval" / "metrics.json").is_file()
    again = WorkdirLock(str(workdir), evaluation("eval"))  # released by the evaluation
    assert again.fd is not None
    again.release()


def _training_goes_on(monkeypatch, checkpoints, times, deleting="."):
    """Checkpointer.restore_state as while a train.py trains the run: the first ``times``
    reads find the step deleted (the training saved the step 10 later and deleted the step's
    folder ``deleting``: "." all of it, "state" the part deleted first)."""
    from cvmae_jax.checkpoint import Checkpointer

    restore, read = Checkpointer.restore_state, []

    def restore_state(directory, step, *args, **kwargs):
        read.append(step)
        if len(read) <= times:
            shutil.copytree(checkpoints / str(step), checkpoints / str(step + 10))
            shutil.rmtree(checkpoints / str(step) / deleting)
        return restore(directory, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "restore_state", staticmethod(restore_state))
    return read


def test_a_checkpoint_the_training_deletes_before_it_is_read_gives_way_to_the_newest(
        tiny_run, tmp_path, monkeypatch):
    """Orbax deletes a folder file by file: the read fails while the step's folder is still
    there, half deleted."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    read = _training_goes_on(monkeypatch, workdir / "checkpoints", times=1, deleting="state")
    with mock.patch.object(run_eval.logging, "warning") as warning:
        result = evaluate_run(str(workdir), config=quick_eval_config(workdir))
    assert read == [30, 40] and result["step"] == 40
    assert [call.args[1] for call in warning.call_args_list
            if "was deleted by the training" in call.args[0]] == [30]
    assert json.loads((workdir / "eval" / "metrics.json").read_text())["step"] == 40


def test_eval_gives_up_on_a_run_whose_checkpoints_keep_being_deleted(tiny_run, tmp_path,
                                                                      monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    read = _training_goes_on(monkeypatch, workdir / "checkpoints",
                             times=run_eval.RESTORE_ATTEMPTS)
    with pytest.raises(ValueError, match=re.escape(
            f"{workdir / 'checkpoints'}: checkpoints 30, 40, 50 were each deleted by the "
            "training before eval.py read them: evaluate the run once its training ends, or "
            "raise train.keep_checkpoints")):
        evaluate_run(str(workdir), config=quick_eval_config(workdir))
    assert read == [30, 40, 50]
    assert not (workdir / "eval").exists()


def test_eval_refuses_data_with_other_lab_codes(tiny_run, tmp_path):
    """Another MEDS root ranks the labs differently: the code embeddings would be misread."""
    workdir, config = tiny_run
    config = config.copy_and_resolve_references()
    other = synthetic_meds_root(str(tmp_path), 60, seed=1)
    with config.unlocked():
        config.data.meds_dir = other
    out = os.path.join(workdir, "eval")
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    prepared = sorted(glob.glob(os.path.join(run_setup.data_dir(config, workdir), "*", "*")))
    with pytest.raises(ValueError, match=r"data_stats.json: the run was trained on \d+ lab codes;"
                                         r" the data prepared for evaluation .* in another order"):
        evaluate_run(workdir, config=config)
    assert config.eval.split == "tuning"  # the caller's config is not changed
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before
    # the dataset prepared from the other root is removed again; the run's own stays
    assert sorted(glob.glob(os.path.join(run_setup.data_dir(config, workdir), "*", "*"))) == (
        prepared)


def test_eval_dataset_check_names_missing_codes_and_warns_on_new_files(tiny_run, tmp_path):
    workdir, _ = tiny_run
    with open(os.path.join(workdir, "data_stats.json")) as f:
        saved = json.load(f)
    codes = [row["code"] for row in saved["codes"]]

    def prepared(codes, settings_id):
        return SimpleNamespace(stats=SimpleNamespace(codes=tuple(codes)), path="/x/1.0.0",
                               settings_id=settings_id)

    with pytest.raises(ValueError, match=r"1 of them missing \(first: \['" + re.escape(codes[-1])
                       + r"'\]\), 1 others added \(first: \['LAB//new'\]\)"):
        check_eval_dataset(workdir, prepared(codes[:-1] + ["LAB//new"], saved["dataset"]))
    with mock.patch.object(run_setup.logging, "warning") as warning:
        check_eval_dataset(workdir, prepared(codes, saved["dataset"]))
        assert not warning.called
        check_eval_dataset(workdir, prepared(codes, "chunks32_other"))
        assert "MEDS files differ in size or content" in warning.call_args.args[0]
    with pytest.raises(ValueError, match=r"the same codes in another order \(2 positions differ"):
        check_eval_dataset(workdir, prepared([codes[1], codes[0], *codes[2:]], saved["dataset"]))


def test_a_refused_dataset_prepared_before_the_eval_stays(tiny_run, tmp_path):
    """A data dir shared with another run: eval.py with that run's MEDS root is refused, and
    the dataset prepared for that run stays."""
    workdir, config = tiny_run
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.data_dir = str(tmp_path / "shared")
    other = synthetic_meds_root(str(tmp_path), 60, seed=1)
    earlier = prepare_dataset(config.data, other, config.data.data_dir, log=lambda _: None)
    before = sorted(glob.glob(os.path.join(config.data.data_dir, "*", "*")))
    with pytest.raises(ValueError, match=r"data_stats.json: the run was trained on \d+ lab codes"):
        run_setup.prepare_eval_dataset(config, workdir, other)
    assert sorted(glob.glob(os.path.join(config.data.data_dir, "*", "*"))) == before
    assert os.path.isdir(earlier.path)


def test_load_trained_reproduces_the_exported_embeddings(evaluated):
    """The public loader gives the encoder eval.py used: its embeddings of the held_out label
    windows equal eval/embeddings, and hiding values changes the reconstruction."""
    workdir, result = evaluated
    run = load_trained(workdir)
    assert run.step == result["step"] and run.max_len == 32 and run.stats.vocab_size > 0
    assert list(run.labs["code"]) == list(run.stats.codes)  # row i: the model's code id i
    assert dict(zip(run.labs["code"], run.labs["name"]))["LAB//50912//mg/dL"] == (
        "Creatinine [mg/dL]")
    assert (run.labs["mask_prob"] > 0).all()
    events = pd.DataFrame({"subject_id": [5, 5], "code": list(run.stats.codes[:2]),
                           "time": pd.to_datetime(["2100-01-01 08:00", "2100-01-01 09:00"]),
                           "numeric_value": run.stats.mean[:2]})  # your own events, raw units
    assert np.isfinite(np.asarray(run.embed(run.batch(events)))).all()
    windows = task_windows(_meds_dir((workdir, run.config)), os.path.join(
        result["downstream"]["labels_dir"], TASKS[0]), run.stats, run.max_len)["held_out"][:8]
    batch = padded_rows(windows, run.max_len)
    exported = pq.read_table(os.path.join(workdir, "eval", "embeddings", f"{TASKS[0]}.parquet"))
    held_out = exported.filter(pc.equal(exported["split"], "held_out"))
    expected = np.stack(held_out["embedding"].to_pylist()[:len(windows)])
    np.testing.assert_allclose(np.asarray(run.embed(batch)), expected, atol=1e-5)
    d, v = run.config.model.d_model, run.stats.vocab_size
    per_code = dataclasses.replace(run, config=run.config.copy_and_resolve_references())
    per_code.config.eval.pooling = "per_code_last"  # a run whose eval.py reads per-code vectors
    vectors = np.asarray(per_code.embed(batch))
    assert vectors.shape == (len(windows), d + v * (d + 1))
    np.testing.assert_allclose(vectors[:, :d], expected, atol=1e-5)  # the mean comes first
    np.testing.assert_array_equal(vectors, np.asarray(run.embed(batch, "per_code_last")))
    states = run.encode(batch)
    assert states.shape == (len(windows), 32, run.config.model.d_model)
    hide = batch["valid"] & (np.arange(32) % 3 == 0)
    predicted = np.asarray(run.predict(batch, hide))
    assert predicted.shape == hide.shape and np.isfinite(predicted).all()
    assert not np.allclose(np.asarray(run.encode(batch, hide)), np.asarray(states))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7 \(the newest"):
        load_trained(workdir, step=7)


def test_load_trained_reads_the_config_and_statistics_saved_in_the_checkpoint(tiny_run,
                                                                             tmp_path):
    """The workdir's config.json and data_stats.json follow the latest start; the checkpoint
    keeps those it was trained with, and load_trained reads them."""
    workdir, _ = tiny_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
    trained = load_trained(copy)
    for name, change in (("config.json", lambda c: c["eval"].update(label_max_len=7)),
                         ("data_stats.json", lambda d: d["codes"][0].update(mean=1e6))):
        with open(os.path.join(copy, name)) as f:
            content = json.load(f)
        change(content)
        with open(os.path.join(copy, name), "w") as f:
            json.dump(content, f)
    again = load_trained(copy)
    assert again.config.eval.label_max_len == trained.config.eval.label_max_len != 7
    np.testing.assert_array_equal(again.stats.norm_mean, trained.stats.norm_mean)
    assert again.labs.loc[0, "mean"] == trained.labs.loc[0, "mean"] != 1e6


def test_trained_batch_of_raw_events_is_evals_label_window(evaluated):
    """``run.batch`` of a subject's raw MEDS events up to a prediction time gives the label
    window eval.py reads, under the run's eval.label_max_len and eval.label_window."""
    workdir, result = evaluated
    run = load_trained(workdir)
    config = run.config.copy_and_resolve_references()
    config.eval.label_max_len, config.eval.label_window = 24, "each_code_latest"
    run = dataclasses.replace(run, config=config)
    meds_dir = _meds_dir((workdir, run.config))
    windows = task_windows(meds_dir, os.path.join(result["downstream"]["labels_dir"], TASKS[0]),
                           run.stats, 24, each_code_latest=True)["held_out"]
    last_events = task_windows(meds_dir, os.path.join(result["downstream"]["labels_dir"],
                                                      TASKS[0]), run.stats, 24)["held_out"]
    differs = [i for i, (w, v) in enumerate(zip(windows, last_events))
               if not np.array_equal(w["codes"], v["codes"])]
    assert differs, "no label window where every code's latest event changes the window"
    window = windows[differs[0]]
    events = pa.concat_tables([pq.read_table(f) for f in meds.data_files(meds_dir)])
    events = events.filter(pc.and_(
        pc.equal(events["subject_id"], window["subject_id"]),
        pc.less_equal(pc.cast(events["time"], pa.int64()), window["prediction_time_us"])))
    batch = run.batch(events.to_pandas())
    n = len(window["codes"])
    assert batch["valid"].shape == (1, 24) and batch["valid"][0].sum() == n
    np.testing.assert_array_equal(batch["codes"][0, :n], window["codes"])
    np.testing.assert_allclose(batch["values"][0, :n], window["values"], rtol=1e-6)
    np.testing.assert_allclose(batch["times"][0, :n], window["times"], atol=1e-6)


def test_report_says_when_an_auroc_rests_on_few_positives(caplog):
    from cvmae_jax.evaluation.downstream import log_probe, report_lines

    rng = np.random.default_rng(6)
    train, tuning = _split(rng, 200, True), _split(rng, 100, True)
    x_test, y_test = _split(rng, 15, True)
    y_test[:] = False
    y_test[0] = True  # one positive, as in the MIMIC demo's held_out tasks
    few = probe_task(*train, *tuning, x_test, y_test, seed=0)
    many = probe_task(*train, *tuning, *_split(rng, 150, True), seed=0)
    text = "\n".join(report_lines(dict(probe="p", seed=0, tasks=dict(death=few, ok=many))))
    assert (f"- death: 1 positive and 14 negative held_out rows: the AUROC rests on the 1 row(s) "
            f"of the smaller class, and its CI on the {few['bootstrap_used']} of 1000") in text
    assert few["bootstrap_used"] < 1000 and "- ok:" not in text
    with caplog.at_level("INFO"):
        for task, result in dict(death=few, ok=many).items():
            log_probe(task, dict(result, empty_windows={}))
    death, ok = caplog.records
    assert death.levelname == "WARNING" and ok.levelname == "INFO"
    assert death.getMessage().endswith("(1 positive of 15: fewer than 10 of a class, anecdotal)")
    assert "anecdotal" not in ok.getMessage()


@pytest.mark.parametrize("positives, noted", [(9, True), (10, False), (90, False), (91, True)])
def test_the_few_labels_note_takes_fewer_than_10_of_either_class(positives, noted):
    from cvmae_jax.evaluation.compare_report import _auroc_rows
    from cvmae_jax.evaluation.downstream import _few_labels_note

    result = dict(auroc=0.7, n=100, positives=positives, bootstrap_used=1000)
    assert bool(_few_labels_note("death", result)) == noted
    assert ("anecdotal" in _auroc_rows("death", dict(n=100, subjects=100,
                                                      positives=positives))) == noted


def test_label_windows_longer_than_the_training_windows(tiny_run, tmp_path):
    """eval.label_max_len=64 and label_window=each_code_latest on a run trained on windows of
    32: the probe, the aggregates and the report read each label row's window of 64 events."""
    workdir, config = tiny_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
    config = run_config(copy)
    with config.unlocked():
        config.eval.label_max_len = 64
        config.eval.label_window = "each_code_latest"
        config.eval.single_code = False
        config.eval.finetune.enabled = False
    result = evaluate_run(copy, config=config)
    windows = read_label_tasks(_meds_dir(tiny_run), load_trained(copy).stats, 64,
                               each_code_latest=True)[1]
    windows = windows[TASKS[0]].windows
    assert max(len(w["codes"]) for ws in windows.values() for w in ws) > 32
    downstream = result["downstream"]
    assert downstream["label_max_len"] == 64
    features = downstream["tasks"][TASKS[0]]["aggregates"]["features"]
    assert features["window"].startswith("the probe's: every selected code's latest event")
    assert features["windows_at_max_len"] == {
        split: sum(len(w["codes"]) >= 64 for w in ws) for split, ws in windows.items()}
    with open(os.path.join(copy, "eval", "report.md")) as f:
        assert ("each label row's window: every selected code's latest event and then the "
                "last others, 64 events at most") in f.read()


def test_a_failed_evaluation_leaves_the_earlier_results_as_they_were(evaluated, tmp_path):
    workdir, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    (copy / "eval" / "notes.txt").write_text("a user's file")  # not eval.py's: it stays
    before = {p: p.read_bytes() for p in (copy / "eval").rglob("*") if p.is_file()}
    config = quick_eval_config(copy)
    with mock.patch("cvmae_jax.evaluation.report.plot_label_efficiency",
                    side_effect=OSError(28, "No space left on device")):
        with pytest.raises(OSError, match="No space left on device"):
            evaluate_run(str(copy), config=config)
    assert {p: p.read_bytes() for p in (copy / "eval").rglob("*") if p.is_file()} == before
    result = evaluate_run(str(copy), config=config)
    assert sorted(p.name for p in (copy / "eval").iterdir() if p.name.startswith(".")) == []
    saved = json.loads((copy / "eval" / "metrics.json").read_text())
    assert "finetune" not in saved["downstream"]  # this evaluation's, fine-tuning off
    assert not (copy / "eval" / "predictions_pretrained").exists()  # the earlier one's, gone
    assert (copy / "eval" / "notes.txt").read_text() == "a user's file"
    assert sorted(p.name for p in (copy / "eval" / "embeddings").iterdir()) == sorted(
        f"{task}.parquet" for task in result["exports"])


def test_eval_runs_beside_the_runs_training_and_a_finished_run_gets_no_warning(tiny_run,
                                                                                 tmp_path):
    """The training's lock is another file: eval.py evaluates a run while train.py holds it.
    The newest step is config.json's train.num_steps: no "has not ended" warning."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    training = WorkdirLock(str(workdir))  # a train.py of this run
    try:
        with mock.patch.object(run_eval.logging, "warning") as warning:
            evaluate_run(str(workdir), config=quick_eval_config(workdir))
    finally:
        training.release()
    assert (workdir / "eval" / "metrics.json").is_file()
    assert not [call for call in warning.call_args_list
                if "its training has not ended" in call.args[0]]


def test_a_run_still_training_is_warned_about_once_when_its_checkpoint_gives_way(
        tiny_run, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    config = quick_eval_config(workdir)
    with config.unlocked():
        config.train.num_steps = 100  # config.json's plan: the run is still training
    read = _training_goes_on(monkeypatch, workdir / "checkpoints", times=1)
    with mock.patch.object(run_eval.logging, "warning") as warning:
        evaluate_run(str(workdir), config=config)
    assert read == [30, 40]
    assert [call.args[1:] for call in warning.call_args_list
            if "its training has not ended" in call.args[0]] == [(30, 100)]


def test_a_checkpoint_deleted_before_its_settings_are_read_gives_way_to_the_newest(
        tiny_run, tmp_path, monkeypatch):
    """The training deletes the step between eval.py's choice of it and the reading of the
    settings it was saved with (evaluated_config), not only of its arrays."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    checkpoints, real, read = workdir / "checkpoints", run_eval.evaluated_config, []

    def evaluated_config(config, run_dir, step):
        read.append(step)
        if len(read) == 1:
            shutil.copytree(checkpoints / str(step), checkpoints / str(step + 10))
            shutil.rmtree(checkpoints / str(step))
        return real(config, run_dir, step)

    monkeypatch.setattr(run_eval, "evaluated_config", evaluated_config)
    with mock.patch.object(run_eval.logging, "warning") as warning:
        result = evaluate_run(str(workdir), config=quick_eval_config(workdir))
    assert read == [30, 40] and result["step"] == 40
    assert [call.args[1] for call in warning.call_args_list
            if "was deleted by the training" in call.args[0]] == [30]


def test_the_staged_metrics_are_written_after_every_other_result(tiny_run, tmp_path,
                                                                 monkeypatch):
    """A staging folder holding metrics.json is taken for finished results by the next
    evaluation (kept, not removed): an evaluation killed while it writes the report or the
    plots must not have written metrics.json yet."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns("eval"))
    real, present = run_eval.write_json_atomic, []

    def write_json_atomic(path, data):
        if os.path.basename(path) == "metrics.json":
            present.append(set(os.listdir(os.path.dirname(path))))
        return real(path, data)

    monkeypatch.setattr(run_eval, "write_json_atomic", write_json_atomic)
    evaluate_run(str(workdir), config=quick_eval_config(workdir))
    [staged] = present
    assert {"report.md", "reconstruction_by_lab.png", "label_efficiency.png"} <= staged
