"""Preparation throughput and peak memory on synthetic MEDS at two sizes.

    python benchmarks/prepare_bench.py --events=10000000 --work_dir=/tmp/prepare_bench

Generates synthetic MEDS with about `events` and 2 x `events` rows (525 events per subject),
runs `python -m cvmae_jax.prepare` on each in a subprocess and prints events/s and the
subprocess's peak RSS, which should stay flat as the data doubles (streaming preparation).

Both steps run in subprocesses and this process imports nothing heavy: Linux carries a
process's peak RSS across fork and exec into the child's ru_maxrss, so generating the data in
this process would add the generator's peak to the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EVENTS_PER_SUBJECT = 525  # measured: the default 1,000 subjects give 525k events
ROOT = Path(__file__).resolve().parents[1]


def _events(summary: dict) -> int:
    return sum(s["events"] for s in summary["splits"].values())


def _generate(meds_dir: Path, summary_path: Path, events: int) -> None:
    """Writes the synthetic MEDS root and its summary (counts) in a subprocess."""
    shutil.rmtree(meds_dir, ignore_errors=True)  # a root without summary is incomplete
    cmd = [sys.executable, "-m", "cvmae_jax.data.synthetic", f"--out_dir={meds_dir}",
           f"--num_subjects={events // EVENTS_PER_SUBJECT}"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    summary_path.write_text(json.dumps(json.loads(out)))


def run_one(events: int, work_dir: Path) -> dict:
    """Generates (or reuses) the dataset, prepares it in a fresh subprocess, measures it."""
    meds_dir = work_dir / f"meds_{events}"
    summary_path = work_dir / f"meds_{events}.json"
    if not summary_path.exists():
        _generate(meds_dir, summary_path, events)
    total = _events(json.loads(summary_path.read_text()))
    out = work_dir / f"prepared_{events}"
    shutil.rmtree(out, ignore_errors=True)  # measure a full prepare, never a reuse
    cmd = [sys.executable, "-m", "cvmae_jax.prepare", "--config=configs/meds.py",
           f"--config.data.meds_dir={meds_dir}", f"--config.data.data_dir={out}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return dict(events=total, subjects=total // EVENTS_PER_SUBJECT, seconds=round(seconds, 1),
                events_per_s=round(total / seconds), peak_rss_mib=round(usage.ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="the smaller size N")
    parser.add_argument("--work_dir", default="/tmp/prepare_bench")
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for events in (args.events, 2 * args.events):
        print(json.dumps(run_one(events, work_dir)), flush=True)


if __name__ == "__main__":
    main()
