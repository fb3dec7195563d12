"""Run outputs: ``metrics.jsonl`` lines, TensorBoard scalars and progress lines with rate and
ETA."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

from cvmae_jax.jsonio import atomic_path, dumps_json, os_error_saying


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and, with ``tensorboard_dir``,
    writes the same scalars as TensorBoard event files there (process 0 only).

    A run starting at ``start_step`` (its checkpoint's step, 0 for none) first drops the lines
    logged after that step by the run that stopped before saving again, and a torn last line of
    a run killed while writing, so every step is in the file once. Its event file tells
    TensorBoard to hide the earlier files' events after ``start_step`` in the same way."""

    def __init__(self, path: str | os.PathLike, start_step: int,
                 tensorboard_dir: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(self.path):
            self._drop_after(start_step)
        self.tensorboard = None
        if self.enabled and tensorboard_dir is not None:
            self.tensorboard = TensorBoardWriter(tensorboard_dir, start_step)

    def _drop_after(self, step: int) -> None:
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) < len(lines):
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(kept)
            if step:
                logging.info("metrics.jsonl: dropped %d line(s) logged after step %d, where "
                             "this run starts", len(lines) - len(kept), step)
            else:  # nothing to resume: an earlier run here saved no checkpoint
                logging.warning("metrics.jsonl: dropped %d line(s) of an earlier run in this "
                                "workdir that saved no checkpoint; this run starts from step 0 "
                                "and replaces its config.json", len(lines) - len(kept))

    def write(self, record: dict) -> None:
        """One record: ``step``, ``split`` for validation (none for a training window), and
        metric values."""
        if not self.enabled:
            return
        record = _plain(record)
        try:
            with open(self.path, "a") as f:
                f.write(dumps_json(record) + "\n")
        except OSError as error:  # a full disk: Python's message names no file
            if error.filename is not None:
                raise
            raise os_error_saying(error, f"{self.path}: could not write the metrics of step "
                                         f"{record['step']}: {error}") from error
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class TensorBoardWriter:
    """A record's numbers as TensorBoard scalars tagged ``train/<metric>`` (training windows)
    or ``<split>/<metric>`` (validation), in an event file of its own in ``logdir``, flushed
    after each record (tensorboardX: no TensorFlow needed). ``tensorboard --logdir`` on a
    folder of workdirs shows each run by its folder name.

    A run resuming from ``start_step`` marks its file so that TensorBoard purges the events
    after ``start_step`` of the files written before it (the steps it trains again)."""

    def __init__(self, logdir: str | os.PathLike, start_step: int):
        from tensorboardX import SummaryWriter  # here: only training writes event files

        # The file name holds the time in seconds; the suffix keeps files apart (and in order)
        # when two runs of one workdir start in the same second.
        self.writer = SummaryWriter(os.fspath(logdir), purge_step=start_step + 1,
                                    filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and \
                    not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a complete record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(record: dict) -> dict:
    """Numpy scalars -> Python numbers, rounded for readability."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (np.floating, float)):
            value = float(value)
            out[key] = value if not math.isfinite(value) else float(f"{value:.6g}")
        elif isinstance(value, np.integer):
            out[key] = int(value)
        else:
            out[key] = value
    return out


class Progress:
    """Periodic progress lines: step, selected metrics, steps/s and ETA."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.first_line = None  # (step, time) of the first line: the pace is measured from it

    def line(self, step: int, metrics: dict) -> str:
        """steps/s and tok/s are the logging window's training throughput (metrics.jsonl's).
        The ETA uses the pace since this process's first line (evaluating and saving
        included); the first line itself has only its window's throughput, which leaves
        compiling out, so start-up and restoring never inflate the ETA."""
        now = time.perf_counter()
        if self.first_line is None:
            self.first_line = (step, now)
        first_step, first_time = self.first_line
        if step > first_step:
            pace = (step - first_step) / (now - first_time)
        else:
            pace = metrics.get("steps_per_sec", float("nan"))
        eta = (self.total_steps - step) / pace if pace > 0 else float("nan")
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "masked_mse", "mask_rate")
                         if k in metrics)
        return (f"step {step}/{self.total_steps} | {shown} | "
                f"{metrics.get('steps_per_sec', pace):.2f} steps/s "
                f"{metrics.get('tokens_per_sec', 0):.0f} tok/s | ETA {clock(eta)}")

    def log(self, step: int, metrics: dict) -> None:
        if jax.process_index() == 0:
            logging.info(self.line(step, metrics))


class Countdown:
    """Progress of a long loop of ``total`` items on process 0: a line "<what>: <done>/<total>
    <unit>, <rate> <unit>/s, ETA <clock>" at most every ``every_s`` seconds, none for a loop
    that ends sooner."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 30.0,
                 timer=time.perf_counter):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done, self.timer = 0, timer
        self.start = self.last_line = timer()

    def advance(self, n: int = 1) -> None:
        """Counts ``n`` more items done; logs a line when ``every_s`` has passed since the
        last one (or the start) and items remain."""
        self.done += n
        now = self.timer()
        if now - self.last_line < self.every_s or self.done >= self.total:
            return
        self.last_line = now
        rate = self.done / (now - self.start)
        if jax.process_index() == 0:
            logging.info("%s: %d/%d %s, %.1f %s/s, ETA %s", self.what, self.done, self.total,
                         self.unit, rate, self.unit, clock((self.total - self.done) / rate))


def clock(seconds: float) -> str:
    """Seconds as "12m05s", from an hour on "4h26m40s" ("?" when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
