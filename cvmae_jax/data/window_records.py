"""One shard's windows as the dataset's serialized records, and their example ids.

A record is the tf.train.Example that tfds's serializer builds, serialized with its features in
key order (`serialize`): the same example gives the same bytes in every process (protobuf's own
map order differs from process to process), so the files are reproducible byte for byte.
Windows are numbered in order over a split (example_id 0, 1, ... across its shards), which a
shard alone cannot know, so `shard_windows` numbers its records from 0, and once the split's
earlier shards are counted `renumbered` gives each its split-wide number, rewriting only the
example_id feature: the bytes are those serializing the example with that id gives, so the
shards can be serialized and written in parallel processes (`write_shard_windows`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.example_serializer import ExampleSerializer

from cvmae_jax.data import meds, sequences, stream
from cvmae_jax.data.array_record_writer import write_part
from cvmae_jax.data.shard_pool import RecordOffsets
from cvmae_jax.data.stats import DataStats

_ID_KEY = b"\x0a\x0aexample_id"  # a map entry's key field: tag 1, length 10, "example_id"


@functools.cache
def lab_features() -> tfds.features.FeaturesDict:
    """The dataset's features: one record per window."""
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


@functools.cache
def _serializer() -> ExampleSerializer:
    return ExampleSerializer(lab_features().get_serialized_info())


def serialize(example: dict) -> bytes:
    """An example (the fields of `lab_features`) as record bytes, features in key order."""
    encoded = lab_features().encode_example(example)
    return _serializer().get_tf_example(encoded).SerializeToString(deterministic=True)


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
    mirrored values (`meds.count_mirrored_values`)."""
    records: list[bytes]
    lengths: np.ndarray
    lab: dict[str, int]
    windows: dict[str, int]
    mirrored: collections.Counter


def shard_windows(shard: tuple[str, Path], lookup: stream.SplitLookup, stats: DataStats,
                  max_len: int, window: str, min_window_len: int) -> ShardWindows:
    """The windows of one (split, shard path), serialized."""
    split, path = shard
    events, lab = stream.shard_lab_events(path, lookup, split, stats.codes, stats.drop_values)
    mirrored = meds.count_mirrored_values(events) if split == "train" else collections.Counter()
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
    numbered from `offsets` (their records then left out of the result); without offsets (a
    Beam worker, which shares nothing with the others) returned for the caller to write."""
    windows = shard_windows((task.split, task.path), **settings)
    if offsets is not None:
        first = offsets.first_id(task.split, task.index, len(windows.lengths))
        write_numbered(windows, first, task.part)
    return windows


def write_numbered(windows: ShardWindows, first_id: int, path: str) -> None:
    """Writes the records of `windows` to `path` as example ids first_id, first_id + 1, ...
    (no file when there are none) and drops them from `windows`."""
    if windows.records:
        write_part(path, (renumbered(r, first_id + k) for k, r in enumerate(windows.records)))
    windows.records = []


def renumbered(record: bytes, example_id: int) -> bytes:
    """`record` (a serialized tf.train.Example with an example_id feature) with example_id
    set to `example_id`; every other byte as it was, the lengths around it updated. Only the
    feature entries up to example_id's are walked (keys in order: codes, end_time_us first)."""
    features, end = _field(record, 0)
    if end != len(record):
        raise ValueError("not a serialized tf.train.Example with one features field")
    at = 0
    while at < len(features):
        entry, after = _field(features, at)
        if entry.startswith(_ID_KEY):
            ids = b"\x0a" + _length_prefixed(_varint(example_id))  # Int64List, packed
            entry = _ID_KEY + b"\x12" + _length_prefixed(b"\x1a" + _length_prefixed(ids))
            body = b"".join((features[:at], b"\x0a", _varint(len(entry)), entry,
                             features[after:]))
            return b"\x0a" + _varint(len(body)) + body
        at = after
    raise ValueError("not a serialized tf.train.Example with an example_id feature")


def _field(data: bytes, at: int) -> tuple[bytes, int]:
    """The length-delimited field 1 starting at `at` -> (its bytes, where the next starts)."""
    if data[at] != 0x0A:
        raise ValueError(f"expected field 1 (length-delimited) at byte {at}")
    length, shift, at = 0, 0, at + 1
    while True:
        byte = data[at]
        length |= (byte & 0x7F) << shift
        shift, at = shift + 7, at + 1
        if byte < 0x80:
            return data[at:at + length], at + length


def _length_prefixed(data: bytes) -> bytes:
    return _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
