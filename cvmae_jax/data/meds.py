"""Reading and validating MEDS datasets: subject splits, numeric events, lab selection.

A MEDS root holds `data/**/*.parquet` (subject_id, time, code, numeric_value, ...) and
`metadata/subject_splits.parquet` (subject_id, split). Oddities that can be survived are
counted (see `event_counts`), never silently dropped; bad input raises `MEDSFormatError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvmae_jax.config import default_config

SPLITS = ("train", "tuning", "held_out")
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")
EVENT_SCHEMA = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")),
                          ("code", pa.string()), ("numeric_value", pa.float64())])
_COUNTS_KEY = b"cvmae.event_counts"

DATA_DEFAULTS = default_config().data.to_dict()  # for callers passing a partial config


class MEDSFormatError(ValueError):
    """Malformed MEDS input; the message names the file, the column and the problem."""


def config_get(data_config: Any, key: str) -> Any:
    """`data_config.<key>` (ConfigDict, dict or object), falling back to DATA_DEFAULTS."""
    if isinstance(data_config, Mapping) or hasattr(data_config, "get"):
        return data_config.get(key, DATA_DEFAULTS[key])
    return getattr(data_config, key, DATA_DEFAULTS[key])


def data_files(meds_dir: str | Path) -> list[Path]:
    """All `data/**/*.parquet` shards under the MEDS root, sorted by path."""
    data = Path(meds_dir) / "data"
    files = sorted(data.rglob("*.parquet"))
    if not files:
        raise MEDSFormatError(f"{data}: no *.parquet files found (is this a MEDS root?)")
    return files


def read_subject_splits(meds_dir: str | Path) -> dict[int, str]:
    """{subject_id: split} from metadata/subject_splits.parquet, else from data/<split>/ folders."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    if not path.exists():
        return _splits_from_folders(meds_dir)
    table = pq.read_table(path)
    for col, ok in (("subject_id", pa.types.is_integer), ("split", _is_string)):
        if col not in table.column_names:
            raise MEDSFormatError(f"{path}: column {col!r} is missing")
        if not ok(table.schema.field(col).type):
            raise MEDSFormatError(f"{path}: column {col!r} has type {table.schema.field(col).type}")
    if table.column("subject_id").null_count or table.column("split").null_count:
        raise MEDSFormatError(f"{path}: columns subject_id/split contain nulls")
    ids = table.column("subject_id").to_numpy().astype(np.int64)
    splits = table.column("split").to_pylist()
    result = dict(zip(ids.tolist(), splits))
    conflicts = sum(1 for i, s in zip(ids.tolist(), splits) if result[i] != s)
    if conflicts:
        raise MEDSFormatError(f"{path}: column subject_id: {conflicts} rows put an already "
                              "listed subject into a different split")
    return result


def _splits_from_folders(meds_dir: str | Path) -> dict[int, str]:
    data = Path(meds_dir) / "data"
    result: dict[int, str] = {}
    for f in data_files(meds_dir):
        parts = f.relative_to(data).parts
        if len(parts) < 2:
            raise MEDSFormatError(f"{f}: no metadata/subject_splits.parquet and the file is not "
                                  "under a data/<split>/ folder, so its split is unknown")
        ids = pq.read_table(f, columns=["subject_id"]).column("subject_id")
        for i in pc.unique(ids).to_pylist():
            if result.setdefault(i, parts[0]) != parts[0]:
                raise MEDSFormatError(
                    f"{f}: column subject_id: a subject appears under two split folders")
    return result


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and _is_string(t.value_type))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)


_COLUMN_CHECKS = {"subject_id": pa.types.is_integer, "time": pa.types.is_timestamp,
                  "code": _is_string, "numeric_value": _is_number}


def _read_shard(path: Path) -> pa.Table:
    """The four event columns of one shard, validated and cast to EVENT_SCHEMA."""
    schema = pq.read_schema(path)
    for col, ok in _COLUMN_CHECKS.items():
        if col not in schema.names:
            raise MEDSFormatError(f"{path}: column {col!r} is missing")
        if not ok(schema.field(col).type):
            raise MEDSFormatError(
                f"{path}: column {col!r} has unsupported type {schema.field(col).type}")
    table = pq.read_table(path, columns=list(EVENT_COLUMNS))
    if table.column("subject_id").null_count:
        raise MEDSFormatError(f"{path}: column subject_id contains nulls")
    if table.column("code").null_count:
        raise MEDSFormatError(f"{path}: column code contains nulls")
    # ns -> us may truncate; every other cast must be exact
    cols = [table.column(c).cast(f.type, safe=c != "time")
            for c, f in zip(EVENT_COLUMNS, EVENT_SCHEMA)]
    return pa.Table.from_arrays(cols, schema=EVENT_SCHEMA)


