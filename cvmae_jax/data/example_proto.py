"""The dataset's records in protobuf's wire format, written without protobuf.

A record is a serialized tf.train.Example whose features are the fields of
`tfds_builder.lab_features`: four int64 scalars and three vectors (float32 times and values,
int32 codes stored as an Int64List), map entries in key order, as tfds's serializer writes them
with deterministic serialization (a test compares the bytes). Encoding the arrays here with
NumPy (packed float32 bytes, vectorized varints) is several times faster than building the
protobuf messages, which was most of a worker's time per shard.

    Example  { Features features = 1 }
    Features { map<string, Feature> feature = 1 }  -> entries {key = 1; value = 2}
    Feature  { FloatList float_list = 2; Int64List int64_list = 3 }
    FloatList / Int64List { repeated value = 1 [packed] }
"""

from __future__ import annotations

import numpy as np

_SCALARS = ("end_time_us", "example_id", "start_time_us", "subject_id")
_FLOAT_VECTORS = ("times", "values")
_KEY_ORDER = ("codes", "end_time_us", "example_id", "start_time_us", "subject_id", "times",
              "values")
_UINT64 = (1 << 64) - 1
_ID_KEY = b"\x0a\x0aexample_id"  # a map entry's key field: tag 1, length 10, "example_id"


def serialize(example: dict) -> bytes:
    """An example (example_id, subject_id, start_time_us, end_time_us: int; times, values:
    float32 [n]; codes: int [n]) as record bytes."""
    entries = []
    for key in _KEY_ORDER:
        if key in _FLOAT_VECTORS:
            packed = np.asarray(example[key], "<f4").tobytes()
            feature = b"\x12" + _length_prefixed(_packed_field(packed))  # float_list
        else:
            feature = _int64_feature(varint(int(example[key]) & _UINT64) if key in _SCALARS
                                     else varints(example[key]))
        entries.append(_map_entry(key, feature))
    return b"\x0a" + _length_prefixed(b"".join(entries))


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
            body = b"".join((features[:at],
                             _map_entry("example_id", _int64_feature(varint(example_id))),
                             features[after:]))
            return b"\x0a" + _length_prefixed(body)
        at = after
    raise ValueError("not a serialized tf.train.Example with an example_id feature")


def varints(values) -> bytes:
    """Protobuf varints of int64 `values` [n], concatenated (negative values as their 64-bit
    two's complement: ten bytes each)."""
    v = np.asarray(values, np.int64).view(np.uint64)
    if not v.size:
        return b""
    if v.max() < 0x80:  # one byte each (and no negative value, whose uint64 is >= 2**63)
        return v.astype(np.uint8).tobytes()
    groups = np.ones(len(v), np.int64)  # 7-bit groups per value
    rest = v >> np.uint64(7)
    while rest.any():
        groups += rest > 0
        rest >>= np.uint64(7)
    width = np.arange(groups.max())
    digits = ((v[:, None] >> (width * 7).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    digits[width < groups[:, None] - 1] |= 0x80  # a continuation bit on all but the last
    return digits[width < groups[:, None]].tobytes()


def varint(n: int) -> bytes:
    """The protobuf varint of an int in [0, 2**64) (a negative int64 as ``n & _UINT64``)."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _map_entry(key: str, feature: bytes) -> bytes:
    """One entry of the Features map (field 1 of Features: key = 1, value = 2)."""
    entry = b"\x0a" + _length_prefixed(key.encode()) + b"\x12" + _length_prefixed(feature)
    return b"\x0a" + _length_prefixed(entry)


def _int64_feature(packed: bytes) -> bytes:
    """A Feature holding an Int64List of `packed` varints."""
    return b"\x1a" + _length_prefixed(_packed_field(packed))


def _packed_field(packed: bytes) -> bytes:
    """Field 1 of a FloatList or Int64List holding `packed` values; empty when there are none
    (protobuf writes no field for an empty repeated one)."""
    return b"\x0a" + _length_prefixed(packed) if packed else b""


def _length_prefixed(data: bytes) -> bytes:
    return varint(len(data)) + data


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
