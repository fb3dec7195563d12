"""Reading and validating MEDS datasets: subject splits, numeric events, lab selection.

A MEDS root holds `data/**/*.parquet` (subject_id, time, code, numeric_value, ...) and
`metadata/subject_splits.parquet` (subject_id, split). Oddities that can be survived are
counted (`numeric_rows`; the prepare report lists the counts), never silently dropped; bad input
raises `MEDSFormatError`.

Times are read as timestamp[us] without a zone: a naive `time` (MEDS's local wall time) as it
is, a zone-aware one as its UTC instant, so that durations and order are exact whatever the zone
(a local wall time repeats an hour when daylight saving ends). `labels.py` refuses to compare
prediction times with event times when one of the two carries a zone and the other does not.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvmae_jax.config import default_config

SPLITS = ("train", "tuning", "held_out")
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")
EVENT_SCHEMA = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")),
                          ("code", pa.string()), ("numeric_value", pa.float64())])
SHARD_BATCH_ROWS = 1 << 20  # rows per table shard_batches yields

DATA_DEFAULTS = default_config().data.to_dict()  # for callers passing a partial config


class MEDSFormatError(ValueError):
    """Malformed MEDS input; the message names the file, the column and the problem."""


def config_get(data_config: Any, key: str) -> Any:
    """`data_config.<key>` (ConfigDict, dict or object), falling back to DATA_DEFAULTS."""
    if isinstance(data_config, Mapping) or hasattr(data_config, "get"):
        return data_config.get(key, DATA_DEFAULTS[key])
    return getattr(data_config, key, DATA_DEFAULTS[key])


class FoundFiles(NamedTuple):
    """The `*.parquet` files under a folder (sorted by path, as reached through symbolic links)
    and the links not followed because they lead to a folder or file already found."""
    files: list[Path]
    repeated_links: list[Path]


def find_parquet_files(folder: str | Path) -> FoundFiles:
    """Every `*.parquet` file under `folder`, following symbolic links to folders and files
    (`Path.rglob` skips linked folders before Python 3.13), each real file once and by its own
    name where it has one outside links. A linked folder already walked or to be walked (a loop,
    or a second name for a folder) and a second name for a file already found are listed in
    `repeated_links`, not read again. A broken link or an unreadable folder raises
    MEDSFormatError naming it."""
    def unreadable(error: OSError) -> None:
        raise MEDSFormatError(f"{error.filename}: unreadable folder ({error.strerror})")

    claimed = {os.path.realpath(top) for top, _, _ in os.walk(folder, onerror=unreadable)}
    through_link = {str(folder): False}
    by_target: dict[str, list[tuple[bool, Path]]] = {}  # real file -> (through a link, name)
    repeated = []
    for top, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        claimed.add(os.path.realpath(top))
        kept = []
        for name in sorted(folders):
            path = os.path.join(top, name)
            if os.path.islink(path) and os.path.realpath(path) in claimed:
                repeated.append(Path(path))
                continue
            claimed.add(os.path.realpath(path))
            through_link[path] = through_link[top] or os.path.islink(path)
            kept.append(name)
        folders[:] = kept
        for name in names:
            path = Path(top, name)
            if not name.endswith(".parquet"):
                continue
            if not path.exists():
                raise MEDSFormatError(f"{path}: a symbolic link to {os.readlink(path)}, "
                                      "which does not exist")
            linked = through_link[top] or path.is_symlink()
            by_target.setdefault(os.path.realpath(path), []).append((linked, path))
    files = []
    for names in by_target.values():
        first, *others = sorted(names)
        files.append(first[1])
        repeated += [path for _, path in others]
    return FoundFiles(sorted(files), sorted(repeated))


def find_data_files(meds_dir: str | Path) -> FoundFiles:
    """The `data/**/*.parquet` shards of a MEDS root (`find_parquet_files`); a missing root or
    no shard raises MEDSFormatError."""
    data = Path(meds_dir) / "data"
    if not Path(meds_dir).is_dir():
        raise MEDSFormatError(f"{meds_dir}: no such folder (config.data.meds_dir, the MEDS root "
                              "holding data/ and metadata/)")
    found = find_parquet_files(data) if data.is_dir() else FoundFiles([], [])
    if not found.files:
        raise MEDSFormatError(f"{data}: no *.parquet files found (is this a MEDS root?)")
    return found


def data_files(meds_dir: str | Path) -> list[Path]:
    """All `data/**/*.parquet` shards under the MEDS root, sorted by path, linked folders
    followed (`find_data_files`)."""
    return find_data_files(meds_dir).files


def read_subject_splits(meds_dir: str | Path) -> dict[int, str]:
    """{subject_id: split} from metadata/subject_splits.parquet (MEDS 0.3:
    patient_splits.parquet with patient_id), else from the data/<split>/ folder names."""
    meta = Path(meds_dir) / "metadata"
    path = next((p for p in (meta / "subject_splits.parquet", meta / "patient_splits.parquet")
                 if p.exists()), None)
    if path is None:
        return _splits_from_folders(meds_dir)
    table = read_small_parquet(path)
    for col, ok in (("subject_id", pa.types.is_integer), ("split", _is_string)):
        if col not in table.column_names:
            raise MEDSFormatError(f"{path}: column {col!r} is missing "
                                  f"(has {table.column_names})")
        if not ok(table.schema.field(col).type):
            raise MEDSFormatError(f"{path}: column {col!r} has type {table.schema.field(col).type}")
    if table.column("subject_id").null_count or table.column("split").null_count:
        raise MEDSFormatError(f"{path}: columns subject_id/split contain nulls")
    ids = cast_column(path, "subject_id", table.column("subject_id"), pa.int64()).to_numpy()
    splits = table.column("split").cast(pa.string()).to_pylist()
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise MEDSFormatError(f"{path}: column split: unknown split names {unknown[:5]} "
                              f"(expected {list(SPLITS)})")
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
        if len(parts) < 2 or parts[0] not in SPLITS:
            raise MEDSFormatError(f"{f}: no metadata/subject_splits.parquet and the file is not "
                                  f"under a data/<split>/ folder ({'/'.join(SPLITS)}), so its "
                                  "split is unknown")
        for batch in shard_batches(f, columns=("subject_id",)):
            for i in pc.unique(batch["subject_id"]).to_pylist():
                if result.setdefault(i, parts[0]) != parts[0]:
                    raise MEDSFormatError(
                        f"{f}: column subject_id: a subject appears under two split folders")
    return result


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and _is_string(t.value_type))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)


# Each event column: its type check and what a message says is expected.
_COLUMN_CHECKS = {"subject_id": (pa.types.is_integer, "an integer type"),
                  "time": (pa.types.is_timestamp, "a timestamp, e.g. timestamp[us]"),
                  "code": (_is_string, "string, large_string or dictionary of strings"),
                  "numeric_value": (_is_number, "a float or integer type")}


def cast_column(path: Path, name: str, column, to_type: pa.DataType, safe: bool = True):
    """``column`` cast to ``to_type``; a value that does not fit raises MEDSFormatError naming
    the file, column and types but not the value (it may be a subject id)."""
    try:
        return column.cast(to_type, safe=safe)
    except pa.ArrowInvalid:
        raise MEDSFormatError(f"{path}: column {name}: a value of type {column.type} does not "
                              f"fit {to_type} (out of range or not exact)") from None


def whole_microseconds(column, round_up: bool):
    """Timestamp ``column`` with a finer time than MEDS's microsecond rounded to one, up
    (``round_up``: event times) or down (prediction times), so an event after a prediction
    time never compares at or before it; same type, so an exact cast to microseconds follows.
    A zone-aware column is rounded as UTC instants."""
    if not pa.types.is_timestamp(column.type) or column.type.unit != "ns":
        return column
    instants = column.cast(pa.timestamp("ns"))  # UTC: local time repeats an hour in autumn
    rounded = (pc.ceil_temporal if round_up else pc.floor_temporal)(instants, unit="microsecond")
    return rounded.cast(column.type)


@contextlib.contextmanager
def _reading(path: Path, what: str = "file"):
    """Turns an Arrow or OS error inside the block into MEDSFormatError naming ``path``:
    ``unreadable parquet <what> (<the error in one line>)``."""
    try:
        yield
    except (pa.ArrowException, OSError) as error:
        raise MEDSFormatError(f"{path}: unreadable parquet {what} ({_one_line(error)})") from error


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def read_small_parquet(path: Path) -> pa.Table:
    """A whole (small) metadata or label file, MEDS 0.3 patient_id renamed to subject_id;
    unreadable files raise MEDSFormatError."""
    with _reading(path):
        table = read_parquet_file(path)
    names = table.column_names
    if "subject_id" not in names and "patient_id" in names:
        table = table.rename_columns(["subject_id" if n == "patient_id" else n for n in names])
    return table


def read_parquet_file(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file's table: read as a file (``pq.read_table`` would import
    ``pyarrow.dataset``, 0.3 s of every preparation's start)."""
    with pq.ParquetFile(path) as parquet:
        return parquet.read(columns=columns)


