"""Two processes on localhost (4 fake CPU devices each) train like one process with 8, their
checkpoint is not resumed by one process, and a failure that one process meets ends both at
once with an error (instead of a hang until JAX's shutdown timeout)."""

import os
import re
import signal
import socket
import subprocess
import time

import numpy as np

from preemption_test import REPO, command, finish, last_losses, wait_for_step
from train_test import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data_dir, single, multi = tmp_path / "data", tmp_path / "single", tmp_path / "multi"
    steps = ["--config.train.num_steps=30", "--config.train.eval_every=30"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    finish(subprocess.Popen(
        command(single, data_dir) + steps, cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")))
    address = f"localhost:{free_port()}"
    processes = [subprocess.Popen(
        command(multi, data_dir) + steps + [  # the manual fields alone start distributed
            "--config.train.transfer_guard=disallow",  # the batch copy is explicit here too
            f"--config.parallel.coordinator_address={address}",
            "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
        for i in range(2)]
    outputs = [finish(p) for p in processes]
    assert "step 30/30" in outputs[0] and "step 30/30" not in outputs[1]  # process 0 logs
    expected, got = last_losses(single), last_losses(multi)
    assert sorted(got) == list(range(1, 31))
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)
    evals = [[m for m in read_metrics(d) if "split" in m][-1] for d in (single, multi)]
    np.testing.assert_allclose(evals[1]["masked_mse"], evals[0]["masked_mse"], rtol=1e-5)
    saved = set(os.listdir(multi / "checkpoints" / "30" / "data"))  # each process's position
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= saved
    config_before = (multi / "config.json").read_text()
    one = subprocess.run(command(multi, data_dir) + ["--config.train.num_steps=40"], cwd=REPO,
                         text=True, capture_output=True, timeout=600,
                         env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert one.returncode == 1 and ("error: the checkpoint at step 30 was written by 2 "
                                    "process(es) and this run has 1") in one.stderr
    assert (multi / "config.json").read_text() == config_before  # a refused run writes nothing


def start_two(commands, logs=None):
    """Two processes of one distributed run on localhost; ``commands[i]`` is process i's;
    output to pipes, or to the files ``logs`` (to be read while the processes run)."""
    address = f"localhost:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return [subprocess.Popen(
        cmd + [f"--config.parallel.coordinator_address={address}",
               "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"],
        cwd=REPO, text=True, stderr=subprocess.STDOUT, env=env,
        stdout=subprocess.PIPE if logs is None else open(logs[i], "w"))
        for i, cmd in enumerate(commands)]


def outcomes(processes):
    """(exit code, output) of each process, and the seconds until the last one ended."""
    start = time.monotonic()
    results = [(p.wait(timeout=240), p.communicate()[0]) for p in processes]
    return results, time.monotonic() - start


def test_a_data_error_on_process_0_ends_every_process_with_an_error(tmp_path):
    workdir = tmp_path / "run"
    cmd = command(workdir, tmp_path / "data") + [f"--config.data.meds_dir={tmp_path}/no_meds"]
    (code0, out0), (code1, out1) = outcomes(start_two([cmd, cmd]))[0]
    assert code0 == 1 and f"{tmp_path}/no_meds" in out0 and "error:" in out0, out0[-2000:]
    assert code1 == 1 and ("error: process 0 could not prepare the dataset; its error is in "
                           "its log") in out1, out1[-2000:]
    assert not workdir.exists()  # the run's folders are removed, as with one process


def test_processes_launched_with_other_settings_are_refused_in_one_line(tmp_path):
    """A seed or strategy that differs between processes used to fail in a collective with a
    traceback and leave a half-written workdir."""
    workdir = tmp_path / "run"
    cmd = command(workdir, tmp_path / "data")
    results, _ = outcomes(start_two([cmd, cmd + ["--config.seed=1",
                                                 "--config.masking.strategy=random"]]))
    for code, output in results:
        assert code == 1 and ("error: process(es) [1] run other settings than process 0 in "
                              "config.masking, config.seed; launch every process with the same "
                              "config file and --config flags") in output, output[-2000:]
        assert "Traceback" not in output
    assert not workdir.exists()


def test_sigterm_while_a_resumed_run_compiles_stops_both_processes_at_the_next_step(tmp_path):
    """JAX's preemption sync point is the largest step the processes reported + 1. A resumed
    run used to report its first step only after compiling, so a notice during the restore or
    compile set the sync point to step 1, never reached: the run trained on until killed."""
    workdir, data_dir = tmp_path / "run", tmp_path / "data"
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    first = start_two([command(workdir, data_dir)] * 2, logs)
    wait_for_step(workdir, 5, first[0])
    for p in first:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=240) for p in first] == [0, 0]
    stopped = int(re.search(r"Preempted \(SIGTERM\) at step (\d+)", logs[0].read_text())[1])
    resumed = start_two([command(workdir, data_dir)] * 2, logs)
    deadline = time.monotonic() + 240
    while "Resumed from the checkpoint" not in logs[0].read_text():
        assert time.monotonic() < deadline and resumed[0].poll() is None, logs[0].read_text()
        time.sleep(0.05)
    for p in resumed:  # before the first step (the compile takes seconds)
        p.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=240) for p in resumed] == [0, 0], logs[0].read_text()[-3000:]
    assert f"Preempted (SIGTERM) at step {stopped + 1}" in logs[0].read_text()
    assert str(stopped + 1) in os.listdir(workdir / "checkpoints")


def test_a_workdir_that_the_processes_do_not_share_is_refused_not_hung(tmp_path):
    """Each process on its own local disk (it hung at the first checkpoint), here on a resume:
    process 0's workdir holds a checkpoint, process 1's none, so the check must also come
    before Orbax's restore, whose barrier process 1 would never join. Takes
    run_setup.SHARED_WORKDIR_WAIT_S (30 s) for process 1 to give up."""
    data_dir = tmp_path / "data"
    finish(subprocess.Popen(
        command(tmp_path / "host0", data_dir) + ["--config.train.num_steps=25"], cwd=REPO,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_PLATFORMS="cpu")))
    results, seconds = outcomes(start_two([command(tmp_path / f"host{i}", data_dir)
                                           for i in range(2)]))
    for code, output in results:
        assert code == 1 and ("process(es) [1] do not see the files process 0 writes there; "
                              "every process needs the same workdir on a shared file "
                              "system") in output, output[-2000:]
    assert seconds < 120 and not (tmp_path / "host1").exists()  # nothing left behind
