"""One shard's windows as the dataset's serialized records, and their example ids.

A record is a serialized tf.train.Example with its features in key order
(`example_proto.serialize`): the same example gives the same bytes in every process, so the
files are reproducible byte for byte. Windows are numbered in order over a split (example_id
0, 1, ... across its shards), which a shard alone cannot know, so `shard_windows` numbers its
records from 0, and once the split's earlier shards are counted `renumbered` gives each its
split-wide number, rewriting only the example_id feature: the bytes are those serializing the
example with that id gives, so the shards can be serialized and written in parallel processes
(`write_shard_windows`).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np

from cvmae_jax.data import meds, sequences, stream
from cvmae_jax.data.array_record_writer import write_part
from cvmae_jax.data.example_proto import renumbered, serialize
from cvmae_jax.data.shard_pool import RecordOffsets
from cvmae_jax.data.stats import DataStats


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One MEDS shard to turn into records: its split, path, position among the split's
    shards and the array_record part file its records go to (`array_record_writer.part_path`)."""
    split: str
    path: Path
    index: int
    part: str


@dataclasses.dataclass
class ShardWindows:
    """One shard's records (serialized tf.train.Example, example ids 0, 1, ... in the shard;
    empty once written), their windows' lengths (events, int32 [records]) and counts: lab
    (`stream.shard_lab_events`), windows (`sequences.build_examples`) and, for train, the
    mirrored values (`meds.mirrored_values`)."""
    records: list[bytes]
    lengths: np.ndarray
    lab: dict[str, int]
    windows: dict[str, int]
    mirrored: collections.Counter


def shard_windows(shard: tuple[str, Path], lookup: stream.SplitLookup, stats: DataStats,
                  max_len: int, window: str, min_window_len: int) -> ShardWindows:
    """The windows of one (split, shard path), serialized."""
    split, path = shard
    events, lab, groups = stream.shard_lab_events(path, lookup, split, stats.codes,
                                                  stats.drop_values)
    mirrored = meds.mirrored_values(groups) if split == "train" else collections.Counter()
    windows: dict[str, int] = {}
    records, lengths = [], []
    for example in sequences.build_examples(events, stats, max_len, window, min_window_len,
                                            report=windows):
        records.append(serialize(example))
        lengths.append(len(example["codes"]))
    return ShardWindows(records, np.array(lengths, np.int32), lab, windows, mirrored)


def write_shard_windows(task: ShardTask, offsets: RecordOffsets | None, **settings
                        ) -> ShardWindows:
    """The windows of one shard (`shard_windows` with `settings`), written to ``task.part``
    numbered from `offsets` when the split's earlier shards are counted (their records then
    left out of the result); otherwise, and without offsets (a Beam worker, which shares
    nothing with the others), returned for the caller to write in shard order."""
    windows = shard_windows((task.split, task.path), **settings)
    first = None if offsets is None else offsets.first_id(task.split, task.index,
                                                          len(windows.lengths))
    if first is not None:
        write_numbered(windows, first, task.part)
    return windows


def write_numbered(windows: ShardWindows, first_id: int, path: str) -> None:
    """Writes the records of `windows` to `path` as example ids first_id, first_id + 1, ...
    (no file when there are none) and drops them from `windows`."""
    if windows.records:
        write_part(path, (renumbered(r, first_id + k) for k, r in enumerate(windows.records)))
    windows.records = []
