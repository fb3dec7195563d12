"""The command lines as a user types them: train.py and eval.py with config overrides."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.synthetic_subjects=40", "--config.data.max_len=32",
        "--config.model.d_model=32", "--config.model.num_layers=1",
        "--config.train.num_steps=6", "--config.train.batch_size=8",
        "--config.train.log_every=3", "--config.train.eval_every=6",
        "--config.train.checkpoint_every=6", "--config.eval.batch_size=8"]


def run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_train_then_eval_from_the_command_line(tmp_path):
    workdir = str(tmp_path / "run")
    result = run("train.py", "--config=configs/demo.py", f"--workdir={workdir}", *TINY,
                 "--config.masking.strategy=random", "--config.parallel.cpu_devices=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6" in result.stderr and "ETA" in result.stderr
    assert "Training on 2 cpu device(s)" in result.stderr
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["masking"]["strategy"] == "random"
    result = run("eval.py", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["split"] == "held_out"


@pytest.mark.parametrize("config, override, message", [
    ("meds", "--config.seed=0", "config.data.meds_dir is required"),
    ("demo", "--config.masking.strategy=spans", "config.masking.strategy='spans'"),
    ("demo", "--config.train.batch_size=12", "config.train.batch_size=12 must be divisible"),
    ("demo", "--config.parallel.cpu_devices=3", "must be divisible by the number of devices (3)"),
    ("demo", "--config.model.attention=cudnn", "needs config.model.dtype in ('bfloat16',)"),
])
def test_bad_settings_fail_before_writing_anything(tmp_path, config, override, message):
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--config=configs/{config}.py",
         f"--workdir={workdir}", *TINY, override],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
