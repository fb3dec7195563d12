"""grain pipelines: fixed shapes, padding, epoch coverage, sharding, state, eval padding."""

import multiprocessing
import os
import signal
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cvmae_jax.data.pipeline import BATCH_KEYS, eval_batches, train_dataset
from cvmae_jax.data.prepare import prepare_dataset

MAX_LEN = 8


@pytest.fixture(scope="module")
def prepared(tiny_meds_shared, tmp_path_factory):
    return prepare_dataset(tiny_meds_shared.config(max_len=MAX_LEN, min_window_len=1), None,
                           tmp_path_factory.mktemp("tfds"))


def _check_batch(batch, rows, max_len, source):
    assert set(batch) == set(BATCH_KEYS)
    for key, dtype in dict(times=np.float32, codes=np.int32, values=np.float32, valid=bool).items():
        assert batch[key].dtype == dtype and batch[key].shape == (rows, max_len), key
    assert batch["example_id"].dtype == np.int32 and batch["example_id"].shape == (rows,)
    pad = ~batch["valid"]
    assert not batch["times"][pad].any() and not batch["codes"][pad].any()
    assert not batch["values"][pad].any()
    for row, i in enumerate(batch["example_id"]):
        if i < 0:
            assert not batch["valid"][row].any()
            continue
        n = len(source[int(i)]["codes"])
        np.testing.assert_array_equal(batch["valid"][row], np.arange(max_len) < n)
        np.testing.assert_array_equal(batch["codes"][row, :n], source[int(i)]["codes"])


def test_train_batches_shapes_padding_and_epoch_coverage(prepared):
    n = prepared.num_examples["train"]
    it = iter(train_dataset(prepared, "train", 4, 12, seed=0))
    source = prepared.data_source("train")
    ids = []
    for _ in range(2 * n // 4 + 1):
        batch = next(it)
        _check_batch(batch, 4, 12, source)
        ids.extend(batch["example_id"].tolist())
    assert sorted(ids[:n]) == list(range(n))  # each epoch is a permutation
    assert sorted(ids[n:2 * n]) == list(range(n)) and ids[:n] != ids[n:2 * n]  # reshuffled


def test_process_shards_are_blocks_of_the_single_process_batches(prepared):
    n = prepared.num_examples["train"]
    whole = iter(train_dataset(prepared, "train", 4, MAX_LEN, seed=3))
    shards = [iter(train_dataset(prepared, "train", 4, MAX_LEN, seed=3, shard_index=i,
                                 shard_count=2)) for i in range(2)]
    for _ in range(n):  # more than one epoch
        expected = next(whole)
        parts = [next(shard) for shard in shards]
        assert len(parts[0]["example_id"]) == 2
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_iterator_state_restores_the_next_batch(prepared, tmp_path):
    ds = train_dataset(prepared, "train", 4, MAX_LEN, seed=1)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = iter(ds)
    fresh.set_state(state)
    restored = iter(ds)
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want in expected:
        for got in (next(fresh), next(restored)):
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_read_the_same_batches_and_resume_across_worker_counts(prepared):
    in_thread = iter(train_dataset(prepared, "train", 4, MAX_LEN, seed=5))
    in_workers = iter(train_dataset(prepared, "train", 4, MAX_LEN, seed=5, workers=2))
    try:
        for _ in range(4):
            want, got = next(in_thread), next(in_workers)
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])
        state = in_workers.get_state()  # saved with 2 workers, restored with none
        expected = [next(in_workers) for _ in range(3)]
    finally:
        in_workers.close()
    restored = iter(train_dataset(prepared, "train", 4, MAX_LEN, seed=5))
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_workers_outlive_a_sigterm_to_the_process_group(prepared):
    """A scheduler's SIGTERM reaches the workers too; they must keep serving batches so the
    training process can reach its preemption checkpoint."""
    stream = iter(train_dataset(prepared, "train", 4, MAX_LEN, seed=5, workers=1))
    try:
        next(stream)
        workers = multiprocessing.active_children()
        assert workers
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(worker.is_alive() for worker in workers)
        for _ in range(5):
            next(stream)
    finally:
        stream.close()


def test_negative_worker_count_is_refused(prepared):
    with pytest.raises(ValueError, match="config.data.workers"):
        train_dataset(prepared, "train", 4, MAX_LEN, seed=0, workers=-1)


def test_eval_batches_cover_split_once_with_padding(prepared):
    for split in ("train", "tuning", "held_out"):
        n = prepared.num_examples[split]
        batches = list(eval_batches(prepared, split, 3, MAX_LEN))
        source = prepared.data_source(split)
        assert len(batches) == -(-n // 3)
        ids = np.concatenate([b["example_id"] for b in batches])
        np.testing.assert_array_equal(ids[:n], np.arange(n))
        assert np.all(ids[n:] == -1)
        for b in batches:
            _check_batch(b, 3, MAX_LEN, source)


def test_bad_arguments_are_rejected(prepared):
    with pytest.raises(ValueError, match="max_len"):
        train_dataset(prepared, "train", 4, MAX_LEN - 1, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        train_dataset(prepared, "train", 5, MAX_LEN, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="split"):
        next(eval_batches(prepared, "test", 4, MAX_LEN))


def test_shared_mimic_demo_batches(shared_meds_dir, tmp_path):
    prepared = prepare_dataset(dict(meds_dir=str(shared_meds_dir), top_k=50), None, tmp_path)
    batch = next(iter(train_dataset(prepared, "train", 8, 256, seed=0)))
    assert batch["codes"].shape == (8, 256) and batch["valid"].any()
    assert np.isfinite(batch["values"]).all() and batch["codes"].max() < 50
    total = sum(int(b["valid"].sum()) for b in eval_batches(prepared, "held_out", 16, 256))
    assert total == prepared.num_tokens["held_out"]


@pytest.mark.parametrize("split, batch_size", [("train", 4), ("held_out", 4), ("held_out", 8)])
def test_sharded_eval_batches_are_blocks_of_the_global_batches(prepared, split, batch_size):
    """Every process yields as many batches as there are global ones (a process with fewer
    would leave the others waiting in the evaluation's collectives), also where a split has
    fewer examples than a global batch's second block starts at."""
    full = list(eval_batches(prepared, split, batch_size, MAX_LEN))
    shards = [list(eval_batches(prepared, split, batch_size, MAX_LEN, i, 2)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(full)
    for whole, a, b in zip(full, *shards):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])
