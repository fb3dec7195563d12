"""End to end on tiny synthetic MEDS: outputs, TensorBoard, strategies, compile-once, exact
resume, the non-finite stop, eval."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import cvmae_jax.train as train_module
from cvmae_jax import cli, parallel, run_setup
from cvmae_jax.checkpoint import Checkpointer
from cvmae_jax.config import default_config
from cvmae_jax.data.synthetic import synthetic_meds_root
from cvmae_jax.evaluation.run_eval import evaluate_run
from cvmae_jax.mask_probabilities import STRATEGIES
from cvmae_jax.train import train_and_evaluate

from metrics_test import tensorboard_scalars


def tiny_config(data_dir, **train):
    config = default_config()
    config.data.data_dir = str(data_dir)
    config.data.synthetic_subjects = 60
    config.data.min_subjects = 1  # eval's per-code rows: a held_out split of a few subjects
    config.data.max_len = 32
    config.data.top_k = 40
    config.model.d_model, config.model.num_heads, config.model.num_layers = 32, 4, 1
    config.model.time_frequencies = 4
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 5
    config.eval.batch_size = 32
    config.train.update(dict(num_steps=30, log_every=5, eval_every=15, checkpoint_every=15))
    config.train.update(train)
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_tensorboard_shows_the_metrics(workdir):
    """Every number of metrics.jsonl, at its step, as ``train/<key>`` or ``<split>/<key>``."""
    expected = {}
    for record in read_metrics(workdir):
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                expected.setdefault(f"{record.get('split', 'train')}/{key}", []).append(
                    (record["step"], value))
    shown = tensorboard_scalars(workdir)
    assert sorted(shown) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in shown[tag]] == [step for step, _ in points], tag
        np.testing.assert_allclose([v for _, v in shown[tag]], [v for _, v in points],
                                   rtol=1e-6, err_msg=tag)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def cv_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cv_run"))
    config = tiny_config(data_dir, num_steps=600, log_every=50, eval_every=300)
    config.train.learning_rate = 2e-3
    summary = train_and_evaluate(config, workdir)
    return workdir, summary


def test_run_writes_the_documented_outputs(cv_run):
    workdir, summary = cv_run
    for name in ("config.json", "data_stats.json", "metrics.jsonl", "checkpoints"):
        assert os.path.exists(os.path.join(workdir, name)), name
    lines = read_metrics(workdir)
    train = [m for m in lines if "split" not in m]
    evals = [m for m in lines if m.get("split") == "tuning"]
    assert [m["step"] for m in train] == list(range(50, 601, 50))
    for key in ("step", "loss", "masked_mse", "unmasked_mse", "mask_rate", "tokens_per_sec"):
        assert all(np.isfinite(m[key]) for m in train), key
    assert all(0 <= m["data_wait_fraction"] < 1 and 0 < m["real_token_fraction"] <= 1
               for m in train)
    assert {m["window_steps"] for m in train} == {50}
    slots_per_step = 16 * 32  # tiny_config: batch 16 of max_len 32
    for m in train:  # the real tokens over all the window's slots: both rates over one time
        assert m["real_token_fraction"] == pytest.approx(
            m["tokens_per_sec"] / m["steps_per_sec"] / slots_per_step, rel=1e-4)
    assert [m["step"] for m in evals] == [300, 600]
    assert summary["step"] == 600
    # a checkpoint every 15 steps, the newest config.train.keep_checkpoints = 3 kept
    assert sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                  if name.isdigit()) == [570, 585, 600]
    assert summary["train_step_traces"] == 1  # no retrace after the first step
    assert_tensorboard_shows_the_metrics(workdir)
    assert "tuning/masked_mse" in tensorboard_scalars(workdir)


def test_loss_decreases_and_validation_beats_the_per_code_mean(cv_run):
    workdir, _ = cv_run
    lines = read_metrics(workdir)
    train = [m for m in lines if "split" not in m]
    # Batches differ in how hard their hidden values are, so compare against each batch's
    # per-code-mean baseline, early windows vs late windows.
    ratio = [m["masked_mse"] / m["baseline_masked_mse"] for m in train]
    assert np.mean(ratio[-3:]) < np.mean(ratio[:2]) - 0.1, ratio
    assert train[-1]["unmasked_mse"] < 0.5 * train[0]["unmasked_mse"]
    final_eval = [m for m in lines if m.get("split")][-1]
    assert final_eval["masked_mse"] < 0.95 * final_eval["baseline_masked_mse"], final_eval


def test_data_stats_mark_exactly_the_high_cv_codes(cv_run):
    workdir, _ = cv_run
    with open(os.path.join(workdir, "data_stats.json")) as f:
        stats = json.load(f)
    cv = np.array([c["cv"] for c in stats["codes"]])
    p = np.array([c["mask_prob"] for c in stats["codes"]])
    above = cv > np.percentile(cv, 75)
    assert above.any()
    np.testing.assert_array_equal(p[above], 0.8)
    np.testing.assert_array_equal(p[~above], 0.2)
    assert stats["masking"]["strategy"] == "cv"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_at_its_expected_mask_rate(strategy, data_dir, tmp_path):
    config = tiny_config(data_dir, num_steps=20, log_every=20, eval_every=20,
                         checkpoint_every=20)
    config.masking.strategy = strategy
    train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "data_stats.json") as f:
        saved = json.load(f)
    expected = saved["masking"]["expected_mask_rate"]
    statistic = saved["masking"]["tier_statistic"]  # the tiers' split, as mask_prob shows it
    assert (statistic is None) == (strategy in ("random", "cv_rank"))
    if statistic:
        above = np.array([c[statistic] > saved["masking"]["tier_threshold"]
                          for c in saved["codes"]])
        assert above.any() and not above.all()
        np.testing.assert_array_equal([c["mask_prob"] for c in saved["codes"]],
                                      np.where(above, 0.8, 0.2))
    train = [m for m in read_metrics(tmp_path) if "split" not in m][-1]
    # 20 steps x 16 examples x ~25 tokens: the rate is within a few binomial sigmas.
    tokens = 20 * 16 * 20
    assert abs(train["mask_rate"] - expected) < 4 * np.sqrt(expected * (1 - expected) / tokens)


def test_kill_and_resume_repeats_the_same_losses(data_dir, tmp_path):
    config = tiny_config(data_dir, num_steps=20, log_every=1, eval_every=100,
                         checkpoint_every=10)
    full = str(tmp_path / "full")
    train_and_evaluate(config, full)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))  # killed before its last save
    summary = train_and_evaluate(config, resumed)
    assert summary["step"] == 20
    expected = {m["step"]: m["loss"] for m in read_metrics(full) if "split" not in m}
    logged = [m for m in read_metrics(resumed) if "split" not in m]
    assert [m["step"] for m in logged] == list(range(1, 21))  # 11-20 once: dropped, relogged
    again = {m["step"]: m["loss"] for m in logged}
    assert all(again[s] == expected[s] for s in again), (again, expected)
    assert_tensorboard_shows_the_metrics(resumed)  # TensorBoard too hides the first 11-20


def test_a_resume_on_changed_meds_files_is_refused_before_preparing_them(data_dir, tmp_path):
    config = tiny_config(data_dir, num_steps=20, eval_every=10, checkpoint_every=10)
    meds = tmp_path / "meds"
    shutil.copytree(synthetic_meds_root(data_dir, config.data.synthetic_subjects, config.seed),
                    meds)
    config.data.meds_dir, config.data.data_dir = str(meds), str(tmp_path / "prepared")
    run = str(tmp_path / "run")
    train_and_evaluate(config, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "20"))  # killed before its last save
    prepared = sorted(p.name for p in (tmp_path / "prepared").glob("*/*"))
    shard = sorted((meds / "data").glob("*/*.parquet"))[0]
    table = pq.read_table(shard)
    values = pc.multiply(table["numeric_value"], pa.scalar(1.5, table["numeric_value"].type))
    pq.write_table(table.set_column(table.schema.get_field_index("numeric_value"),
                                    "numeric_value", values), shard)
    with pytest.raises(ValueError, match=r"the checkpoint at step 10 was written with other "
                                         r"settings \(prepared dataset: \S+ -> \S+\)"):
        train_and_evaluate(config, run)
    assert sorted(p.name for p in (tmp_path / "prepared").glob("*/*")) == prepared
    config.train.allow_config_change = True
    assert train_and_evaluate(config, run)["step"] == 20


def test_a_resume_on_other_lab_codes_is_refused_even_with_changes_allowed(tmp_path):
    config = tiny_config(tmp_path / "prepared", num_steps=10, eval_every=10, checkpoint_every=5)
    run = str(tmp_path / "run")
    train_and_evaluate(config, run)
    prepared = sorted((tmp_path / "prepared").glob("*/*"))
    config.data.top_k, config.train.num_steps = 20, 20  # 20 of the 39 codes
    config.train.allow_config_change = True
    with pytest.raises(ValueError, match=r"the checkpoint at step 10 was trained on 39 lab codes; "
                                         r"the data prepared now \(\S+\) has 20, 19 of them "
                                         r"missing .* resume only on data with the same codes"):
        train_and_evaluate(config, run)
    assert sorted((tmp_path / "prepared").glob("*/*")) == prepared  # the new one removed
    kept = run_setup.prepare_run_data(config, run)  # built before, as by another run
    with pytest.raises(ValueError, match="was trained on 39 lab codes"):
        train_and_evaluate(config, run)
    assert os.path.isdir(kept.path)  # a dataset the resume did not build stays
    # other subjects: the same 39 codes in another frequency order, parameters of equal shapes
    config.data.top_k, config.data.synthetic_subjects = 40, 45
    with pytest.raises(ValueError, match=r"has 39, the same codes in another order \(\d+ "
                                         r"positions differ: the frequency ranking changed\)"):
        train_and_evaluate(config, run)


def test_train_and_evaluate_refuses_folders_it_cannot_write_before_writing(tmp_path):
    """The Python API, the study and meds_dev's pretrain refuse as train.py does."""
    (tmp_path / "a_file").write_text("")
    config = tiny_config(tmp_path / "a_file" / "prepared", num_steps=5)
    with pytest.raises(ValueError, match=r"a_file is not a folder: it is a file\); the dataset "
                                         r"is prepared there \(config.data.data_dir\)"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    run = tmp_path / "run_with_a_checkpoints_file"
    run.mkdir()
    (run / "checkpoints").write_text("")
    with pytest.raises(ValueError, match=r"it is a file\); checkpoints are saved there"):
        train_and_evaluate(tiny_config(tmp_path / "prepared", num_steps=5), str(run))
    assert sorted(p.name for p in run.iterdir()) == [".train.lock", "checkpoints"]


def test_a_data_dir_that_holds_the_dataset_is_read_even_if_it_cannot_be_written(
        tmp_path, monkeypatch):
    from cvmae_jax.data import prepare as prepare_module

    data_dir = tmp_path / "prepared"
    train_and_evaluate(tiny_config(data_dir, num_steps=2), str(tmp_path / "first"))

    def read_only(folder, purpose):
        if str(folder).startswith(str(data_dir)):
            raise ValueError(f"{folder}: cannot write there (read-only); {purpose}")

    monkeypatch.setattr(train_module, "check_writable", read_only)
    monkeypatch.setattr(prepare_module, "check_writable", read_only)
    summary = train_and_evaluate(tiny_config(data_dir, num_steps=2), str(tmp_path / "second"))
    assert summary["step"] == 2


class PoisonedData:
    """``train_dataset``'s batches, with NaN values in batch number ``poisoned_step``;
    checkpointable like grain's iterator."""

    def __init__(self, dataset, poisoned_step: int):
        self.iterator, self.poisoned_step, self.count = iter(dataset), poisoned_step, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch, self.count = next(self.iterator), self.count + 1
        if self.count == self.poisoned_step:
            batch = dict(batch, values=np.full_like(batch["values"], np.nan))
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)

    def close(self):
        self.iterator.close()


