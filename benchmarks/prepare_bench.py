"""Preparation throughput and peak memory per process on synthetic MEDS at two sizes, for the
single-process, multi-process and Apache Beam DirectRunner paths.

    python benchmarks/prepare_bench.py --events=10000000 --workers=2 --work_dir=/tmp/prepare_bench
    python benchmarks/prepare_bench.py --events=20000000 --paths=single,multi --repeats=3

Generates synthetic MEDS with about `events` and 2 x `events` rows (525 events per subject),
runs `python -m cvmae_jax.prepare` on each in a subprocess per path (`--paths`: single =
1 process, multi = `--workers` processes, beam = DirectRunner with `--workers` processes; beam
needs apache-beam in this Python and is skipped without it) and prints one JSON line per size
and path: events/s, the speedup over single, the main process's peak RSS and the largest
worker's (the workers are that process's children), and the CPU seconds of the main process and
of the workers together (on a loaded machine the times say little; the CPU seconds show what
the workers add and what stays in the main process). Peak RSS should stay flat as the data
doubles (streaming preparation). One run's time moves by 10-20% from run to run on a small VM,
so ``--repeats=N`` runs the paths in turn N times per size and adds a line of medians, with
the speedup of the medians and each repeat's own.

Both steps run in subprocesses and this process imports nothing heavy: Linux carries a
process's peak RSS across fork and exec into the child's ru_maxrss, so generating the data in
this process would add the generator's peak to the measured one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

EVENTS_PER_SUBJECT = 525  # measured: the default 1,000 subjects give 525k events
ROOT = Path(__file__).resolve().parents[1]
PATHS = ("single", "multi", "beam")
# Runs the prepare command line in this subprocess, then prints its own peak RSS and its
# largest reaped child's (the workers, stopped and joined before the command returns).
_MEASURED = """
import json, resource, runpy, sys
sys.argv = ["cvmae_jax.prepare", *sys.argv[1:]]
try:
    runpy.run_module("cvmae_jax.prepare", run_name="__main__")
except SystemExit as stop:
    if stop.code:
        raise
own, children = (resource.getrusage(who) for who in
                  (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"self": own.ru_maxrss, "children": children.ru_maxrss,
                  "main_cpu_s": own.ru_utime + own.ru_stime,
                  "workers_cpu_s": children.ru_utime + children.ru_stime}))
"""


def _events(summary: dict) -> int:
    return sum(s["events"] for s in summary["splits"].values())


def _generate(meds_dir: Path, summary_path: Path, events: int) -> None:
    """Writes the synthetic MEDS root and its summary (counts) in a subprocess."""
    shutil.rmtree(meds_dir, ignore_errors=True)  # a root without summary is incomplete
    cmd = [sys.executable, "-m", "cvmae_jax.data.synthetic", f"--out_dir={meds_dir}",
           f"--num_subjects={events // EVENTS_PER_SUBJECT}"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    summary_path.write_text(json.dumps(json.loads(out)))


def _path_flags(path: str, workers: int) -> list[str]:
    if path == "single":
        return ["--config.data.prepare_workers=1"]
    if path == "multi":
        return [f"--config.data.prepare_workers={workers}"]
    return [f"--beam_options=--runner=DirectRunner --direct_num_workers={workers} "
            "--direct_running_mode=multi_processing"]


def run_one(events: int, path: str, workers: int, work_dir: Path) -> dict:
    """Generates (or reuses) the dataset, prepares it in a fresh subprocess, measures it."""
    meds_dir = work_dir / f"meds_{events}"
    summary_path = work_dir / f"meds_{events}.json"
    if not summary_path.exists():
        _generate(meds_dir, summary_path, events)
    total = _events(json.loads(summary_path.read_text()))
    out = work_dir / f"prepared_{events}_{path}"
    shutil.rmtree(out, ignore_errors=True)  # measure a full prepare, never a reuse
    cmd = [sys.executable, "-c", _MEASURED, "--config=configs/meds.py",
           f"--config.data.meds_dir={meds_dir}", f"--config.data.data_dir={out}",
           *_path_flags(path, workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"prepare ({path}) failed:\n{proc.stderr[-2000:]}")
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return dict(events=total, path=path, processes=1 if path == "single" else workers,
                seconds=round(seconds, 2), events_per_s=round(total / seconds),
                main_peak_rss_mib=round(rss["self"] / 1024),
                worker_peak_rss_mib=round(rss["children"] / 1024),
                main_cpu_s=round(rss["main_cpu_s"], 1),
                workers_cpu_s=round(rss["workers_cpu_s"], 1))


def _summary(rows: dict[str, list[dict]]) -> dict:
    """Per path over the repeats (`rows`: each path's runs of one size): median seconds and
    events/s, the speedup of the medians and each repeat's speedup over that repeat's single
    run."""
    events = next(iter(rows.values()))[0]["events"]
    medians = {path: round(statistics.median(r["seconds"] for r in runs), 2)
               for path, runs in rows.items()}
    out: dict = dict(events=events, summary="median", repeats=len(next(iter(rows.values()))),
                     seconds=medians)
    out["events_per_s"] = {path: round(events / s) for path, s in medians.items()}
    if "single" in rows:
        for path in rows:
            if path != "single":
                ratios = [s["seconds"] / r["seconds"] for s, r in zip(rows["single"], rows[path])]
                out[f"{path}_speedup"] = dict(
                    of_medians=round(medians["single"] / medians[path], 2),
                    per_repeat=[round(x, 2) for x in ratios])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="the smaller size N")
    parser.add_argument("--workers", type=int, default=2, help="processes of multi and beam")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"some of {PATHS}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every path per size, the paths alternating; > 1 adds a "
                             "summary line of medians")
    parser.add_argument("--work_dir", default="/tmp/prepare_bench")
    args = parser.parse_args()
    paths = args.paths.split(",")
    if (args.events < EVENTS_PER_SUBJECT or args.workers < 1 or args.repeats < 1
            or not set(paths) <= set(PATHS)):
        parser.error(f"--events >= {EVENTS_PER_SUBJECT}, --workers >= 1, --repeats >= 1, "
                     f"--paths of {PATHS}")
    if "beam" in paths and importlib.util.find_spec("apache_beam") is None:
        print("beam: skipped (apache-beam is not installed in this Python: the [beam] extra)")
        paths.remove("beam")
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for events in (args.events, 2 * args.events):
        rows: dict[str, list[dict]] = {path: [] for path in paths}
        for repeat in range(args.repeats):
            single = None
            for path in paths:
                row = run_one(events, path, args.workers, work_dir)
                single = row["events_per_s"] if path == "single" else single
                if single:
                    row["speedup_vs_single"] = round(row["events_per_s"] / single, 2)
                row["repeat"] = repeat
                rows[path].append(row)
                print(json.dumps(row), flush=True)
        if args.repeats > 1:
            print(json.dumps(_summary(rows)), flush=True)


if __name__ == "__main__":
    main()
