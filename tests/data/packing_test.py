"""Sequence packing: whole examples per segment, denser rows, process-invariant batches."""

import numpy as np
import pytest

from cvmae_jax.data.packing import pack_rows, packed_train_dataset
from cvmae_jax.data.prepare import prepare_dataset

MAX_LEN = 8


@pytest.fixture(scope="module")
def prepared(tiny_meds_shared, tmp_path_factory):
    return prepare_dataset(tiny_meds_shared.config(max_len=MAX_LEN, min_window_len=1), None,
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


def _example(example_id, n):
    return dict(times=np.arange(n, dtype=np.float32), codes=np.full(n, example_id, np.int32),
                values=np.full(n, example_id / 10, np.float32), example_id=example_id)


def test_first_fit_decreasing_puts_every_example_whole_into_the_fewest_rows():
    lengths = [5, 3, 3, 2, 2, 1, 8, 4]  # 28 tokens: 4 rows of 8 at best, and FFD finds them
    rows = pack_rows([_example(i, n) for i, n in enumerate(lengths)], 8)
    assert rows["codes"].shape == (4, 8)
    for i, n in enumerate(lengths):
        tokens = rows["example_id"] == i
        tokens &= rows["valid"]
        assert tokens.sum() == n and len(set(np.nonzero(tokens)[0])) == 1, i
        row = np.nonzero(tokens)[0][0]
        np.testing.assert_array_equal(rows["positions"][row][tokens[row]], np.arange(n))
        np.testing.assert_array_equal(rows["times"][row][tokens[row]], np.arange(n))
        assert len(set(rows["segment_ids"][row][tokens[row]])) == 1
    np.testing.assert_array_equal(rows["valid"], rows["segment_ids"] > 0)
    shuffled = pack_rows([_example(i, n) for i, n in enumerate(lengths)], 8, shuffle_seed=[0, 1])
    assert sorted(map(tuple, shuffled["codes"])) == sorted(map(tuple, rows["codes"]))
    with pytest.raises(ValueError, match="max_len=8"):
        pack_rows([_example(0, 9)], 8)


def test_packed_stream_resumes_mid_chunk_and_with_worker_processes(prepared):
    make = lambda **kw: iter(packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=4, **kw))
    reference = make()
    batches = [next(reference) for _ in range(12)]  # several chunks of 4 x 4 examples
    for skip in (3, 7):
        stream = make()
        for _ in range(skip):
            next(stream)
        state = stream.get_state()
        in_workers = make(workers=2)
        in_workers.set_state(state)
        try:
            for want in batches[skip:]:
                got = next(in_workers)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key])
        finally:
            in_workers.close()


def test_segment_ids_count_non_empty_examples_only():
    """Each row's segment ids are 1..k over its non-empty examples, never above max_len (which
    attention's mask relies on); an example without events takes no segment and no slot."""
    lengths = [5, 0, 3, 0, 0, 2, 6, 0, 1]
    rows = pack_rows([_example(i, n) for i, n in enumerate(lengths)], 8)
    assert rows["valid"].sum() == sum(lengths)
    for row in range(len(rows["valid"])):
        ids = rows["segment_ids"][row][rows["valid"][row]]
        assert list(np.unique(ids)) == list(range(1, ids.max() + 1))
    assert rows["segment_ids"].max() <= 8
    assert set(np.unique(rows["example_id"][rows["valid"]])) == {
        i for i, n in enumerate(lengths) if n}