def time_zone(path: Path, column: str = "time") -> str | None:
    """The time zone of a parquet file's timestamp `column`; None when it has none (naive:
    MEDS's local wall time) or is not a timestamp. Unreadable files raise MEDSFormatError."""
    with _reading(path):
        schema = pq.read_schema(path)
    kind = schema.field(column).type if column in schema.names else None
    return kind.tz if kind is not None and pa.types.is_timestamp(kind) else None


def shard_batches(path: Path, columns=EVENT_COLUMNS) -> Iterator[pa.Table]:
    """Streams one data shard as tables of at most ``SHARD_BATCH_ROWS`` rows, row group by row
    group; the file is closed when the stream ends, fails or is closed.

    Returns `columns` (a subset of EVENT_COLUMNS) validated and cast to EVENT_SCHEMA's types
    (MEDS 0.3 patient_id is read as subject_id; codes may be string, large_string or dictionary;
    values any float or integer type; a zone-aware time as its UTC instant). Bad files raise
    MEDSFormatError naming file and column.
    """
    with _reading(path):
        file = pq.ParquetFile(path)
    with file:
        with _reading(path):
            schema = file.schema_arrow
        source = _source_columns(path, schema, columns)
        batches = file.iter_batches(batch_size=SHARD_BATCH_ROWS,
                                    columns=[source[c] for c in columns])
        while True:
            with _reading(path, "data"):
                batch = next(batches, None)
            if batch is None:
                return
            yield _cast_batch(path, batch, columns)


