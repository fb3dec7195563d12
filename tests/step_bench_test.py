"""The benchmarks: the JAX step's FLOP count, the input pipeline and kernel benchmarks run."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import common, kernel_bench, step_bench  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        cwd=REPO, capture_output=True,
        text=True, timeout=300, check=True).stdout
    rates = re.findall(r"^(padded|packed) workers=(\d)\s+pipeline\s+([\d.]+) batches/s", out,
                       re.MULTILINE)
    assert sorted((layout, workers) for layout, workers, _ in rates) == [
        ("packed", "0"), ("packed", "1"), ("padded", "0"), ("padded", "1")], out
    assert all(float(rate) > 0 for _, _, rate in rates)


def test_kernel_bench_ops_are_the_steps_matmul_shapes():
    """Each op is a valid einsum of its operand shapes, with FLOPs counted over every
    dimension: the default config's dense forward is [8192, 128] x [128, 512] and its scores
    32 x 4 heads of [256, 32] x [32, 256]."""
    ops = {op.name: op for op in kernel_bench.step_matmuls(common.BenchConfig())}
    for op in ops.values():
        np.einsum(op.spec, np.zeros(op.lhs), np.zeros(op.rhs))
    assert ops["dense forward X W"].flops() == 2 * 8192 * 128 * 512
    assert ops["attention scores Q K^T"].flops() == 2 * 32 * 4 * 256 * 256 * 32


def test_kernel_bench_times_every_op_in_both_frameworks():
    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_bench", "--batch=2", "--seq=16",
         "--d_model=16", "--heads=2", "--rounds=1", "--calls=1"],
        cwd=REPO, capture_output=True,
        text=True, timeout=300, check=True).stdout
    ratios = re.findall(r"^(?:dense|attention) .* ([\d.]+)$", out, re.MULTILINE)
    assert len(ratios) == 6 and all(float(r) > 0 for r in ratios), out


def test_time_pipelined_launches_back_to_back_and_waits_once_at_the_end():
    events = []
    seconds = common.time_pipelined(lambda i: events.append(("launch", i)) or i, 4, start=3,
                                    wait=lambda result: events.append(("wait", result)))
    assert events == [("launch", 3), ("launch", 4), ("launch", 5), ("launch", 6), ("wait", 6)]
    assert seconds > 0


def test_step_bench_reports_waited_and_pipelined_steps(tmp_path):
    """One run with packing on a tiny shape: both runners report every timed step, the
    pipelined and device step times, the host's launch time and the mask draw, in the printout
    and the JSON."""
    json_path = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_bench", "--d_model=16", "--layers=1",
         "--heads=2", "--seq=32", "--batch=8", "--steps=20", "--warmup=1", "--packing",
         f"--json={json_path}"],
        cwd=REPO, capture_output=True,
        text=True, timeout=300, check=True).stdout
    result = json.loads(json_path.read_text())
    assert [r["name"] for r in result["results"]] == ["jax jit", "jax jit packed"]
    for r in result["results"]:
        assert r["n"] == 20 and len(result["times_s"][r["name"]]) == 20
        assert r["pipelined_steps"] == 5  # on the CPU
        assert min(r["pipelined_step_s"], r["device_step_s"], r["launch_host_s"],
                   r["mask_sampling_s"]) > 0
    for line in ("pipelined step", "device step", "host launch"):
        assert len(re.findall(rf"^{line} +[\d.]+ ms", out, re.MULTILINE)) == 2, out
    assert re.search(r"^packed/padded real tokens/s = [\d.]+$", out, re.MULTILINE), out


def test_attention_bench_times_padded_and_packed_rows(tmp_path):
    """attention_bench on a tiny shape: a time per call for both layouts and the ratio line
    the JSON's medians give."""
    json_path = tmp_path / "attention.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.attention_bench", "--d_model=16", "--heads=2",
         "--seq=64", "--batch=8", "--rounds=2", "--calls=2", f"--json={json_path}"],
        cwd=REPO, capture_output=True,
        text=True, timeout=300, check=True).stdout
    record = json.loads(json_path.read_text())
    assert {name: len(t) for name, t in record["times_s"].items()} == {"padded": 2, "packed": 2}
    medians = {name: float(np.median(t)) for name, t in record["times_s"].items()}
    assert min(medians.values()) > 0
    assert re.search(r"^padded +[\d.]+ ms per call", out, re.MULTILINE), out
    assert out.strip().splitlines()[-1] == (
        f"ratio packed/padded = {medians['packed'] / medians['padded']:.3f}")


@pytest.mark.parametrize("module, args, message", [
    ("step_bench", ["--heads=3"], "d_model=128 is not divisible by heads=3"),
    ("step_bench", ["--steps=0"], "argument --steps: 0 is below 1"),
    ("step_bench", ["--attention=cudnn", "--dtype=bfloat16"], "runs on NVIDIA GPUs only"),
    ("step_bench", ["--batch=12"], "batch=12 is not divisible by the 8 JAX devices"),
    ("jax_variants", ["--only=foo"], "--only: unknown variants ['foo']; have baseline"),
    ("pipeline_bench", ["--workers=0,x"], "--workers=0,x: 'x' is not an integer"),
])
def test_benchmark_usage_errors_stop_before_any_work(module, args, message):
    """Checked before the matmul ceiling or a compile: one line, exit status 2."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "matmul ceiling" not in result.stderr