def read_numeric_events(meds_dir: str | Path, split: str, codes=None) -> pa.Table:
    """Timed, finite numeric events of one split (optionally only `codes`).

    Returns a table [N] with EVENT_SCHEMA columns sorted stably by (subject_id, time). Counts of
    what was left out and of kept oddities travel in the schema metadata; read them with
    `event_counts(table)`.
    """
    subject_splits = read_subject_splits(meds_dir)
    all_ids = pa.array(list(subject_splits), pa.int64())
    split_ids = pa.array([i for i, s in subject_splits.items() if s == split], pa.int64())
    code_set = None if codes is None else pa.array(list(codes), pa.string())
    counts = dict.fromkeys(("rows", "rows_without_split", "null_time", "null_value",
                            "nonfinite_value", "other_code"), 0)
    parts, deaths = [], []
    for path in data_files(meds_dir):
        t = _read_shard(path)
        counts["rows_without_split"] += t.num_rows - _count(pc.is_in(t["subject_id"], all_ids))
        t = t.filter(pc.is_in(t["subject_id"], split_ids))
        counts["rows"] += t.num_rows
        deaths.append(t.filter(pc.equal(t["code"], "MEDS_DEATH")).select(["subject_id", "time"]))
        counts["null_time"] += t["time"].null_count
        t = t.filter(pc.is_valid(t["time"]))
        counts["null_value"] += t["numeric_value"].null_count
        t = t.filter(pc.is_valid(t["numeric_value"]))
        finite = pc.is_finite(t["numeric_value"])
        counts["nonfinite_value"] += t.num_rows - _count(finite)
        t = t.filter(finite)
        if code_set is not None:
            keep = pc.is_in(t["code"], code_set)
            counts["other_code"] += t.num_rows - _count(keep)
            t = t.filter(keep)
        parts.append(t)
    table = pa.concat_tables(parts)
    table = table.take(pc.sort_indices(table, [("subject_id", "ascending"), ("time", "ascending")]))
    counts["kept"] = table.num_rows
    distinct = table.group_by(list(EVENT_COLUMNS)).aggregate([]).num_rows
    counts["duplicate_rows"] = table.num_rows - distinct
    counts["after_death_rows"] = _count_after_death(table, pa.concat_tables(deaths))
    return table.replace_schema_metadata({_COUNTS_KEY: json.dumps(counts).encode()})


def _count_after_death(events: pa.Table, deaths: pa.Table) -> int:
    deaths = deaths.filter(pc.is_valid(deaths["time"]))
    if not deaths.num_rows or not events.num_rows:
        return 0
    first = deaths.group_by("subject_id").aggregate([("time", "min")])
    joined = events.select(["subject_id", "time"]).join(first, "subject_id", join_type="inner")
    return _count(pc.greater(joined["time"], joined["time_min"]))


def _count(mask) -> int:
    return int(pc.sum(mask).as_py() or 0)


def event_counts(events: pa.Table) -> dict[str, int]:
    """Counts attached by `read_numeric_events`: rows read, left out (null_time, null_value,
    nonfinite_value, other_code, rows_without_split), kept, and kept oddities
    (duplicate_rows, after_death_rows). Empty when the table carries none."""
    meta = events.schema.metadata or {}
    return json.loads(meta[_COUNTS_KEY]) if _COUNTS_KEY in meta else {}


def select_lab_codes(train_events_or_meds_dir, data_config,
                     report: dict | None = None) -> list[str]:
    """Lab codes to model, most frequent first.

    `data_config.lab_codes` (non-empty) is taken as given, in its order; every code must have
    numeric train rows. Otherwise: codes matching `lab_code_pattern` (re.search) with at least
    `min_code_count` numeric train rows, the `top_k` most frequent (ties by code; top_k <= 0
    keeps all). `report`, when given, receives counts of the selection.
    """
    events = train_events_or_meds_dir
    if not isinstance(events, pa.Table):
        events = read_numeric_events(events, "train")
    vc = pc.value_counts(events["code"])
    counts = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))
    explicit = tuple(config_get(data_config, "lab_codes") or ())
    report = {} if report is None else report
    if explicit:
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"config.data.lab_codes lists a code twice: {explicit}")
        missing = [c for c in explicit if c not in counts]
        if missing:
            raise MEDSFormatError(f"data/ (train split), column code: {len(missing)} requested "
                                  f"lab_codes have no numeric train rows: {missing[:10]}")
        report.update(selection="explicit", selected=len(explicit))
        return list(explicit)
    pattern = config_get(data_config, "lab_code_pattern")
    regex = re.compile(pattern)
    matching = {c: n for c, n in counts.items() if regex.search(c)}
    min_count = int(config_get(data_config, "min_code_count"))
    frequent = sorted((c for c, n in matching.items() if n >= min_count),
                      key=lambda c: (-matching[c], c))
    top_k = int(config_get(data_config, "top_k"))
    selected = frequent[:top_k] if top_k > 0 else frequent
    if not selected:
        raise MEDSFormatError(f"data/ (train split), column code: no code with numeric values "
                              f"matches {pattern!r} with >= {min_count} rows "
                              f"({len(matching)} match with fewer rows)")
    report.update(selection="pattern", matching=len(matching),
                  below_min_count=len(matching) - len(frequent), selected=len(selected))
    return selected