def _source_columns(path: Path, schema: pa.Schema, columns) -> dict[str, str]:
    """{column: the name in ``path``'s ``schema`` for it} (MEDS 0.3's patient_id for
    subject_id); a missing or mistyped column raises MEDSFormatError."""
    source = {c: c for c in columns}
    if "subject_id" not in schema.names and "patient_id" in schema.names:
        source["subject_id"] = "patient_id"
    for col in columns:
        name = source[col]
        if name not in schema.names:
            raise MEDSFormatError(f"{path}: column {col!r} is missing (has {schema.names})")
        ok, expected = _COLUMN_CHECKS[col]
        if not ok(schema.field(name).type):
            raise MEDSFormatError(f"{path}: column {col!r} has unsupported type "
                                  f"{schema.field(name).type}; expected {expected}")
    return source


def _cast_batch(path: Path, batch: pa.RecordBatch, columns) -> pa.Table:
    for col in ("subject_id", "code"):
        if col in columns and batch.column(columns.index(col)).null_count:
            raise MEDSFormatError(f"{path}: column {col} contains nulls")
    fields = [EVENT_SCHEMA.field(c) for c in columns]
    raw = [whole_microseconds(batch.column(i), round_up=True) if f.name == "time"
           else batch.column(i) for i, f in enumerate(fields)]
    arrays = [cast_column(path, f.name, column, f.type) for column, f in zip(raw, fields)]
    if "code" in columns:
        try:  # parquet readers pass string bytes through; Python's decoding fails much later
            arrays[columns.index("code")].validate(full=True)
        except pa.ArrowInvalid:
            raise MEDSFormatError(f"{path}: column code: a value is not valid UTF-8 text (MEDS "
                                  "codes are UTF-8 strings; re-export the file as UTF-8)") from None
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def numeric_rows(t: pa.Table, drop_values=()) -> tuple[pa.Table, dict[str, int]]:
    """The rows of `t` with a time and a finite numeric value not in `drop_values`, and counts
    of the others (null_time, null_value, nonfinite_value, dropped_value; each row counted
    once, in that order)."""
    timed = _flags(pc.is_valid(t["time"]))
    valued = timed & _flags(pc.is_valid(t["numeric_value"]))
    finite = valued & _flags(pc.is_finite(t["numeric_value"]))  # null -> False
    kept = finite
    if len(drop_values):
        kept = finite & ~_flags(pc.is_in(t["numeric_value"], pa.array(drop_values, pa.float64())))
    dropped = {"null_time": int((~timed).sum()), "null_value": int((timed & ~valued).sum()),
               "nonfinite_value": int((valued & ~finite).sum()),
               "dropped_value": int((finite & ~kept).sum())}
    return (t if kept.all() else t.filter(pa.array(kept))), dropped


