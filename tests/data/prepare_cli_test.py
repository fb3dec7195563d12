"""`python -m cvmae_jax.prepare`: summary on success, one `error:` line and nothing written."""

import os
import re
import subprocess
import sys

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prepare(*args):
    return subprocess.run([sys.executable, "-m", "cvmae_jax.prepare",
                           "--config=configs/meds.py", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_prepare_prints_summary_and_refuses_bad_input(tiny_meds, tmp_path):
    out = tmp_path / "prepared"
    flags = [f"--config.data.meds_dir={tiny_meds.root}", f"--config.data.data_dir={out}",
             "--config.data.min_code_count=3", "--config.data.min_subjects=1",
             "--config.data.max_len=8"]
    ok = _prepare(*flags)
    assert ok.returncode == 0, ok.stderr
    assert "train: 5 subjects" in ok.stdout and "prepare_report.md" in ok.stdout
    assert "read it: tfds.data_source('meds_lab_sequences/" in ok.stdout
    counts = re.search(r"codes: pattern .\^LAB//., (\d+) codes \(LAB \d+\) \((\d+) codes "
                       r"match: 0 with values from fewer than 1 train subjects, (\d+) with "
                       r"fewer than 3 train values \(min_code_count\), (\d+) eligible\)\n",
                       ok.stdout)
    selected, matching, rare, eligible = map(int, counts.groups())
    assert selected == eligible == matching - rare and rare > 0
    assert "Using custom data configuration" not in ok.stderr and "Downloading" not in ok.stdout
    shard = tiny_meds.root / "data/held_out/0.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["time"]), shard)
    bad = _prepare(*flags[:1], f"--config.data.data_dir={tmp_path / 'bad'}")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "0.parquet: column 'time' is missing" in bad.stderr
    assert not (tmp_path / "bad").exists()
    verbose = _prepare(*flags[:1], f"--config.data.data_dir={tmp_path / 'bad'}", "-v=1")
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert not (tmp_path / "bad").exists()


def test_prepare_requires_meds_dir(tmp_path):
    result = _prepare(f"--config.data.data_dir={tmp_path}")
    assert result.returncode == 1
    assert "error: config.data.meds_dir is required" in result.stderr
    assert not os.listdir(tmp_path)


def test_sigterm_while_preparing_is_one_line_exit_143_and_nothing_written(tiny_meds, tmp_path):
    out = tmp_path / "prepared"
    terminated_while_planning = (  # SIGTERM arrives once the build has started
        "import os, signal, sys, time\n"
        "from cvmae_jax.data import prepare\n"
        "def plan(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "prepare.plan_dataset = plan\n"
        "sys.argv[0] = 'cvmae-prepare'\n"
        "from cvmae_jax.prepare import main\n"
        "main()\n")
    result = subprocess.run(
        [sys.executable, "-c", terminated_while_planning, "--config=configs/meds.py",
         f"--config.data.meds_dir={tiny_meds.root}", f"--config.data.data_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 143, result.stderr[-2000:]
    assert result.stderr.endswith("terminated (SIGTERM) while preparing: nothing half-built is "
                                  "left; rerun the same command\n"), result.stderr[-2000:]
    assert not out.exists()
