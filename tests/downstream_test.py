"""Downstream linear probes: probe metrics on constructed data and end to end on a tiny run.
(That label windows never reach past their prediction time is tested in data/labels_test.py.)"""

import os

import numpy as np
import pytest

from cvmae_jax.evaluation.downstream import embed_label_windows, probe_task
from cvmae_jax.evaluation.run_eval import evaluate_run
from cvmae_jax.train import train_and_evaluate

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


def test_probe_on_noise_is_near_chance():
    rng = np.random.default_rng(1)
    r = probe_task(*_split(rng, 300, False), *_split(rng, 200, False),
                   *_split(rng, 400, False), seed=0)
    assert abs(r["auroc"] - 0.5) < 0.1
    lo, hi = r["auroc_ci"]
    assert lo <= 0.5 <= hi and lo <= r["auroc"] <= hi
    assert r["bootstrap_used"] == 1000


def test_probe_single_class_held_out_and_tuning():
    rng = np.random.default_rng(2)
    x_test, _ = _split(rng, 50, True)
    x_tune, _ = _split(rng, 40, True)
    r = probe_task(*_split(rng, 200, True), x_tune, np.zeros(40, bool), x_test,
                   np.zeros(50, bool), seed=0)
    assert r["auroc"] is None and r["auroc_ci"] is None and r["auprc"] is None
    assert "single class" in r["reason"] and r["n"] == 50 and r["prevalence"] == 0.0
    assert r["C"] == 1.0 and r["c_selection"].startswith("default")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(data, num_steps=30, log_every=15, eval_every=30, checkpoint_every=30)
    train_and_evaluate(config, workdir)
    return workdir, config


def test_eval_reports_downstream_probes(tiny_run):
    workdir, _ = tiny_run
    result = evaluate_run(workdir, split="held_out")
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
