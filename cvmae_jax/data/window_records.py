"""One shard's windows as the dataset's serialized records, and their example ids.

A record is the tf.train.Example that tfds's serializer builds, serialized with its features in
key order (`serialize`): the same example gives the same bytes in every process (protobuf's own
map order differs from process to process), so the files are reproducible byte for byte.
Windows are numbered in order over a split (example_id 0, 1, ... across its shards), which a
shard alone cannot know, so `shard_windows` numbers its records from 0 and the writer gives each
its split-wide number with `renumbered`, which rewrites only the example_id feature: the bytes
are those serializing the example with that id gives, so the shards can be serialized in
parallel processes (serializing is about a third of the preparation's time).
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


@dataclasses.dataclass
class ShardWindows:
    """One shard's records (serialized tf.train.Example, example ids 0, 1, ... in the shard),
    their windows' lengths (events, int32 [records]) and counts: lab (`stream.shard_lab_events`), windows (`sequences.build_examples`) and, for
    train, the mirrored values (`meds.count_mirrored_values`)."""
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