def test_a_non_finite_step_ends_the_command_in_one_line_naming_its_window(
        data_dir, tmp_path, monkeypatch):
    real = train_module.train_dataset
    monkeypatch.setattr(train_module, "train_dataset",
                        lambda *args, **kwargs: PoisonedData(real(*args, **kwargs), 13))
    config = tiny_config(data_dir, num_steps=20, log_every=5, eval_every=100,
                         checkpoint_every=10)
    with pytest.raises(SystemExit) as stop, cli.user_errors():
        train_and_evaluate(config, str(tmp_path))
    message = str(stop.value.code)
    assert message.startswith("error: step 13: the loss (nan) or gradient norm (nan) is not "
                              "finite (the first such step of steps 11-15)"), message
    assert "the last checkpoint is step 10" in message and "\n" not in message
    assert Checkpointer.latest_complete_step(tmp_path / "checkpoints") == 10
    assert [m["step"] for m in read_metrics(tmp_path)] == [5, 10]


def test_the_host_reads_the_train_metrics_once_per_logging_window(data_dir, tmp_path,
                                                                   monkeypatch):
    reads = []
    fetch = parallel.JitLauncher.fetch

    def counted_fetch(launcher, tree):
        if not isinstance(tree, dict):  # validation fetches dicts of per-code sums
            reads.append(tree)
        return fetch(launcher, tree)

    monkeypatch.setattr(parallel.JitLauncher, "fetch", counted_fetch)
    config = tiny_config(data_dir, num_steps=20, log_every=10, eval_every=20,
                         checkpoint_every=20)
    assert train_and_evaluate(config, str(tmp_path))["step"] == 20
    # Two windows, and the non-finite flag before step 20's validation and save.
    assert len(reads) == 4, reads


