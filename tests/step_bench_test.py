"""The benchmarks: the JAX step's FLOP count, and the input pipeline benchmark runs."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import common, step_bench  # noqa: E402


@pytest.mark.parametrize("layers,d_model,seq", [(2, 64, 128), (2, 128, 256)])
def test_model_flop_count_matches_xla_cost_analysis_on_cpu(layers, d_model, seq):
    """The architecture's count (used for FLOP/s because XLA's misses library calls on GPUs)
    agrees with XLA's CPU count, which also includes the elementwise work, to within 10% at
    these sizes (12% at d_model 32, where elementwise work weighs more); the
    step runs sharded over the test's 8 devices, whose per-device counts are summed."""
    cfg = common.BenchConfig(d_model=d_model, heads=2, layers=layers, seq=seq, batch=8,
                             vocab=20)
    runner = step_bench.JaxStep(cfg)
    runner.compile()
    assert runner.launcher.num_devices == 8
    assert 0.9 < runner.flops / runner.xla_flops < 1.0


def test_pipeline_bench_reads_both_layouts_with_and_without_workers(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline_bench", "--subjects=60", "--batches=5",
         "--workers=0,1", "--packing", "--no_step", f"--data_dir={tmp_path}"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
        text=True, timeout=300, check=True).stdout
    rates = re.findall(r"^(padded|packed) workers=(\d)\s+pipeline\s+([\d.]+) batches/s", out,
                       re.MULTILINE)
    assert sorted((layout, workers) for layout, workers, _ in rates) == [
        ("packed", "0"), ("packed", "1"), ("padded", "0"), ("padded", "1")], out
    assert all(float(rate) > 0 for _, _, rate in rates)
