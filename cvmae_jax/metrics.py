"""Run outputs: ``metrics.jsonl`` lines and progress lines with rate and ETA."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (process 0 only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.enabled = jax.process_index() == 0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")


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

    def __init__(self, total_steps: int, start_step: int):
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()

    def line(self, step: int, metrics: dict) -> str:
        """steps/s and tok/s are the logging window's training throughput (metrics.jsonl's);
        the ETA uses the whole run's pace so far (compiling, evaluating and saving included)."""
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        pace = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.total_steps - step) / pace if pace > 0 else float("nan")
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "masked_mse", "mask_rate")
                         if k in metrics)
        return (f"step {step}/{self.total_steps} | {shown} | "
                f"{metrics.get('steps_per_sec', pace):.2f} steps/s "
                f"{metrics.get('tokens_per_sec', 0):.0f} tok/s | ETA {clock(eta)}")

    def log(self, step: int, metrics: dict) -> None:
        if jax.process_index() == 0:
            logging.info(self.line(step, metrics))


def clock(seconds: float) -> str:
    """Seconds as "12m05s" ("?" when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
