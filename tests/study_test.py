"""The study command: a tiny study (2 strategies x 1 seed) that completes, then resumes."""

import json
import os
import subprocess
import sys

import pytest

from cvmae_jax.config import eval_settings
from cvmae_jax.study import is_finished, run_configs, run_study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.synthetic_subjects=40", "--config.data.max_len=32",
        "--config.model.d_model=32", "--config.model.num_layers=1",
        "--config.model.time_frequencies=4", "--config.train.num_steps=6",
        "--config.train.batch_size=8", "--config.train.log_every=3",
        "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
        "--config.eval.batch_size=8", "--config.study.strategies=('random', 'cv')",
        "--config.study.seeds=(0,)",
        "--config.data.min_subjects=1"]  # per-lab rows of a held_out split of a few subjects


def run_study_cli(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "cvmae_jax.study", "--config=configs/study.py",
                           f"--workdir={workdir}", *TINY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_run_configs_share_one_dataset_seed_major_without_the_study_field(tmp_path,
                                                                          shipped_config):
    config = shipped_config("study")
    config.study.seeds = (0, 1)
    runs = run_configs(config, str(tmp_path))
    assert [os.path.basename(d) for d, _ in runs] == [
        f"{s}_s{seed}" for seed in (0, 1) for s in ("random", "variance", "cv", "cv_rank")]
    for run_dir, run in runs:
        assert "study" not in run and run.data.data_dir == str(tmp_path / "data")
        assert run_dir.endswith(f"{run.masking.strategy}_s{run.seed}")
        # the scratch classifier depends on the seed only: the random runs train it
        assert run.eval.finetune.scratch == (run.masking.strategy == "random")
    config.eval.finetune.scratch = False
    assert not any(run.eval.finetune.scratch for _, run in run_configs(config, str(tmp_path)))


@pytest.mark.parametrize("field, value, message", [
    ("strategies", ("cv", "variance"), "including 'random'"),
    ("strategies", ("random", "spans"), "expected distinct strategies"),
    ("seeds", (), "expected distinct seeds"),
    ("seeds", (0, 0.5), r"config.study.seeds=\(0, 0.5\): expected integers in \[0, 2\*\*32\)"),
    ("seeds", (-1,), r"expected integers in \[0, 2\*\*32\)"),
    ("seed", 3, "config.study.seed: no such config field"),  # a misspelt study field
])
def test_bad_study_settings_are_refused(tmp_path, shipped_config, field, value, message):
    config = shipped_config("study")
    config.study[field] = value
    with pytest.raises(ValueError, match=message):
        run_configs(config, str(tmp_path))


@pytest.mark.slow  # two study commands: 47 s on 2 cores at load 1.2, 81 s at load 2-3
def test_tiny_study_completes_then_resumes_without_training(tmp_path):
    study = tmp_path / "study"
    result = run_study_cli(study)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run 2/2 cv_s0: training ..." in result.stderr and "ETA" in result.stderr
    for name in ("report.md", "summary.json", "validation_curves.png"):
        assert (study / name).exists(), name
    summary = json.loads((study / "summary.json").read_text())
    assert list(summary["strategies"]) == ["random", "cv"]
    assert summary["strategies"]["cv"]["vs_random"]["reconstruction"]["uniform"]["pooled"][
        "n_labs"] > 0
    assert len(os.listdir(study / "data" / "meds_lab_sequences")) == 1  # one shared dataset
    assert not (study / "runs" / "cv_s0" / "data").exists()

    lines = {run: (study / "runs" / run / "metrics.jsonl").read_text()
             for run in ("random_s0", "cv_s0")}
    evals = {run: (study / "runs" / run / "eval" / "metrics.json").stat().st_mtime_ns
             for run in lines}
    result = run_study_cli(study)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run 2/2 cv_s0: finished earlier (eval/metrics.json at step 6), skipped" in \
        result.stderr
    assert "training ..." not in result.stderr
    for run in lines:  # nothing trained or evaluated again
        assert (study / "runs" / run / "metrics.jsonl").read_text() == lines[run]
        assert (study / "runs" / run / "eval" / "metrics.json").stat().st_mtime_ns == evals[run]
    assert "report:" in result.stdout


def evaluated_run(tmp_path, study_config, **saved_changes):
    """The first run of ``study_config`` as if trained and evaluated at its final step (with
    its eval settings), with config.json saved with ``saved_changes`` ({"train":
    {"learning_rate": 0.5}}); (run dir, run config)."""
    run_dir, run = run_configs(study_config, str(tmp_path))[0]
    os.makedirs(os.path.join(run_dir, "eval"))
    write_eval_metrics(run_dir, {"step": run.train.num_steps, "eval_settings": eval_settings(run)})
    saved = run.to_dict()
    for section, fields in saved_changes.items():
        saved[section].update(fields)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(saved, f)
    return run_dir, run


def test_a_finished_run_with_other_settings_is_refused_not_skipped(tmp_path, shipped_config):
    run_dir, run = evaluated_run(tmp_path, shipped_config("study"), train={"learning_rate": 0.5})
    with pytest.raises(ValueError,
                       match=r"other settings \(train.learning_rate: 0.5 -> 0.001\); use a new"):
        is_finished(run_dir, run)
    run.train.num_steps += 1  # not finished: training resumes (and check_resume_settings)
    assert not is_finished(run_dir, run)


def write_eval_metrics(run_dir, metrics):
    with open(os.path.join(run_dir, "eval", "metrics.json"), "w") as f:
        json.dump(metrics, f)


def test_a_run_evaluated_with_other_eval_settings_is_evaluated_again(tmp_path, shipped_config):
    run_dir, run = evaluated_run(tmp_path, shipped_config("study"))
    assert is_finished(run_dir, run)
    run.eval.mask_rate = 0.5  # e.g. --config.eval.mask_rate=0.5 on a finished study
    assert not is_finished(run_dir, run)


def test_an_interrupted_evaluation_is_done_again(tmp_path, shipped_config):
    """The study saves config.json with the new eval settings before evaluating; when that
    evaluation is killed, metrics.json still holds the old settings' results."""
    old = shipped_config("study")
    run_dir, _ = evaluated_run(tmp_path, old)
    new = shipped_config("study")
    new.eval.finetune.steps = old.eval.finetune.steps * 2
    run = run_configs(new, str(tmp_path))[0][1]
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(run.to_dict(), f)  # as the study writes it before evaluating
    assert not is_finished(run_dir, run)
    write_eval_metrics(run_dir, {"step": run.train.num_steps})  # settings not recorded
    assert not is_finished(run_dir, run)


def test_a_preempted_run_stops_the_study_without_evaluating_it(tmp_path, shipped_config,
                                                               monkeypatch):
    import cvmae_jax.evaluation.compare as compare
    import cvmae_jax.evaluation.run_eval as run_eval
    import cvmae_jax.train as train

    trained, evaluated = [], []
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, run_dir: (
        trained.append(run_dir) or dict(step=3, preempted=True)))
    monkeypatch.setattr(run_eval, "evaluate_run", lambda run_dir, config: evaluated.append(
        run_dir))
    monkeypatch.setattr(compare, "compare_runs", lambda *args: pytest.fail("compared"))
    assert run_study(shipped_config("study"), str(tmp_path)) is None
    assert [os.path.basename(d) for d in trained] == ["random_s0"] and evaluated == []
