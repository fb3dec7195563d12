"""Cutting each subject's lab events into fixed-length windows of (time, code, value) triplets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvmae_jax.data.stats import DataStats

WINDOWS = ("chunks", "last")
US_PER_HOUR = 3_600_000_000


def build_examples(events: pa.Table, stats: DataStats, max_len: int, window: str = "chunks",
                   min_window_len: int = 2, report: dict | None = None,
                   first_example_id: int = 0, each_code_latest: bool = False) -> Iterator[dict]:
    """Yields one example per window, ordered by (subject_id, window start).

    events: a table with subject_id, time, code, numeric_value (any order; sorted stably here).
    window: 'chunks' cuts a subject's in-vocabulary events into consecutive, non-overlapping
      windows of max_len (the last one may be shorter); 'last' keeps only the latest max_len,
      or with `each_code_latest` the label window of `window_rows`.
    Windows with fewer than min_window_len events are dropped.

    Each example: example_id int64 (first_example_id + 0, 1, ... in yield order), subject_id
    int64, start_time_us / end_time_us int64 (first/last event, µs since epoch), times float32
    [n] (hours since the first event), codes int32 [n] (index into stats.codes), values float32
    [n] (normalized), with n <= max_len. `report`, when given, receives counts (filled once
    the iterator is done).
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if max_len < 1 or min_window_len < 1:
        raise ValueError(f"max_len ({max_len}) and min_window_len ({min_window_len}) must be >= 1")
    idx = pc.index_in(events["code"], value_set=pa.array(stats.codes, pa.string()))
    known = pc.is_valid(idx)
    num_known = int(pc.sum(known).as_py() or 0)
    counts = dict(events=events.num_rows, out_of_vocab_events=events.num_rows - num_known,
                  subjects=0, examples=0, tokens=0, short_windows_dropped=0,
                  events_not_in_window=0)
    codes = idx.filter(known).to_numpy().astype(np.int32)
    subjects = events["subject_id"].filter(known).to_numpy().astype(np.int64)
    times = events["time"].filter(known).cast(pa.int64()).to_numpy().astype(np.int64)
    raw = events["numeric_value"].filter(known).to_numpy().astype(np.float64)
    order = np.lexsort((times, subjects))
    codes, subjects, times, values = (codes[order], subjects[order], times[order],
                                      stats.normalize(codes[order], raw[order]))
    starts = np.flatnonzero(np.diff(subjects, prepend=subjects[:1] - 1)) if len(subjects) else []
    example_id = first_example_id
    for s_lo, s_hi in zip(starts, np.r_[starts[1:], len(subjects)].astype(np.int64)):
        counts["subjects"] += 1
        if window == "chunks":
            pieces = [slice(lo, min(lo + max_len, s_hi)) for lo in range(s_lo, s_hi, max_len)]
        else:
            pieces = [s_lo + window_rows(codes[s_lo:s_hi], max_len, each_code_latest)]
            counts["events_not_in_window"] += s_hi - s_lo - len(pieces[0])
        for rows in pieces:
            window_times = times[rows]
            if len(window_times) < min_window_len:
                counts["short_windows_dropped"] += 1
                counts["events_not_in_window"] += len(window_times)
                continue
            yield window_example(example_id, subjects[s_lo], window_times, codes[rows],
                                 values[rows])
            example_id += 1
            counts["tokens"] += len(window_times)
    counts["examples"] = example_id - first_example_id
    if report is not None:
        report.update({k: int(v) for k, v in counts.items()})


def window_example(example_id: int, subject_id: int, times_us: np.ndarray, codes: np.ndarray,
                   values: np.ndarray, empty_at_us: int | None = None) -> dict:
    """One window as the pipeline reads it from events ``times_us`` int64 [n] (microseconds,
    time order), ``codes`` [n] and normalized ``values`` [n]: example_id, subject_id,
    start_time_us / end_time_us (its first / last event; ``empty_at_us`` when n = 0), times
    float32 [n] (hours since its first event), codes int32 [n], values float32 [n]."""
    start = times_us[0] if len(times_us) else empty_at_us
    end = times_us[-1] if len(times_us) else empty_at_us
    return dict(example_id=np.int64(example_id), subject_id=np.int64(subject_id),
                start_time_us=np.int64(start), end_time_us=np.int64(end),
                times=((times_us - start) / US_PER_HOUR).astype(np.float32),
                codes=np.asarray(codes, np.int32), values=np.asarray(values, np.float32))


def window_rows(codes: np.ndarray, max_len: int, each_code_latest: bool) -> np.ndarray:
    """Ascending indices int64 [<= max_len] into one subject's events up to a prediction time
    (``codes`` int [n], time order) that form its label window: all n when they fit, else the
    last max_len, or with ``each_code_latest`` the latest event of every code (the most recent
    max_len of those when there are more codes) and then the most recent other events, so a
    long history keeps its rare codes and admission descriptors."""
    n = len(codes)
    if n <= max_len or not each_code_latest:
        return np.arange(max(0, n - max_len), n)
    latest = np.zeros(n, bool)
    latest[n - 1 - np.unique(codes[::-1], return_index=True)[1]] = True
    kept = np.flatnonzero(latest)[-max_len:]
    others = np.flatnonzero(~latest)
    return np.sort(np.concatenate([kept, others[len(others) - (max_len - len(kept)):]]))
