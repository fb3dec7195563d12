"""Two processes on localhost (4 fake CPU devices each) train like one process with 8, and
their checkpoint is not resumed by one process."""

import os
import socket
import subprocess

import numpy as np

from preemption_test import REPO, command, finish, last_losses
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
