"""Everything decided before anything is written: splits, the scan of every shard, the lab
selection, the train statistics and the report skeleton. Bad input fails here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from cvmae_jax.data import code_names, meds, report as report_lib
from cvmae_jax.data.disclosure import selectable_counts
from cvmae_jax.data.shard_pool import ShardPool
from cvmae_jax.data.stats import RESERVOIR_SIZE, DataStats, finish_stats
from cvmae_jax.data.stream import Scan, SplitLookup, sample_train_values, scan_meds


@dataclasses.dataclass
class Plan:
    """What the builder writes from: the split lookup, the scan, the stats and the report
    (per split counts so far; the builder adds `lab` and `windows` counts per split)."""
    meds_dir: Path
    lookup: SplitLookup
    scan: Scan
    stats: DataStats
    report: dict
    descriptions: tuple[str | None, ...]  # of stats.codes, from metadata/codes.parquet


def plan_dataset(meds_dir: str | Path, settings: dict, log: Callable[[str], None] = print,
                 reservoir_size: int = RESERVOIR_SIZE, pool: ShardPool | None = None) -> Plan:
    """Reads the MEDS root (two streaming passes over train, one over the rest; shards read by
    `pool`, default this process) and decides the codes and statistics. `settings` holds the
    data settings (see MedsLabConfig.settings)."""
    meds_dir = Path(meds_dir)
    subject_splits = meds.read_subject_splits(meds_dir)
    source = meds_dir / "metadata/subject_splits.parquet"
    if not source.exists():
        source = meds_dir / "data/<split>/ folders"
    for split in meds.SPLITS:
        if split not in subject_splits.values():
            raise meds.MEDSFormatError(f"{source}, column split: split {split!r} has no subjects")
    lookup = SplitLookup(subject_splits)
    drop = settings.get("drop_values", ())
    scan = scan_meds(meds_dir, lookup, log, drop, pool)
    selection: dict = {}
    train_counts = scan.moments.counts()
    codes = meds.select_lab_codes(selectable_counts(
        train_counts, scan.moments.subject_counts(), settings, selection), settings,
        report=selection)
    log(f"[prepare] lab codes: selected {selection['selected']} ({selection['selection']})")
    reservoirs = sample_train_values(scan.shards["train"], lookup, codes, reservoir_size,
                                     log=log, drop_values=drop, pool=pool)
    stats = finish_stats(codes, scan.moments, reservoirs, settings["clip_quantiles"], drop,
                         settings["min_subjects"])
    descriptions = code_names.read_descriptions(meds_dir, stats.codes)
    splits = {s: dict(scan.splits[s]) for s in meds.SPLITS}
    for s in meds.SPLITS[1:]:
        splits[s]["out_of_vocab"] = report_lib.out_of_vocab(
            scan.code_counts[s], train_counts, codes, settings["lab_code_pattern"])
    squeezed = report_lib.squeezed_codes(stats, reservoirs, settings["min_subjects"])
    clipped, by_quantiles = report_lib.clipped_shares(stats, reservoirs,
                                                      settings["clip_quantiles"])
    warnings = (report_lib.warnings_for(stats)
                + report_lib.squeezed_warning(squeezed, stats.vocab_size)
                + report_lib.clipped_warning(stats, clipped, by_quantiles,
                                             settings["min_subjects"]))
    for w in warnings:
        log(f"[prepare] WARNING: {w}")
    report = dict(settings=settings, selection=selection, splits=splits,
                  rows_without_split=scan.rows_without_split, shards=scan.num_shards,
                  reservoir_size=reservoir_size,
                  codes=report_lib.code_rows(stats, descriptions, clipped),
                  squeezed_codes=squeezed,
                  warnings=scan.warnings + warnings, files=scan.files,
                  repeated_links=scan.repeated_links)
    return Plan(meds_dir, lookup, scan, stats, report, descriptions)
