"""Real processes: kill -9 then resume, SIGTERM (preemption), a half-written checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from train_test import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 300


def command(workdir, data_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/demo.py",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.data.synthetic_subjects=40", "--config.data.max_len=32",
            "--config.model.d_model=32", "--config.model.num_layers=1",
            f"--config.train.num_steps={STEPS}", "--config.train.batch_size=8",
            "--config.train.log_every=1", f"--config.train.eval_every={STEPS}",
            "--config.train.checkpoint_every=25", "--config.eval.batch_size=8", *extra]


def start(workdir, data_dir, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen(command(workdir, data_dir, *extra), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def complete_records(path):
    """The records of a metrics.jsonl a running job writes: its complete lines only (the job
    may be part-way through writing the last one)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for_step(workdir, step, process):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(path) and any(
                m["step"] >= step for m in complete_records(path) if "split" not in m):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit code {process.poll()})")


def signal_at_step(workdir, data_dir, step, signum):
    """Starts a run and sends it ``signum`` once it has logged ``step``."""
    process = start(workdir, data_dir)
    wait_for_step(workdir, step, process)
    process.send_signal(signum)
    return process


def last_losses(workdir):
    """Per-step loss, the last line written for each step (a resumed run repeats steps)."""
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "split" not in m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    workdir = tmp_path_factory.mktemp("reference")
    finish(start(workdir, data_dir))
    return data_dir, last_losses(workdir)


