"""Sequence packing: whole examples per segment, denser rows, process-invariant batches."""

import numpy as np
import pytest

from cvmae_jax.data.packing import packed_train_dataset
from cvmae_jax.data.prepare import prepare_dataset

MAX_LEN = 8


@pytest.fixture(scope="module")
def prepared(tiny_meds_session, tmp_path_factory):
    return prepare_dataset(tiny_meds_session.config(max_len=MAX_LEN, min_window_len=1), None,
                           tmp_path_factory.mktemp("tfds"))


def test_packed_rows_hold_whole_examples_in_their_own_segments(prepared):
    source = prepared.data_source("train")
    batch = next(iter(packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=0)))
    for key in ("times", "codes", "values", "valid", "example_id", "segment_ids", "positions"):
        assert batch[key].shape == (4, MAX_LEN), key
    np.testing.assert_array_equal(batch["valid"], batch["segment_ids"] > 0)
    for row in range(4):
        for segment in set(batch["segment_ids"][row][batch["valid"][row]].tolist()):
            tokens = batch["segment_ids"][row] == segment
            ids = set(batch["example_id"][row][tokens].tolist())
            assert len(ids) == 1
            example = source[ids.pop()]
            np.testing.assert_array_equal(batch["positions"][row][tokens],
                                          np.arange(len(example["codes"])))
            np.testing.assert_array_equal(batch["codes"][row][tokens], example["codes"])
            np.testing.assert_allclose(batch["values"][row][tokens], example["values"])


def test_packing_fills_rows_better_than_padding(prepared):
    stream = iter(packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=0))
    packed = np.mean([next(stream)["valid"].mean() for _ in range(20)])
    padded = prepared.num_tokens["train"] / (prepared.num_examples["train"] * MAX_LEN)
    assert packed > padded


def test_process_shards_are_blocks_of_the_single_process_packed_batches(prepared):
    whole = iter(packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=2))
    shards = [iter(packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=2, shard_index=i,
                                        shard_count=2)) for i in range(2)]
    for _ in range(10):
        expected, parts = next(whole), [next(s) for s in shards]
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
