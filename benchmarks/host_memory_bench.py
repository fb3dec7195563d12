"""The train step with glibc malloc's defaults vs reusing freed memory (cvmae_jax/host_memory.py).

    python -m benchmarks.host_memory_bench --config=default [--rounds=3 --steps=10]

The allocator is set up when a process starts, so each measurement is a fresh ``step_bench``
process; the two settings alternate (A B A B ...) so both see the same machine load. Prints the
median step time of each and, last, ``ratio reuse/system = <x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks import common

SETTINGS = {"system": ["--system_malloc"], "reuse": []}


def run_step_bench(config: str, steps: int, extra: list[str]) -> list[float]:
    """Step times (s) of one step_bench process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        child = subprocess.run([sys.executable, "-m", "benchmarks.step_bench",
                                f"--config={config}", f"--steps={steps}", f"--json={out}",
                                *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        if child.returncode:
            sys.exit(f"step_bench {' '.join(extra)} failed (status {child.returncode}):\n"
                     + child.stderr[-2000:])
        with open(out) as f:
            return json.load(f)["times_s"]["jax jit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default", choices=sorted(common.CONFIGS))
    parser.add_argument("--rounds", type=common.count_arg(1), default=3,
                        help="alternating rounds, a fresh step_bench process per setting each")
    parser.add_argument("--steps", type=common.count_arg(1), default=10,
                        help="timed steps per process")
    args = parser.parse_args()
    times = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name, extra in SETTINGS.items():
            common.progress(f"round {r + 1}/{args.rounds}: {name}")
            times[name] += run_step_bench(args.config, args.steps, extra)
    print(f"machine: {common.cpu_model()}, {os.cpu_count()} cores, load avg "
          f"{os.getloadavg()[0]:.1f}; config {args.config}; {args.rounds} rounds x "
          f"{args.steps} steps per setting")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:8s} median {medians[name] * 1e3:8.1f} ms  min {min(t) * 1e3:8.1f} ms")
    print(f"ratio reuse/system = {medians['reuse'] / medians['system']:.3f}")


if __name__ == "__main__":
    main()