def test_kill_9_then_resume_matches_the_uninterrupted_run(reference, tmp_path):
    data_dir, expected = reference
    process = signal_at_step(tmp_path, data_dir, 60, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(last_losses(tmp_path))
    assert killed_at < STEPS
    output = finish(start(tmp_path, data_dir))
    assert "Resumed from the checkpoint at step" in output
    assert last_losses(tmp_path) == expected  # bitwise, step by step


def test_sigterm_saves_and_exits_zero_then_resumes(reference, tmp_path):
    data_dir, expected = reference
    output = finish(signal_at_step(tmp_path, data_dir, 40, signal.SIGTERM))
    assert "Preempted (SIGTERM) at step" in output
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    stopped_at = max(last_losses(tmp_path))
    assert saved[-1] == stopped_at < STEPS
    output = finish(start(tmp_path, data_dir))
    assert f"Resumed from the checkpoint at step {stopped_at}" in output
    assert last_losses(tmp_path) == expected


def test_worker_processes_leave_no_shared_memory_behind(reference, tmp_path):
    """With data.workers the chunks come through grain's shared memory; a preempted and a
    finished run free all of it (Python's resource tracker warns of what is left)."""
    data_dir, expected = reference
    process = start(tmp_path, data_dir, "--config.data.workers=2")
    wait_for_step(tmp_path, 40, process)
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert "Preempted (SIGTERM) at step" in output and "leaked" not in output
    output = finish(start(tmp_path, data_dir, "--config.data.workers=2"))
    assert "leaked" not in output
    assert last_losses(tmp_path) == expected  # the workers make the same batches


def test_sigterm_while_preparing_stops_at_once_and_removes_the_new_workdir(tmp_path,
                                                                          monkeypatch):
    """In-process: SIGTERM arrives while the dataset is prepared; set-up stops with Preempted
    (train.py prints it and exits 0) and removes what it made, as after Ctrl-C."""
    from cvmae_jax import run_setup
    from cvmae_jax.preemption import Preempted
    from cvmae_jax.train import train_and_evaluate
    from train_test import tiny_config

    def terminated(config, workdir):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
        raise AssertionError("SIGTERM did not stop the preparation")

    monkeypatch.setattr(run_setup, "prepare_run_data", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    workdir = tmp_path / "run"
    with pytest.raises(Preempted, match="before the first training step: nothing new to save"):
        train_and_evaluate(tiny_config(tmp_path / "data"), str(workdir))
    assert not workdir.exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_the_preemption_line_comes_once_the_checkpoint_is_complete(tmp_path, monkeypatch):
    from cvmae_jax import preemption
    from cvmae_jax import train as train_module
    from cvmae_jax.checkpoint import Checkpointer
    from train_test import tiny_config

    config = tiny_config(tmp_path / "data", num_steps=10, log_every=5, eval_every=10,
                         checkpoint_every=10)
    monkeypatch.setattr(preemption.SaveOnSigterm, "reached", lambda self, step: step == 7)
    complete_at_the_line = []

    def warning(message, *args):
        if message.startswith("Preempted"):
            complete_at_the_line.append(
                Checkpointer.latest_complete_step(str(tmp_path / "run" / "checkpoints")))

    monkeypatch.setattr(train_module.logging, "warning", warning)
    assert train_module.train_and_evaluate(config, str(tmp_path / "run"))["preempted"]
    assert complete_at_the_line == [7]


def test_a_preempted_window_is_logged_so_every_step_has_a_line(tmp_path, monkeypatch):
    """Preempted at step 7 with log_every=5: steps 6-7 get their line before the save, and the
    resumed run's line at step 10 covers 8-10."""
    from cvmae_jax import preemption
    from cvmae_jax.train import train_and_evaluate
    from train_test import tiny_config

    config = tiny_config(tmp_path / "data", num_steps=10, log_every=5, eval_every=10,
                         checkpoint_every=10)
    monkeypatch.setattr(preemption.SaveOnSigterm, "reached", lambda self, step: step == 7)
    assert train_and_evaluate(config, str(tmp_path / "run"))["preempted"]
    monkeypatch.undo()
    assert train_and_evaluate(config, str(tmp_path / "run"))["step"] == 10
    lines = [m for m in read_metrics(tmp_path / "run") if "split" not in m]
    assert [(m["step"], m["window_steps"]) for m in lines] == [(5, 5), (7, 2), (10, 3)]
    # Preempted at the last step, whose window is logged already: saved, nothing logged twice.
    config = tiny_config(tmp_path / "data", num_steps=10, log_every=3, eval_every=10,
                         checkpoint_every=10)
    monkeypatch.setattr(preemption.SaveOnSigterm, "reached", lambda self, step: step == 10)
    assert train_and_evaluate(config, str(tmp_path / "last"))["preempted"]
    lines = [m for m in read_metrics(tmp_path / "last") if "split" not in m]
    assert [(m["step"], m["window_steps"]) for m in lines] == [(3, 3), (6, 3), (9, 3), (10, 1)]
    assert (tmp_path / "last" / "checkpoints" / "10").is_dir()


def test_a_half_written_checkpoint_is_ignored(reference, tmp_path):
    data_dir, expected = reference
    signal_at_step(tmp_path, data_dir, 60, signal.SIGKILL).wait()
    checkpoints = tmp_path / "checkpoints"
    newest = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    # What a save killed half-way leaves: Orbax's temporary folder, never renamed.
    partial = checkpoints / f"{newest + 25}.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(checkpoints / str(newest), partial)
    shutil.rmtree(partial / "state")
    output = finish(start(tmp_path, data_dir))
    assert f"Resumed from the checkpoint at step {newest}" in output
    assert last_losses(tmp_path) == expected


def test_a_notice_that_arrived_while_resuming_stops_the_run_at_its_first_step():
    """Under jax.distributed JAX's preemption sync is asked from the resumed step on; a notice
    it saw while resuming (``preempted_early``) must stop the run at the first check."""
    from types import SimpleNamespace

    from cvmae_jax.preemption import SaveOnSigterm

    no_sync = SimpleNamespace(manager=SimpleNamespace(reached_preemption=lambda step: False))
    early = SaveOnSigterm(no_sync, python_handler=False, preempted_early=True)
    late = SaveOnSigterm(no_sync, python_handler=False)
    assert early.reached(1) and not late.reached(1)
    early.restore_handler(), late.restore_handler()


def test_jax_keeps_catching_sigterm_after_an_evaluation_under_jax_distributed():
    """Under jax.distributed (one process too) JAX's preemption sync catches SIGTERM at the C
    level; a Python handler set and reset around an evaluation would leave none, and the next
    training run of the process (a study's) would die on SIGTERM without saving."""
    script = (
        "import os, signal, socket, time\n"
        "import jax\n"
        "from cvmae_jax import parallel\n"
        "from cvmae_jax.preemption import sigterm_terminates\n"
        "with socket.socket() as s:\n"
        "    s.bind(('localhost', 0))\n"
        "    port = s.getsockname()[1]\n"
        "jax.distributed.initialize(f'localhost:{port}', num_processes=1, process_id=0)\n"
        "with sigterm_terminates('during the evaluation', parallel.python_handles_sigterm()):\n"
        "    pass\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(1)\n"
        "print('survived')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0 and "survived" in result.stdout, result.stderr[-2000:]
