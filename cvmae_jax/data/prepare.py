"""Build (or reuse) the TFDS dataset of a MEDS root and describe it as a `PreparedDataset`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cvmae_jax.data import code_names, meds
from cvmae_jax.data.plan import plan_dataset
from cvmae_jax.data.records import LabRecords
from cvmae_jax.data.shard_pool import ShardPool
from cvmae_jax.data.stats import DataStats
from cvmae_jax.data.tfds_builder import (LENGTHS_FILE, REPORT_FILE, REPORT_MD_FILE, STATS_FILE,
                                         MedsLabConfig, MedsLabSequences)
from cvmae_jax.jsonio import check_writable


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset: `tfds.data_source(builder_name, data_dir=data_dir)` reads it.

    path: the builder's version folder (array_record files, data_stats.json,
    prepare_report.json, prepare_report.md, window_lengths-<split>.npy). report: the counts
    written while preparing (no subject ids).
    """
    path: str
    data_dir: str
    builder_name: str  # '<name>/<config>:<version>'
    stats: DataStats
    num_examples: dict[str, int]
    num_tokens: dict[str, int]
    max_len: int
    report: dict
    descriptions: tuple[str | None, ...]  # of stats.codes (metadata/codes.parquet), None: none
    built: bool = False  # True when `prepare_dataset` built it (not reused, nor another job's)

    @property
    def lab_names(self) -> tuple[str, ...]:
        """Readable name of each of ``stats.codes`` (``code_names.lab_name``)."""
        return code_names.lab_names(self.stats.codes, self.descriptions)

    @property
    def report_path(self) -> str:
        """The readable preparation report: counts, warnings and every code's statistics."""
        return str(Path(self.path) / REPORT_MD_FILE)

    @property
    def settings_id(self) -> str:
        """The config folder's name, ``<window><max_len>_<hash of settings and MEDS files>``:
        equal for two preparations of the same files with the same settings."""
        return Path(self.path).parent.name

    def window_lengths(self, split: str) -> np.ndarray:
        """Events in each window of `split`, int32 [examples]: prepare's window_lengths file,
        or (a dataset without it) counted by reading every record."""
        path = Path(self.path) / LENGTHS_FILE.format(split=split)
        if path.exists():
            return np.load(path)
        source = self.data_source(split)
        return np.array([len(source[i]["codes"]) for i in range(len(source))], np.int32)

    def data_source(self, split: str) -> LabRecords:
        """Random-access source of `split`: len() and [i] -> dict of times, codes, values
        (numpy [n]) and example_id; the files ``tfds.data_source`` reads, decoded faster."""
        return LabRecords(self.path, split)


def dataset_id(data_config: Any, meds_dir: str | Path | None) -> str:
    """The ``settings_id`` that ``prepare_dataset`` gives these settings and MEDS files,
    without preparing anything."""
    return MedsLabConfig.create(data_config, meds_dir).name


