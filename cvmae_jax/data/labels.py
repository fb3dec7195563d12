"""MEDS label files (ACES / MEDS-DEV schema) and each label's input window of lab events.

A label file (`labels/<task>/<split>.parquet` or `labels/<task>/*.parquet`) has subject_id,
prediction_time, boolean_value, and optionally integer_value, float_value, categorical_value
(possibly all null). Only events with time <= prediction_time may inform a prediction.

Times are compared as `meds.py` reads them: naive ones as local wall time, zone-aware ones as
UTC instants (whatever their zones, exact). A naive column is never compared with a zone-aware
one: the naive one's zone is unknown, and any guess could let events recorded after
prediction_time into the window, so such a label file is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from absl import logging

from cvmae_jax.data import meds, stream
from cvmae_jax.data.sequences import window_example, window_rows
from cvmae_jax.data.stats import DataStats

# Each required column: its type check and what a message says is expected.
LABEL_CHECKS = {"subject_id": (pa.types.is_integer, "an integer type"),
                "prediction_time": (pa.types.is_timestamp, "a timestamp, e.g. timestamp[us]"),
                "boolean_value": (pa.types.is_boolean, "bool (0/1 integers: cast them with "
                                  "pyarrow.compute.cast(column, pyarrow.bool_()))")}
OPTIONAL = ("integer_value", "float_value", "categorical_value")


def empty_label_table() -> pa.Table:
    """A MEDS label table with no rows: subject_id int64, prediction_time timestamp[us],
    boolean_value bool."""
    return pa.table({"subject_id": pa.array([], pa.int64()),
                     "prediction_time": pa.array([], pa.timestamp("us")),
                     "boolean_value": pa.array([], pa.bool_())})


def label_files(labels_dir: str | Path) -> list[Path]:
    """`*.parquet` files of one task folder (e.g. labels/<task>/), sorted by path."""
    files = meds.find_parquet_files(labels_dir).files
    if not files:
        raise meds.MEDSFormatError(f"{labels_dir}: no *.parquet label files found")
    return files


def read_labels(path: str | Path, subject_splits: dict[int, str]) -> pa.Table:
    """A validated label file: subject_id int64, prediction_time timestamp[us] (with the file's
    time zone, if any), boolean_value bool, [N] rows. Raises MEDSFormatError for
    missing/mistyped/null columns and for subjects missing from the subject splits."""
    path = Path(path)
    table = meds.read_small_parquet(path)
    unexpected = sorted(set(table.column_names) - set(LABEL_CHECKS) - set(OPTIONAL))
    missing = [col for col in LABEL_CHECKS if col not in table.column_names]
    if missing:  # named first: a misspelled column is also an unexpected one
        raise meds.MEDSFormatError(f"{path}: column {missing[0]!r} is missing" + (
            f" (the file has {unexpected} instead)" if unexpected else ""))
    if unexpected:
        raise meds.MEDSFormatError(f"{path}: unexpected columns {unexpected} (a label "
                                   f"file has {list(LABEL_CHECKS) + list(OPTIONAL)})")
    for col, (ok, expected) in LABEL_CHECKS.items():
        if not ok(table.schema.field(col).type):
            raise meds.MEDSFormatError(f"{path}: column {col!r} has unsupported type "
                                       f"{table.schema.field(col).type}; expected {expected}")
        if table.column(col).null_count:
            raise meds.MEDSFormatError(f"{path}: column {col} contains nulls")
    table = pa.table({"subject_id": meds.cast_column(path, "subject_id", table["subject_id"],
                                                     pa.int64()),
                      "prediction_time": meds.cast_column(
                          path, "prediction_time",
                          meds.whole_microseconds(table["prediction_time"], round_up=False),
                          pa.timestamp("us", tz=table.schema.field("prediction_time").type.tz)),
                      "boolean_value": table["boolean_value"]})
    known = pc.is_in(table["subject_id"], pa.array(list(subject_splits), pa.int64()))
    unknown = table.num_rows - int(pc.sum(known).as_py() or 0)
    if unknown:
        raise meds.MEDSFormatError(f"{path}: column subject_id: {unknown} rows refer to "
                                   "subjects missing from the subject splits")
    return table


def _zone_words(zone: str | None) -> str:
    return f"has time zone {zone}" if zone else "has no time zone (local wall time)"


def check_time_zones(labels_path: Path, label_zone: str | None, data_files: list[Path]) -> None:
    """Refuses (MEDSFormatError naming both files and zones) a label file whose prediction_time
    is naive while a data file's time is zone-aware, or the reverse; logs the zones compared."""
    zones = {f: meds.time_zone(f) for f in data_files}
    other = next((f for f, zone in zones.items() if (zone is None) != (label_zone is None)), None)
    if other is not None:
        raise meds.MEDSFormatError(
            f"{labels_path}: column prediction_time {_zone_words(label_zone)} but {other}: "
            f"column time {_zone_words(zones[other])}; a naive time's zone is unknown, so "
            "comparing them could put events recorded after prediction_time into a window: "
            "give both columns a time zone, or neither (docs/data_problems.md, Time zones)")
    if label_zone:
        logging.info("labels %s: column prediction_time has time zone %s and the data's column "
                     "time %s: compared as UTC instants", labels_path, label_zone,
                     ", ".join(sorted(set(zones.values()))))


