"""The records written without protobuf are the bytes tfds's serializer writes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorflow_datasets.core.example_serializer import ExampleSerializer

from cvmae_jax.data.example_proto import serialize, varints
from cvmae_jax.data.tfds_builder import lab_features


def tfds_serialized(example: dict) -> bytes:
    """tfds's tf.train.Example of `example`, serialized deterministically (map keys sorted)."""
    features = lab_features()
    proto = ExampleSerializer(features.get_serialized_info()).get_tf_example(
        features.encode_example(example))
    return proto.SerializeToString(deterministic=True)


@pytest.mark.parametrize("code_range", [1, 100, 200, 70_000])
def test_records_are_the_bytes_tfds_writes(code_range):
    rng = np.random.default_rng(code_range)
    for i in range(200):
        n = int(rng.integers(0, 300)) if i else 0
        example = dict(
            example_id=np.int64(rng.integers(0, 2**40)),
            subject_id=np.int64(rng.integers(-2**62, 2**62)),
            start_time_us=np.int64(rng.integers(-2**50, 2**50)),
            end_time_us=np.int64(rng.integers(-2**50, 2**50)),
            times=rng.standard_normal(n).astype(np.float32),
            codes=rng.integers(0, code_range, n).astype(np.int32),
            values=rng.standard_normal(n if i % 7 else 0).astype(np.float32))
        assert serialize(example) == tfds_serialized(example)


def test_varints_of_negative_and_large_values():
    values = np.array([0, 1, 127, 128, 300, 2**31, 2**62, -1, -2**63], np.int64)
    expected = b"".join(_one_varint(int(v) & (2**64 - 1)) for v in values)
    assert varints(values) == expected


def _one_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n >= 0x80 else 0))
        if n < 0x80:
            return bytes(out)
        n >>= 7


def test_the_workers_modules_import_no_tfds():
    code = ("import sys, cvmae_jax.data.window_records, cvmae_jax.data.stream; "
            "print('tensorflow_datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out == "False"