def test_eval_writes_per_lab_reconstruction(cv_run):
    workdir, _ = cv_run
    result = evaluate_run(workdir, split="held_out")
    for name in ("metrics.json", "report.md", "reconstruction_by_lab.png"):
        assert os.path.exists(os.path.join(workdir, "eval", name)), name
    rows = [r for r in result["per_code"] if r["num_masked"]]
    assert rows and all(np.isfinite(r["mse"]) and np.isfinite(r["raw_rmse"]) for r in rows)
    assert result["overall"]["num_masked"] == sum(r["num_masked"] for r in rows)
    tiers = result["by_cv_tier"]
    assert (tiers["high_cv"]["num_masked"] + tiers["low_cv"]["num_masked"]
            == result["overall"]["num_masked"])
    assert tiers["high_cv"]["num_codes"] >= 1 and tiers["low_cv"]["num_codes"] >= 1
    again = evaluate_run(workdir, split="held_out")  # fixed evaluation mask: same numbers
    assert again["overall"] == result["overall"]


def test_meds_config_trains_on_the_shared_real_sample(shared_meds_dir, shipped_config,
                                                      tmp_path):
    config = shipped_config("meds")
    config.data.meds_dir = str(shared_meds_dir)
    config.data.data_dir = str(tmp_path / "data")
    config.data.max_len = 64
    config.model.d_model, config.model.num_layers = 32, 1
    config.train.update(dict(num_steps=8, batch_size=8, warmup_steps=2, log_every=4,
                             eval_every=8, checkpoint_every=8))
    config.eval.batch_size = 16
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["step"] == 8 and summary["train_step_traces"] == 1
    assert np.isfinite(summary["eval"]["masked_mse"]) and summary["eval"]["num_masked"] > 100
    with open(tmp_path / "run" / "data_stats.json") as f:
        codes = [c["code"] for c in json.load(f)["codes"]]
    assert len(codes) == 100 and all(c.startswith("LAB//") for c in codes)


def test_packing_trains_densely_and_resumes_exactly_with_other_worker_counts(data_dir, tmp_path):
    config = tiny_config(data_dir, num_steps=20, log_every=1, eval_every=20,
                         checkpoint_every=10)
    config.data.packing = True
    full = str(tmp_path / "full")
    summary = train_and_evaluate(config, full)
    assert summary["train_step_traces"] == 1
    packed = [m["real_token_fraction"] for m in read_metrics(full) if "split" not in m]
    config.data.packing = False
    train_and_evaluate(config, str(tmp_path / "padded"))
    padded = [m["real_token_fraction"] for m in read_metrics(tmp_path / "padded")
              if "split" not in m]
    assert np.mean(packed) > np.mean(padded)
    config.data.packing = True
    config.data.workers = 2  # packed in worker processes: the same batches, the same losses
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    train_and_evaluate(config, resumed)
    expected = {m["step"]: m["loss"] for m in read_metrics(full) if "split" not in m}
    again = {m["step"]: m["loss"] for m in read_metrics(resumed) if "split" not in m}
    assert sorted(again) == list(range(11, 21))
    assert all(again[s] == expected[s] for s in again)