def _flags(mask) -> np.ndarray:
    """A boolean Arrow array or chunked array as bool [n], nulls as False (one filter of the
    table at the end instead of one per condition: each filter copies every column)."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False).astype(bool)


def death_times(t: pa.Table) -> pa.Table:
    """(subject_id, time) of the timed MEDS_DEATH rows of `t`."""
    deaths = t.filter(pc.equal(t["code"], "MEDS_DEATH")).select(["subject_id", "time"])
    return deaths.filter(pc.is_valid(deaths["time"]))


def by_subject_and_time(table: pa.Table) -> pa.Table:
    """``table`` sorted stably by (subject_id, time)."""
    return table.take(pc.sort_indices(
        table, [("subject_id", "ascending"), ("time", "ascending")]))


def value_groups(events: pa.Table) -> pa.Table:
    """``events`` grouped by (subject_id, time, numeric_value): each group's
    rows (``code_count``) and distinct codes (``code_distinct``), from which `duplicates_in`
    and `mirrored_values` count (one hash aggregation for both)."""
    return events.group_by(["subject_id", "time", "numeric_value"]).aggregate(
        [("code", "count"), ("code", "distinct")])


def duplicates_in(groups: pa.Table) -> int:
    """Rows that repeat an earlier row exactly (subject, time, code, value), from
    `value_groups`: within a group, the rows beyond one per distinct code."""
    rows = pc.sum(groups["code_count"]).as_py() or 0
    return int(rows - (pc.sum(pc.list_value_length(groups["code_distinct"])).as_py() or 0))


def mirrored_values(groups: pa.Table) -> collections.Counter:
    """(code, other code) -> number of (subject, time, value) of ``code`` that ``other code``
    also has, from `value_groups`: a value one code copies from another (MIMIC-IV's ICU chart
    items copy hospital lab results), which a model can read off the copy when one of them is
    masked. Counted per (subject, time, value) group, in both directions."""
    groups = groups["code_distinct"].combine_chunks()
    sizes = pc.list_value_length(groups).to_numpy(zero_copy_only=False)
    pairs: collections.Counter = collections.Counter()
    two = pc.dictionary_encode(pc.list_flatten(groups.filter(pa.array(sizes == 2))))
    index = two.indices.to_numpy(zero_copy_only=False).reshape(-1, 2)  # vectorized: most groups
    if len(index):
        names = two.dictionary.to_pylist()
        found, counts = np.unique(np.concatenate([index, index[:, ::-1]]), axis=0,
                                  return_counts=True)
        pairs.update({(names[a], names[b]): int(n) for (a, b), n in zip(found, counts)})
    for codes in groups.filter(pa.array(sizes > 2)).to_pylist():
        for a, b in itertools.permutations(codes, 2):
            pairs[a, b] += 1
    return pairs


def count_after_death(events: pa.Table, deaths: pa.Table) -> int:
    """Rows of `events` later than their subject's first death in `deaths` (subject_id, time)."""
    if not deaths.num_rows or not events.num_rows:
        return 0
    first = deaths.group_by("subject_id").aggregate([("time", "min")])
    joined = events.select(["subject_id", "time"]).join(first, "subject_id", join_type="inner")
    return _count(pc.greater(joined["time"], joined["time_min"]))


