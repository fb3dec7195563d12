"""Streaming passes over the shards of a MEDS root, one row group at a time.

Memory is bounded by the number of subjects and codes and by one shard's selected lab rows, not
by the dataset: `scan_meds` (every shard: per-split counts, per-code train moments),
`sample_train_values` (train shards: reservoir samples of the selected codes), and
`shard_lab_events` (one split's selected lab events of one shard, sorted).

Each pass works shard by shard (`scan_shard`, `sample_shard`) and merges the shards' results in
shard order, so a `ShardPool` can compute them in several processes with the same result.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvmae_jax.data import meds
from cvmae_jax.data.shard_pool import ShardPool
from cvmae_jax.data.stats import CodeMoments, Reservoirs

_SPLIT_COUNTS = ("subjects", "subjects_with_rows", "rows", "events", "numeric_events",
                 "null_time", "null_value", "nonfinite_value", "dropped_value")


class SplitLookup:
    """Vectorized {subject_id: split} of `meds.read_subject_splits`."""

    def __init__(self, subject_splits: dict[int, str]):
        self.ids = np.array(sorted(subject_splits), np.int64)
        self.split = np.array([meds.SPLITS.index(subject_splits[i]) for i in self.ids.tolist()],
                              np.int64)

    def positions(self, subject_ids: np.ndarray) -> np.ndarray:
        """Index into `ids` of each subject [n], -1 where the subject has no split."""
        pos = np.minimum(np.searchsorted(self.ids, subject_ids), max(len(self.ids) - 1, 0))
        found = self.ids[pos] == subject_ids if len(self.ids) else np.zeros(len(subject_ids), bool)
        return np.where(found, pos, -1)

    def splits_of(self, subject_ids: np.ndarray) -> np.ndarray:
        """Split index (into meds.SPLITS) of each subject [n], -1 where it has none."""
        pos = self.positions(subject_ids)
        return np.where(pos >= 0, self.split[np.maximum(pos, 0)], -1)


@dataclasses.dataclass
class Scan:
    """What one pass over every shard found (counts only, no subject ids).

    splits: per split, the counts in _SPLIT_COUNTS. code_counts: per split, {code: timed finite
    numeric rows}. moments: train moments of every numeric code. shards: per split, the shards
    holding its subjects. rows_without_split: rows of subjects missing from the split list.
    files: every file read, [{file (under the MEDS root), rows, time_zone (None: naive)}];
    repeated_links: links under data/ to a folder or file already read (not read again);
    warnings: about what was read (files, time zones, subjects without rows).
    """
    splits: dict[str, dict[str, int]]
    code_counts: dict[str, dict[str, int]]
    moments: CodeMoments
    shards: dict[str, list[Path]]
    rows_without_split: int
    num_shards: int
    seconds: float
    files: list[dict]
    repeated_links: list[str]
    warnings: list[str]


@dataclasses.dataclass
class ShardScan:
    """Pass 1 over one shard: per split counts (_SPLIT_COUNTS), per split {code: count} but
    train's, train moments (shard ended), the positions into SplitLookup.ids of the subjects
    with rows here [k], the rows read and those of subjects without a split."""
    rows: int
    rows_without_split: int
    counts: dict[str, dict[str, int]]
    code_counts: dict[str, dict[str, int]]
    moments: CodeMoments
    subjects: np.ndarray


def scan_shard(path: Path, lookup: SplitLookup, drop_values=()) -> ShardScan:
    """Pass 1 over one shard (values in `drop_values` left out and counted)."""
    part = ShardScan(0, 0, {s: dict.fromkeys(_SPLIT_COUNTS, 0) for s in meds.SPLITS},
                     {s: {} for s in meds.SPLITS[1:]}, CodeMoments(), np.zeros(0, np.int64))
    in_shard = np.zeros(len(lookup.ids), bool)
    for batch in meds.shard_batches(path):
        part.rows += batch.num_rows
        pos = lookup.positions(batch["subject_id"].to_numpy())
        part.rows_without_split += int((pos < 0).sum())
        in_shard[pos[pos >= 0]] = True
        split_idx = np.where(pos >= 0, lookup.split[np.maximum(pos, 0)], -1)
        for s, name in enumerate(meds.SPLITS):
            mask = split_idx == s
            if mask.any():
                _count_split(batch.filter(mask), name, part.counts[name], part.code_counts,
                             part.moments, drop_values)
    part.moments.end_shard()
    part.subjects = np.flatnonzero(in_shard)
    return part


def _progress(log, stage: str, k: int, files: list[Path], rows: int, done_bytes: int,
              total_bytes: int, start: float) -> None:
    elapsed = max(time.perf_counter() - start, 1e-9)
    eta = elapsed * (total_bytes - done_bytes) / max(done_bytes, 1)
    log(f"[prepare] {stage} shard {k + 1}/{len(files)}: {rows:,} rows so far, "
        f"{rows / elapsed:,.0f} rows/s, ETA {eta:.0f}s")


def scan_meds(meds_dir: str | Path, lookup: SplitLookup,
              log: Callable[[str], None] = print, drop_values=(),
              pool: ShardPool | None = None) -> Scan:
    """Pass 1 over every row (values in `drop_values` left out and counted), shards computed by
    `pool` (default: this process). Refuses (MEDSFormatError) a subject whose rows span two
    shards and a dataset without rows."""
    start = time.perf_counter()
    found = meds.find_data_files(meds_dir)
    files = found.files
    read = [dict(file=str(f.relative_to(meds_dir)), rows=0, time_zone=meds.time_zone(f))
            for f in files]
    sizes = np.cumsum([f.stat().st_size for f in files])
    counts = {s: dict.fromkeys(_SPLIT_COUNTS, 0) for s in meds.SPLITS}
    code_counts: dict[str, dict[str, int]] = {s: {} for s in meds.SPLITS[1:]}
    moments, shards = CodeMoments(), {s: [] for s in meds.SPLITS}
    seen = np.zeros(len(lookup.ids), bool)
    rows_without_split = total = 0
    parts = (pool or ShardPool()).map(
        functools.partial(scan_shard, lookup=lookup, drop_values=drop_values), files)
    for k, (path, part) in enumerate(zip(files, parts)):
        total += part.rows
        read[k]["rows"] = part.rows
        rows_without_split += part.rows_without_split
        in_shard = np.zeros(len(lookup.ids), bool)
        in_shard[part.subjects] = True
        for name in meds.SPLITS:
            _add_counts(counts[name], part.counts[name])
        for name in meds.SPLITS[1:]:
            _add_counts(code_counts[name], part.code_counts[name])
        moments.merge(part.moments)
        if (in_shard & seen).any():
            raise meds.MEDSFormatError(
                f"{path}: column subject_id: {int((in_shard & seen).sum())} subjects also have "
                "rows in an earlier shard; MEDS keeps each subject's rows in one shard")
        seen |= in_shard
        for s, name in enumerate(meds.SPLITS):
            if (in_shard & (lookup.split == s)).any():
                shards[name].append(path)
        _progress(log, "scan", k, files, total, sizes[k], sizes[-1], start)
    if not total:
        raise meds.MEDSFormatError(f"{Path(meds_dir) / 'data'}: the data files hold no rows")
    for s, name in enumerate(meds.SPLITS):
        counts[name]["subjects"] = int((lookup.split == s).sum())
        counts[name]["subjects_with_rows"] = int((seen & (lookup.split == s)).sum())
    repeated = [str(p.relative_to(meds_dir)) for p in found.repeated_links]
    warnings = _what_was_read(read, repeated, counts, total, log)
    return Scan(counts, code_counts, moments, shards, rows_without_split, len(files),
                time.perf_counter() - start, read, repeated, warnings)


def _add_counts(total: dict, counts: dict) -> None:
    for key, n in counts.items():
        total[key] = total.get(key, 0) + n


def _what_was_read(files: list[dict], repeated: list[str], counts: dict, rows: int,
                   log: Callable[[str], None]) -> list[str]:
    """Logs the files read, their time zones, the links not followed again and the warnings
    (naive and zone-aware times mixed, listed subjects without rows), which it returns."""
    log(f"[prepare] read {len(files)} files under data/ ({rows:,} rows; each file's rows in "
        "prepare_report.md)")
    if repeated:
        log(f"[prepare] {len(repeated)} symbolic link(s) under data/ lead to a folder or file "
            f"already read and were not read again: {', '.join(repeated[:3])}"
            f"{', ...' if len(repeated) > 3 else ''}")
    zones = collections.Counter(f["time_zone"] for f in files if f["time_zone"])
    warnings = []
    if zones:
        named = ", ".join(f"{zone} in {n}" for zone, n in sorted(zones.items()))
        log(f"[prepare] column time carries a time zone ({named} of {len(files)} files): read "
            "as UTC instants, so durations and order are exact; naive times are read as they "
            "are (local wall time)")
        naive = len(files) - sum(zones.values())
        if naive:
            warnings.append(
                f"column time carries a time zone in {sum(zones.values())} of {len(files)} data "
                f"files ({named}) and none in {naive} (e.g. "
                f"{next(f['file'] for f in files if not f['time_zone'])}): eval.py refuses to "
                "compare label prediction times with both; give every file the same convention "
                "(see docs/data_problems.md, Time zones)")
    for split in meds.SPLITS:
        missing = counts[split]["subjects"] - counts[split]["subjects_with_rows"]
        if missing:
            warnings.append(
                f"{missing:,} of {counts[split]['subjects']:,} {split} subjects of the split "
                f"list have no rows in the {len(files)} files read under data/ (a shard "
                "missing or outside data/?); the counts are of the subjects read")
    for w in warnings:
        log(f"[prepare] WARNING: {w}")
    return warnings


def _count_split(t: pa.Table, split: str, counts: dict, code_counts: dict,
                 moments: CodeMoments, drop_values) -> None:
    counts["rows"] += t.num_rows
    counts["events"] += t.num_rows - t["time"].null_count
    t, dropped = meds.numeric_rows(t, drop_values)
    for key, n in dropped.items():
        counts[key] += n
    counts["numeric_events"] += t.num_rows
    if split == "train":
        moments.add(t["code"], t["numeric_value"].to_numpy(), t["subject_id"].to_numpy())
        return
    vc = pc.value_counts(t["code"])
    into = code_counts[split]
    for code, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        into[code] = into.get(code, 0) + n


def sample_train_values(shards: list[Path], lookup: SplitLookup, codes, size: int,
                        seed: int = 0, log: Callable[[str], None] = print,
                        drop_values=(), pool: ShardPool | None = None) -> Reservoirs:
    """Pass 2 over the train shards: a seeded reservoir sample of <= size values per code, with
    their subjects: one sample per shard (`sample_shard`, computed by `pool`), merged in shard
    order, each merge seeded by (seed, shard), so the sample does not depend on the pool."""
    start, total = time.perf_counter(), 0
    sizes = np.cumsum([f.stat().st_size for f in shards] or [0])
    codes = tuple(codes)
    reservoirs = Reservoirs(len(codes), size)
    parts = (pool or ShardPool()).map(functools.partial(
        sample_shard, lookup=lookup, codes=codes, size=size, seed=seed,
        drop_values=drop_values), list(enumerate(shards)))
    for k, (rows, part) in enumerate(parts):
        total += rows
        reservoirs.merge(part, np.random.default_rng([seed, 1, k]))
        _progress(log, "sample", k, shards, total, sizes[k], sizes[-1], start)
    return reservoirs


def sample_shard(shard: tuple[int, Path], lookup: SplitLookup, codes: tuple[str, ...],
                 size: int, seed: int = 0, drop_values=()) -> tuple[int, Reservoirs]:
    """Pass 2 over train shard (k, path): the rows read and a reservoir sample of <= size
    values per code (seeded by (seed, k)), with their subjects."""
    k, path = shard
    value_set = pa.array(list(codes), pa.string())
    reservoirs = Reservoirs(len(codes), size, [seed, 0, k])
    train, rows = meds.SPLITS.index("train"), 0
    for batch in meds.shard_batches(path):
        rows += batch.num_rows
        batch = batch.filter(lookup.splits_of(batch["subject_id"].to_numpy()) == train)
        batch, _ = meds.numeric_rows(batch, drop_values)
        idx = pc.index_in(batch["code"], value_set=value_set)
        keep = pc.is_valid(idx)
        reservoirs.add(idx.filter(keep).to_numpy().astype(np.int64),
                       batch["numeric_value"].filter(keep).to_numpy(),
                       batch["subject_id"].filter(keep).to_numpy())
    return rows, reservoirs


class ShardLabEvents(NamedTuple):
    """One split's selected lab events of one shard (`shard_lab_events`)."""

    events: pa.Table  # sorted stably by (subject_id, time)
    counts: dict[str, int]  # lab_events, unsorted_subjects, duplicate_rows, after_death_rows
    value_groups: pa.Table  # meds.value_groups(events): duplicates and mirrored values


