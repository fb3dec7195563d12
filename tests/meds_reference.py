"""The whole-table, in-memory MEDS reader: the simple reference the streaming pipeline
(`cvmae_jax.data.stream`, `cvmae_jax.data.plan`) is checked against.

`read_numeric_events` reads one split into one table, with the counts of what it left out and
of kept oddities (`event_counts`); `compute_stats` takes the statistics of `codes` from such a
table at once; `train_code_counts` gives the {code: numeric train rows} that
`meds.select_lab_codes` selects from. Each holds the whole data in memory: for test data only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvmae_jax.data import meds
from cvmae_jax.data.stats import CodeMoments, DataStats, Reservoirs, finish_stats

_COUNTS_KEY = b"cvmae.event_counts"


def read_numeric_events(meds_dir: str | Path, split: str, codes=None) -> pa.Table:
    """Timed, finite numeric events of one split (optionally only `codes`), read into memory.

    Returns a table [N] with meds.EVENT_SCHEMA columns sorted stably by (subject_id, time).
    Counts of what was left out and of kept oddities travel in the schema metadata; read them
    with `event_counts(table)`.
    """
    subject_splits = meds.read_subject_splits(meds_dir)
    all_ids = pa.array(list(subject_splits), pa.int64())
    split_ids = pa.array([i for i, s in subject_splits.items() if s == split], pa.int64())
    code_set = None if codes is None else pa.array(list(codes), pa.string())
    counts = dict.fromkeys(("rows", "rows_without_split", "null_time", "null_value",
                            "dropped_value",
                            "nonfinite_value", "other_code"), 0)
    parts, deaths = [], []
    for path in meds.data_files(meds_dir):
        for t in meds.shard_batches(path):
            counts["rows_without_split"] += t.num_rows - _count(pc.is_in(t["subject_id"], all_ids))
            t = t.filter(pc.is_in(t["subject_id"], split_ids))
            counts["rows"] += t.num_rows
            deaths.append(meds.death_times(t))
            t, dropped = meds.numeric_rows(t)
            for k, v in dropped.items():
                counts[k] += v
            if code_set is not None:
                keep = pc.is_in(t["code"], code_set)
                counts["other_code"] += t.num_rows - _count(keep)
                t = t.filter(keep)
            parts.append(t)
    table = pa.concat_tables(parts) if parts else meds.EVENT_SCHEMA.empty_table()
    table = meds.by_subject_and_time(table)
    counts["kept"] = table.num_rows
    counts["duplicate_rows"] = meds.duplicates_in(meds.value_groups(table))
    counts["after_death_rows"] = meds.count_after_death(table, pa.concat_tables(deaths))
    return table.replace_schema_metadata({_COUNTS_KEY: json.dumps(counts).encode()})


def _count(mask) -> int:
    return int(pc.sum(mask).as_py() or 0)


def event_counts(events: pa.Table) -> dict[str, int]:
    """Counts attached by `read_numeric_events`: rows read, left out (null_time, null_value,
    nonfinite_value, other_code, rows_without_split), kept, and kept oddities
    (duplicate_rows, after_death_rows). Empty when the table carries none."""
    meta = events.schema.metadata or {}
    return json.loads(meta[_COUNTS_KEY]) if _COUNTS_KEY in meta else {}


def train_code_counts(train_events_or_meds_dir) -> dict[str, int]:
    """{code: rows} of train events (a table), or of a MEDS root's numeric train rows
    (`read_numeric_events`): the counts `meds.select_lab_codes` selects from."""
    events = train_events_or_meds_dir
    if not isinstance(events, pa.Table):
        events = read_numeric_events(events, "train")
    vc = pc.value_counts(events["code"])
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


def compute_stats(train_events: pa.Table, codes, clip_quantiles=(0.001, 0.999),
                  reservoir_size: int | None = None, min_subjects: int = 1) -> DataStats:
    """Stats of `codes` from TRAIN events (subject_id, code, numeric_value); other codes ignored.

    Every code needs at least one row. Quantiles use numpy's default (linear) method, over all
    values (reservoir_size None) or a seeded sample of reservoir_size values per code.
    """
    codes = tuple(codes)
    known = pc.is_valid(pc.index_in(train_events["code"], value_set=pa.array(codes, pa.string())))
    events = train_events.filter(known)
    values = events["numeric_value"].to_numpy().astype(np.float64)
    moments = CodeMoments()
    moments.add(events["code"], values, events["subject_id"].to_numpy().astype(np.int64))
    moments.end_shard()
    reservoirs = Reservoirs(len(codes), reservoir_size or max(events.num_rows, 1))
    idx = pc.index_in(events["code"], value_set=pa.array(codes, pa.string()))
    reservoirs.add(idx.to_numpy(zero_copy_only=False).astype(np.int64), values,
                   events["subject_id"].to_numpy().astype(np.int64))
    return finish_stats(codes, moments, reservoirs, clip_quantiles, min_subjects=min_subjects)
