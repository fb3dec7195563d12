"""Several training processes packing batches: each reads only its own rows' windows."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from cvmae_jax.data import records
from cvmae_jax.data.packing import packed_train_dataset
from cvmae_jax.data.prepare import load_prepared, prepare_dataset
from cvmae_jax.data.tfds_builder import LENGTHS_FILE

MAX_LEN = 8


@pytest.fixture(scope="module")
def prepared(tiny_meds_shared, tmp_path_factory):
    return prepare_dataset(tiny_meds_shared.config(max_len=MAX_LEN, min_window_len=1), None,
                           tmp_path_factory.mktemp("tfds"), log=lambda line: None)


@pytest.fixture
def reads(monkeypatch) -> collections.Counter:
    """Records decoded, counted under the key set in reads["label"] (not counted itself)."""
    counter: collections.Counter = collections.Counter(label="whole")
    decode = records.LabRecords.decode

    def counting(self, raw, index):
        counter[counter["label"]] += 1
        return decode(self, raw, index)

    monkeypatch.setattr(records.LabRecords, "decode", counting)
    return counter


def _stream(prepared, shard_index=0, shard_count=1, seed=5):
    return iter(packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=seed,
                                     shard_index=shard_index, shard_count=shard_count))


def test_each_process_reads_only_its_rows(prepared, reads):
    """Chunks 0-5 (16 windows each): the two processes read 96 windows between them, as
    one process does alone, and fill the rows it fills at their slots."""
    packers = {label: packed_train_dataset(prepared, "train", 4, MAX_LEN, seed=5,
                                           shard_index=index, shard_count=count).make_chunk
               for label, index, count in (("whole", 0, 1), (0, 0, 2), (1, 1, 2))}
    for label, packer in packers.items():
        reads["label"] = label
        chunks = [packer(c) for c in range(6)]
        if label == "whole":
            whole = chunks
            continue
        for mine, full in zip(chunks, whole):
            kept = mine["valid"].any(axis=1)
            for key in full:
                np.testing.assert_array_equal(mine[key][kept], full[key][kept])
    assert reads["whole"] == 96
    assert reads[0] + reads[1] == 96 and 0 < reads[0] < 96 and 0 < reads[1] < 96


def test_a_process_resumes_mid_chunk_on_the_same_rows(prepared):
    reference = _stream(prepared, 1, 2, seed=6)
    batches = [next(reference) for _ in range(10)]
    for skip in (1, 3, 6):
        stream = _stream(prepared, 1, 2, seed=6)
        for _ in range(skip):
            next(stream)
        resumed = _stream(prepared, 1, 2, seed=6)
        resumed.set_state(stream.get_state())
        for want in batches[skip:]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_a_dataset_without_lengths_packs_the_same_batches(prepared, tmp_path):
    """Datasets prepared without the window_lengths files: lengths read from the records."""
    import shutil

    copy = tmp_path / "copy" / os.path.relpath(prepared.path, prepared.data_dir)
    shutil.copytree(prepared.path, copy)
    for split in ("train", "tuning", "held_out"):
        (copy / LENGTHS_FILE.format(split=split)).unlink()
    without = load_prepared(copy)
    np.testing.assert_array_equal(without.window_lengths("train"),
                                  prepared.window_lengths("train"))
    a, b = _stream(prepared, 0, 2), _stream(without, 0, 2)
    for _ in range(4):
        got, want = next(b), next(a)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