def lab_events_by_shard(shards: list[Path], lookup: SplitLookup, split: str, codes,
                        drop_values=()) -> Iterator[pa.Table]:
    """The split's selected lab events of each shard in turn, sorted stably by (subject_id,
    time), without `shard_lab_events`'s counts (for readers that need only the events)."""
    for path in shards:
        events, _ = _split_lab_rows(path, lookup, split, codes, drop_values)
        yield meds.by_subject_and_time(events)


def shard_lab_events(path: Path, lookup: SplitLookup, split: str, codes,
                     drop_values=()) -> ShardLabEvents:
    """The split's timed finite rows of `codes` in one shard (values in `drop_values` left
    out), sorted stably by (subject_id, time), with counts: lab_events, unsorted_subjects (rows
    out of time order in the file, sorted here), duplicate_rows and after_death_rows (kept)."""
    table, deaths = _split_lab_rows(path, lookup, split, codes, drop_values)
    subjects = table["subject_id"].to_numpy()
    by_subject = np.argsort(subjects, kind="stable")
    t_us = table["time"].cast(pa.int64()).to_numpy()[by_subject]
    same = np.diff(subjects[by_subject]) == 0
    unsorted = np.unique(subjects[by_subject][1:][same & (np.diff(t_us) < 0)])
    table = meds.by_subject_and_time(table)
    groups = meds.value_groups(table)
    return ShardLabEvents(table, dict(lab_events=table.num_rows, unsorted_subjects=len(unsorted),
                                      duplicate_rows=meds.duplicates_in(groups),
                                      after_death_rows=meds.count_after_death(table, deaths)),
                          groups)


def _split_lab_rows(path: Path, lookup: SplitLookup, split: str, codes,
                    drop_values=()) -> tuple[pa.Table, pa.Table]:
    """The split's timed finite rows of `codes` in one shard, in file order, and the
    (subject_id, time) of its subjects' timed MEDS_DEATH rows."""
    value_set = pa.array(list(codes), pa.string())
    s = meds.SPLITS.index(split)
    parts, deaths = [], []
    for batch in meds.shard_batches(path):
        batch = batch.filter(lookup.splits_of(batch["subject_id"].to_numpy()) == s)
        deaths.append(meds.death_times(batch))
        batch, _ = meds.numeric_rows(batch, drop_values)
        parts.append(batch.filter(pc.is_in(batch["code"], value_set)))
    table = pa.concat_tables(parts) if parts else meds.EVENT_SCHEMA.empty_table()
    deaths = pa.concat_tables(deaths) if deaths else table.select(["subject_id", "time"])
    return table, deaths