def prepare_dataset(data_config: Any, meds_dir: str | Path | None, data_dir: str | Path,
                    log: Callable[[str], None] = print, pool=None) -> PreparedDataset:
    """Builds the dataset under `data_dir` unless one with the same settings and MEDS files
    exists (then reuses it). `meds_dir` overrides `data_config.meds_dir` when given.

    The MEDS root is streamed (see stream.py) and fully checked before anything is written; the
    records are streamed to array_record shards (see tfds_builder.py) in tfds's temporary folder,
    the MEDS shards read by `data_config.prepare_workers` processes, or by `pool` when given (a
    `ShardPool` already started, or a `beam_pool.BeamPool`: a Beam pipeline; the files written
    are the same bytes in every case; closed when the build ends),
    renamed to the version folder when complete, and the folders this call created are removed
    on failure while empty, so bad input or an interrupted build leaves nothing behind and
    another process's build in the same data_dir (finished or not) stays."""
    start = time.perf_counter()
    config = MedsLabConfig.create(data_config, meds_dir)
    builder = MedsLabSequences(config=config, data_dir=str(data_dir), file_format="array_record")
    built = False
    if builder.data_path.exists():
        log(f"[prepare] reusing {builder.data_path}")
    else:
        check_writable(data_dir, "the prepared dataset is written there (config.data.data_dir)")
        shards = pool or ShardPool(meds.config_get(data_config, "prepare_workers"))
        log(f"[prepare] building {builder.data_path} ({shards})")
        _note_unfinished_builds(builder.data_path, log)
        created = _missing_parents(builder.data_path, Path(data_dir))
        try:
            with shards:
                builder.plan = plan_dataset(config.meds_dir, config.settings(), log, pool=shards)
                builder.log, builder.pool = log, shards
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=config.meds_dir))
            built = True
        except BaseException as error:
            if builder.data_path.exists() and isinstance(error, OSError):
                pass  # another process finished the same build first
            else:  # tfds removed this build's incomplete.* folder; builds of others stay
                for folder in created:  # deepest first; only the ones this call created
                    with contextlib.suppress(OSError):  # not empty: another build's
                        folder.rmdir()
                raise
    prepared = dataclasses.replace(load_prepared(builder.data_path), built=built)
    log(f"[prepare] done in {time.perf_counter() - start:.1f}s: "
        f"{len(prepared.stats.codes)} codes, examples {prepared.num_examples}, "
        f"tokens {prepared.num_tokens}")
    return prepared


def _note_unfinished_builds(data_path: Path, log: Callable[[str], None]) -> None:
    """Logs the unfinished builds of the same dataset (tfds's ``incomplete.*`` folders beside
    the version folder), which a build killed with ``kill -9`` leaves: their disk space is
    not reclaimed by anything but their deletion."""
    unfinished = sorted(data_path.parent.glob(
        f"{tfds.core.constants.INCOMPLETE_PREFIX}*_{data_path.name}"))
    if unfinished:
        log(f"[prepare] {len(unfinished)} unfinished build(s) of this dataset in "
            f"{data_path.parent} ({', '.join(p.name for p in unfinished)}): left by a preparation "
            "that was killed, or being written by one running now; delete them once none runs")


def _missing_parents(path: Path, data_dir: Path) -> list[Path]:
    """The folders from data_dir down to the parent of `path`, and tfds's data_dir/downloads
    and downloads/extracted, that do not exist yet, deepest first (an existing data_dir itself
    is never listed)."""
    folders = [p for p in reversed(path.relative_to(data_dir).parents) if str(p) != "."]
    downloads = data_dir / "downloads"
    candidates = [data_dir, downloads, downloads / "extracted"] + [data_dir / p for p in folders]
    return [p for p in reversed(candidates) if not p.exists()]


def load_prepared(path: str | Path) -> PreparedDataset:
    """The `PreparedDataset` of a version folder written by `prepare_dataset`."""
    path = Path(path)
    if not (path / STATS_FILE).exists() or not (path / REPORT_FILE).exists():
        raise FileNotFoundError(f"{path}: not a prepared dataset (no {STATS_FILE} / {REPORT_FILE})")
    info = tfds.builder_from_directory(str(path)).info
    report = json.loads((path / REPORT_FILE).read_text())
    stats = json.loads((path / STATS_FILE).read_text())
    return PreparedDataset(
        path=str(path),
        data_dir=str(path.parents[2]),
        builder_name=f"{info.name}/{info.config_name}:{info.version}",
        stats=DataStats.from_dict(stats),
        num_examples={s: int(info.splits[s].num_examples) for s in meds.SPLITS},
        num_tokens={s: int(report["splits"][s]["windows"]["tokens"]) for s in meds.SPLITS},
        max_len=int(report["settings"]["max_len"]),
        report=report,
        descriptions=tuple(row.get("description") for row in stats["codes"]),
    )
