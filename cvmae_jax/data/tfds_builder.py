"""TFDS builder writing MEDS lab windows as array_record files (no TensorFlow needed).

The MEDS root is the builder's manual_dir. The config name carries a short hash of every
setting that changes the data and of the MEDS files' identity, so other settings build another
dataset. The builder writes from a `Plan` (codes, train stats, counts; see plan.py) set as
`builder.plan` before `download_and_prepare`; it turns each split shard by shard into records
(by `builder.pool`, a ShardPool: in this process or several, each writing its shards' records
once the split's earlier shards are counted; or a BeamPool; records a worker returned unwritten
this process writes), one array_record file per MEDS shard, in example_id order
(array_record_writer.py: no shuffle buffer), and writes `data_stats.json`,
`prepare_report.json` and `prepare_report.md` next to the tfds files. Everything goes to tfds's
temporary folder, renamed to the version folder only once complete.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Iterator
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.dataset_builder import FileReaderBuilder

from cvmae_jax.data import meds, report as report_lib, sequences
from cvmae_jax.data.array_record_writer import finish_split, part_path
from cvmae_jax.data.meds_identity import meds_identity
from cvmae_jax.data.plan import Plan
from cvmae_jax.data.shard_pool import ShardPool
from cvmae_jax.data.window_records import (ShardTask, ShardWindows,
                                           write_numbered, write_shard_windows)
from cvmae_jax.jsonio import write_json_atomic

STATS_FILE = "data_stats.json"
REPORT_FILE = "prepare_report.json"
REPORT_MD_FILE = "prepare_report.md"
LENGTHS_FILE = "window_lengths-{split}.npy"  # events per window, int32 [examples]: packing
# plans rows from them without reading the windows
_SETTINGS = ("lab_code_pattern", "lab_codes", "top_k", "min_code_count", "min_subjects",
             "clip_quantiles", "drop_values",
             "max_len", "window", "min_window_len")


@dataclasses.dataclass
class MedsLabConfig(tfds.core.BuilderConfig):
    """Builder settings; build with `MedsLabConfig.create(data_config, meds_dir)`."""
    meds_dir: str = ""
    lab_code_pattern: str = r"^LAB//"
    lab_codes: tuple[str, ...] = ()
    top_k: int = 100
    min_code_count: int = 20
    min_subjects: int = 10
    clip_quantiles: tuple[float, float] = (0.001, 0.999)
    drop_values: tuple[float, ...] = ()
    max_len: int = 256
    window: str = "chunks"
    min_window_len: int = 2

    @classmethod
    def create(cls, data_config: Any, meds_dir: str | Path | None = None) -> MedsLabConfig:
        """Settings from `config.data`; name: `<window><max_len>_<hash of settings + MEDS>`."""
        meds_dir = meds_dir or meds.config_get(data_config, "meds_dir")
        if not meds_dir:
            raise ValueError("no MEDS root: pass meds_dir or set config.data.meds_dir")
        meds_dir = Path(meds_dir).resolve()
        s = {k: meds.config_get(data_config, k) for k in _SETTINGS}
        s["lab_codes"] = tuple(s["lab_codes"] or ())
        s["clip_quantiles"] = tuple(float(q) for q in s["clip_quantiles"])
        s["drop_values"] = drop_values(s["drop_values"])
        for k in ("top_k", "min_code_count", "min_subjects", "max_len", "min_window_len"):
            s[k] = int(s[k])
        if s["min_subjects"] < 1:
            raise ValueError(f"config.data.min_subjects must be >= 1, got {s['min_subjects']}")
        if s["window"] not in sequences.WINDOWS:
            raise ValueError(f"config.data.window must be one of {sequences.WINDOWS}, "
                             f"got {s['window']!r}")
        key = json.dumps({**s, "meds": meds_identity(meds_dir)}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return cls(name=f'{s["window"]}{s["max_len"]}_{digest}', meds_dir=str(meds_dir),
                   description=json.dumps(s, sort_keys=True), **s)

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in _SETTINGS}


def drop_values(values) -> tuple[float, ...]:
    """config.data.drop_values as sorted distinct floats; ValueError unless each is a finite
    number."""
    try:
        floats = [float(v) for v in (values or ())]
    except (TypeError, ValueError):
        floats = [float("nan")]
    if not all(np.isfinite(floats)):
        raise ValueError(f"config.data.drop_values must be finite numbers (raw values to leave "
                         f"out, e.g. (99999.0,)), got {values!r}")
    return tuple(sorted(set(floats)))


@functools.cache
def lab_features() -> tfds.features.FeaturesDict:
    """The dataset's features: one record per window (`example_proto.serialize` writes them)."""
    vector = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
    return tfds.features.FeaturesDict({
        "example_id": tfds.features.Scalar(np.int64),
        "subject_id": tfds.features.Scalar(np.int64),
        "start_time_us": tfds.features.Scalar(np.int64),
        "end_time_us": tfds.features.Scalar(np.int64),
        "times": vector(np.float32),
        "codes": vector(np.int32),
        "values": vector(np.float32),
    })


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """The info of a dataset built here from local files: there is no public metadata to fetch
    from tfds's bucket (tfds's attempt leaves an empty temporary folder behind each time)."""

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch."""


class MedsLabSequences(FileReaderBuilder):
    """Windows of (time, code, value) lab triplets per subject, one record per window, each split
    in example_id order over one file per MEDS shard that has windows."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial format.",
                     "1.1.0": "data_stats.json holds each code's within-subject CV."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the MEDS root as download_config.manual_dir."

    def _log_download_bytes(self) -> None:
        """Silent: tfds prints "Downloading and preparing dataset Unknown size" here, though
        nothing is downloaded; prepare_dataset logs the build."""

    def _log_download_done(self) -> None:
        """Silent, as above."""

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description="MEDS lab windows for the CV-Masking value-only MAE.",
            features=lab_features(),
            disable_shuffling=True,  # records stay in example_id order
        )

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        """Writes every split and the stats and report files into self.data_dir (tfds's
        temporary folder here) and sets the split infos that tfds then writes."""
        plan: Plan = self.plan  # set by prepare_dataset, which read and checked the MEDS root
        # and set self.log (its progress lines' destination) and self.pool (may be unset)
        data_dir = Path(self.data_dir)
        plan.stats.save_json(data_dir / STATS_FILE, extra={"description": plan.descriptions})
        cfg: MedsLabConfig = self.builder_config
        pool = getattr(self, "pool", None) or ShardPool()
        write = functools.partial(
            write_shard_windows, offsets=pool.offsets(),
            lookup=plan.lookup, stats=plan.stats, max_len=cfg.max_len, window=cfg.window,
            min_window_len=cfg.min_window_len)
        tasks = {split: [ShardTask(split, path, i, part_path(self._get_filename_template(split), i))
                         for i, path in enumerate(plan.scan.shards[split])]
                 for split in meds.SPLITS}
        # one map over every split's shards: a split's last shards and the next split's first
        # are prepared together
        shards = pool.map(write, [task for split in meds.SPLITS for task in tasks[split]])
        try:
            split_infos = [self._write_split(plan, split, tasks[split], shards, self.log)
                           for split in meds.SPLITS]
        except BaseException:
            pool.close()  # the workers stop writing before tfds removes its temporary folder
            raise
        self.info.set_splits(tfds.core.SplitDict(split_infos))
        write_json_atomic(data_dir / REPORT_FILE, plan.report)
        (data_dir / REPORT_MD_FILE).write_text(report_lib.markdown(plan.report))

    def _write_split(self, plan: Plan, split: str, tasks: list[ShardTask],
                     shards: Iterator[ShardWindows], log) -> tfds.core.SplitInfo:
        """Finishes one split (`tasks`: its shards), taking their ShardWindows from `shards`
        and writing the records a worker returned unwritten (a Beam worker's; a local worker's
        shard finished before an earlier one); adds its counts to plan.report and ``log``s
        them."""
        cfg: MedsLabConfig = self.builder_config
        lab, windows, mirrored, lengths = {}, {}, collections.Counter(), []
        first = 0  # the example_id of the shard's first record
        for task, shard in zip(tasks, itertools.islice(shards, len(tasks))):
            write_numbered(shard, first, task.part)
            first += len(shard.lengths)
            mirrored.update(shard.mirrored)
            lengths.append(shard.lengths)
            _add(lab, shard.lab)
            _add(windows, shard.windows)
        if not windows.get("examples"):
            raise meds.MEDSFormatError(
                f"{plan.meds_dir}/data, split {split!r}: no window with "
                f">= {cfg.min_window_len} events of the selected lab codes")
        info = finish_split(self._get_filename_template(split), [len(s) for s in lengths])
        np.save(Path(self.data_dir) / LENGTHS_FILE.format(split=split), np.concatenate(lengths))
        plan.report["splits"][split].update(lab=lab, windows=windows)
        if split == "train":
            rows = plan.report["mirrored_codes"] = report_lib.mirrored_codes(mirrored, plan.stats)
            for w in report_lib.mirrored_warning(rows, plan.stats.vocab_size):
                plan.report["warnings"].append(w)
                log(f"[prepare] WARNING: {w}")
        log(f'[prepare] {split}: {windows["examples"]:,} examples, {windows["tokens"]:,} '
              f'tokens from {lab["lab_events"]:,} selected events, {info.num_shards} shard(s)')
        return info


def _add(total: dict, counts: dict) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + int(v)