def _count(mask) -> int:
    return int(pc.sum(mask).as_py() or 0)


def select_lab_codes(counts: Mapping[str, int], data_config,
                     report: dict | None = None) -> list[str]:
    """Lab codes to model, most frequent first, from `counts`: {code: numeric train rows}.

    `data_config.lab_codes` (non-empty) is taken as given, in its order; every code must have
    numeric train rows. Otherwise: codes matching `lab_code_pattern` (re.search) with at least
    `min_code_count` numeric train rows, the `top_k` most frequent (ties by code; top_k <= 0
    keeps all). `report`, when given, receives counts of the selection, `by_prefix` included.

    Any numeric code can be selected: `^LAB//` models labs only, `^(LAB|VITAL|STATIC)//` labs,
    vital signs and static descriptors alike. Static rows with a null time are left out by
    `numeric_rows` (counted as null_time): a window holds timed events only.
    """
    explicit = tuple(config_get(data_config, "lab_codes") or ())
    report = {} if report is None else report
    if explicit:
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"config.data.lab_codes lists a code twice: {explicit}")
        missing = [c for c in explicit if c not in counts]
        if missing:
            raise MEDSFormatError(f"data/ (train split), column code: {len(missing)} requested "
                                  f"lab_codes have no numeric train rows: {missing[:10]}")
        report.update(selection="explicit", selected=len(explicit),
                      by_prefix=code_prefix_counts(explicit))
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
        prefixes = ", ".join(f"{p} {n}" for p, n in code_prefix_counts(counts).items())
        raise MEDSFormatError(f"data/ (train split), column code: no code with numeric values "
                              f"matches config.data.lab_code_pattern={pattern!r} with >= "
                              f"{min_count} rows (config.data.min_code_count; {len(matching)} "
                              f"match with fewer rows); the {len(counts)} codes with numeric "
                              f"train values by prefix: {prefixes or 'none'}")
    below = sorted(c for c, n in matching.items() if n < min_count)
    report.update(selection="pattern", matching=len(matching), below_min_count=len(below),
                  selected=len(selected), by_prefix=code_prefix_counts(selected))
    if below:
        report["below_min_count_codes"] = below[:20]
    return selected


def code_prefix_counts(codes) -> dict[str, int]:
    """{prefix: number of codes} by each code's first `//` part (`LAB//K` -> `LAB`; a code
    without `//` is its own prefix), prefixes sorted."""
    return dict(sorted(collections.Counter(code.split("//")[0] for code in codes).items()))


def code_unit(code: str) -> str:
    """The unit of a lab code: its last `//` part (`LAB//50983//mEq/L` -> `mEq/L`), else ''."""
    parts = code.split("//")
    return parts[-1].strip() if len(parts) > 2 else ""