def prediction_time_zone(files: list[Path]) -> str | None:
    """The time zone of prediction_time shared by a task's label files (None: naive); files
    that differ raise MEDSFormatError naming two (their predictions share one column)."""
    zones = [meds.time_zone(f, "prediction_time") for f in files]
    for f, zone in zip(files, zones):
        if zone != zones[0]:
            raise meds.MEDSFormatError(
                f"{f}: column prediction_time {_zone_words(zone)} but {files[0]}'s "
                f"{_zone_words(zones[0])}: the label files of one task need the same zone, or "
                "none")
    return zones[0] if zones else None


def label_windows(meds_dir: str | Path, labels_path: str | Path, stats: DataStats,
                  max_len: int, each_code_latest: bool = False) -> Iterator[dict]:
    """For each label row, at most max_len events of `stats.codes` with time <= its
    prediction_time (inclusive): the last ones, or with `each_code_latest` every code's latest
    one and then the last others (`window_rows`); streamed shard by shard (time zones: see the
    module docstring; `check_time_zones`).

    Yields dicts as `sequences.build_examples` (example_id = the label's row index, subject_id,
    start_time_us / end_time_us of the window's first/last event, times float32 [n] hours since
    the first event, codes int32 [n], values float32 [n] normalized; n <= max_len, 0 when the
    subject has no such event, then start/end = prediction_time_us) plus prediction_time_us
    int64 and label bool.
    """
    subject_splits = meds.read_subject_splits(meds_dir)
    labels = read_labels(labels_path, subject_splits)
    files = meds.data_files(meds_dir)
    check_time_zones(Path(labels_path), labels.schema.field("prediction_time").type.tz, files)
    lookup = stream.SplitLookup(subject_splits)
    l_subject = labels["subject_id"].to_numpy()
    l_time = labels["prediction_time"].cast(pa.int64()).to_numpy()
    l_value = labels["boolean_value"].to_numpy(zero_copy_only=False)
    split_of_label = lookup.splits_of(l_subject)
    for s, split in enumerate(meds.SPLITS):
        todo = np.flatnonzero(split_of_label == s)
        if not len(todo):
            continue
        done = np.zeros(len(l_subject), bool)
        for events in stream.lab_events_by_shard(files, lookup, split, stats.codes,
                                                 stats.drop_values):
            subjects = events["subject_id"].to_numpy()
            rows = todo[np.isin(l_subject[todo], subjects)]
            if not len(rows):
                continue
            times = events["time"].cast(pa.int64()).to_numpy()
            codes = pc.index_in(events["code"], value_set=pa.array(stats.codes, pa.string()))
            codes = codes.to_numpy().astype(np.int32)
            values = stats.normalize(codes, events["numeric_value"].to_numpy())
            for i in rows:
                lo, hi = np.searchsorted(subjects, l_subject[i], side="left"), \
                    np.searchsorted(subjects, l_subject[i], side="right")
                end = lo + np.searchsorted(times[lo:hi], l_time[i], side="right")
                window = lo + window_rows(codes[lo:end], max_len, each_code_latest)
                done[i] = True
                yield _window(i, l_subject[i], l_time[i], l_value[i], times[window],
                              codes[window], values[window])
        empty = np.zeros(0, np.int64)
        for i in todo[~done[todo]]:  # subjects without any selected lab event
            yield _window(i, l_subject[i], l_time[i], l_value[i], empty, empty, empty)


def window_words(max_len: int, each_code_latest: bool = False) -> str:
    """How reports name a label window of `window_rows`."""
    if each_code_latest:
        return (f"every selected code's latest event and then the last others, {max_len} "
                "events at most, at or before its prediction time")
    return f"the last {max_len} selected events at or before its prediction time"


def _window(i, subject, t_pred, label, times, codes, values) -> dict:
    return dict(window_example(i, subject, times, codes, values, empty_at_us=t_pred),
                prediction_time_us=np.int64(t_pred), label=np.bool_(label))
