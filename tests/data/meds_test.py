"""MEDS reading: splits, streamed numeric events (types, filtering, counts, order), lab
selection."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import meds
from cvmae_jax.data.stream import (ShardLabEvents, SplitLookup, lab_events_by_shard,
                                   scan_meds, shard_lab_events)

from meds_reference import read_numeric_events, train_code_counts


def test_subject_splits_file_is_authoritative(tiny_meds):
    splits = meds.read_subject_splits(tiny_meds.root)
    assert splits == tiny_meds.splits  # subject 7 lives in data/tuning/ but is train


def test_subject_splits_fall_back_to_folders(tiny_meds):
    (tiny_meds.root / "metadata/subject_splits.parquet").unlink()
    splits = meds.read_subject_splits(tiny_meds.root)
    assert splits[1] == splits[3] == "train" and splits[7] == splits[8] == "tuning"
    assert splits[6] == "held_out"


def test_subject_splits_without_file_or_folder_is_an_error(tiny_meds):
    (tiny_meds.root / "metadata/subject_splits.parquet").unlink()
    shutil.move(tiny_meds.root / "data/held_out/0.parquet", tiny_meds.root / "data/x.parquet")
    with pytest.raises(meds.MEDSFormatError, match="x.parquet.*split"):
        meds.read_subject_splits(tiny_meds.root)


def _lookup(tiny_meds) -> SplitLookup:
    return SplitLookup(meds.read_subject_splits(tiny_meds.root))


def _lab_events(tiny_meds, split, codes=None) -> list[ShardLabEvents]:
    """`split`'s events of `codes` (default: every code) in each shard, as prepare streams
    them."""
    codes = {r[2] for r in tiny_meds.rows} if codes is None else codes
    lookup = _lookup(tiny_meds)
    return [shard_lab_events(path, lookup, split, codes)
            for path in meds.data_files(tiny_meds.root)]


def test_streamed_events_schema_filter_and_order(tiny_meds):
    shards = _lab_events(tiny_meds, "train")
    for events in (shard.events for shard in shards):
        assert events.schema.equals(meds.EVENT_SCHEMA)
        subjects = events["subject_id"].to_numpy()
        times = events["time"].cast(pa.int64()).to_numpy()
        assert np.all((np.diff(subjects) > 0)
                      | ((np.diff(subjects) == 0) & (np.diff(times) >= 0)))
    events = pa.concat_tables(shard.events for shard in shards)
    assert set(events["subject_id"].to_pylist()) == {1, 2, 3, 4, 7}
    rows = zip(*(events[c].to_pylist() for c in meds.EVENT_COLUMNS))
    assert sorted(rows) == tiny_meds.numeric_rows("train")


def test_streamed_counts_of_oddities(tiny_meds):
    scan = scan_meds(tiny_meds.root, _lookup(tiny_meds), log=lambda line: None)
    counts = scan.splits["train"]
    assert counts["nonfinite_value"] == 2  # one NaN, one inf
    assert counts["null_time"] == 5  # one static row per train subject
    assert scan.rows_without_split == sum(1 for r in tiny_meds.rows if r[0] == 8)
    assert counts["numeric_events"] == (counts["rows"] - counts["null_time"]
                                        - counts["null_value"] - 2)
    lab = [shard.counts for shard in _lab_events(tiny_meds, "train")]
    assert sum(c["lab_events"] for c in lab) == counts["numeric_events"]
    assert sum(c["duplicate_rows"] for c in lab) == 1
    assert sum(c["after_death_rows"] for c in lab) == 2


def test_streamed_events_restricted_to_codes(tiny_meds):
    events = pa.concat_tables(lab_events_by_shard(
        meds.data_files(tiny_meds.root), _lookup(tiny_meds), "tuning", [tiny_meds.B]))
    assert set(events["code"].to_pylist()) == {tiny_meds.B}
    assert set(events["subject_id"].to_pylist()) == {5}


@pytest.mark.parametrize("column, change, problem", [
    ("code", lambda t: t.drop_columns(["code"]), "column 'code' is missing"),
    ("time", lambda t: t.set_column(1, "time", pa.array(["x"] * t.num_rows)),
     "column 'time' has unsupported type string"),
    ("subject_id", lambda t: t.set_column(0, "subject_id", pa.array(
        [None] + [1] * (t.num_rows - 1), pa.int64())), "column subject_id contains nulls"),
])
def test_bad_shard_names_file_and_column(tiny_meds, column, change, problem):
    path = tiny_meds.root / "data/held_out/0.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(meds.MEDSFormatError, match=rf"0.parquet: {problem}"):
        scan_meds(tiny_meds.root, _lookup(tiny_meds), log=lambda line: None)


def _times_open(path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return fds.count(str(path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_shard_is_closed_when_refused_or_left_half_read(tiny_meds):
    path = tiny_meds.root / "data/held_out/0.parquet"
    stream = meds.shard_batches(path)
    next(stream)
    assert _times_open(path) == 1
    stream.close()
    assert _times_open(path) == 0
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["code"]), path)
    with pytest.raises(meds.MEDSFormatError) as refused:  # the error is kept, its file is not
        next(meds.shard_batches(path))
    assert "column 'code' is missing" in str(refused.value) and _times_open(path) == 0


def test_select_top_k_by_frequency_with_regex_and_min_count(tiny_meds):
    counts = train_code_counts(tiny_meds.root)
    report = {}
    codes = meds.select_lab_codes(counts, tiny_meds.config(), report=report)
    assert codes == [tiny_meds.A, tiny_meds.B, tiny_meds.D]  # C has 2 < 3 rows, HR not LAB
    assert report == dict(selection="pattern", matching=4, below_min_count=1, selected=3,
                          by_prefix={"LAB": 3}, below_min_count_codes=[tiny_meds.C])
    assert meds.select_lab_codes(counts, tiny_meds.config(top_k=2)) == codes[:2]
    other = tiny_meds.config(lab_code_pattern="HR|//C//", min_code_count=1)
    assert meds.select_lab_codes(counts, other) == [tiny_meds.HR, tiny_meds.C]


def test_a_code_with_exactly_min_code_count_rows_is_selected():
    counts = {"LAB//x": 3, "LAB//y": 2, "LAB//z": 4}
    config = dict(lab_code_pattern="^LAB//", min_code_count=3, top_k=0, lab_codes=())
    assert meds.select_lab_codes(counts, config) == ["LAB//z", "LAB//x"]


def test_select_ties_by_code_name(tiny_meds):
    train = read_numeric_events(tiny_meds.root, "train")
    ties = train.filter(pc.equal(train["code"], tiny_meds.D))
    renamed = ties.set_column(2, "code", pa.array(["LAB//0"] * ties.num_rows))
    ties = pa.concat_tables([ties, renamed])
    codes = meds.select_lab_codes(train_code_counts(ties), tiny_meds.config(min_code_count=1))
    assert codes == ["LAB//0", tiny_meds.D]


def test_select_explicit_list(tiny_meds):
    counts = train_code_counts(tiny_meds.root)
    explicit = (tiny_meds.HR, tiny_meds.C)
    codes = meds.select_lab_codes(counts, tiny_meds.config(lab_codes=explicit, top_k=1))
    assert codes == list(explicit)
    with pytest.raises(meds.MEDSFormatError, match="LAB//E//x"):
        meds.select_lab_codes(counts, tiny_meds.config(lab_codes=(tiny_meds.A, tiny_meds.E)))


def test_select_nothing_matches_is_an_error(tiny_meds):
    with pytest.raises(meds.MEDSFormatError, match="no code with numeric values matches"):
        meds.select_lab_codes(train_code_counts(tiny_meds.root),
                              tiny_meds.config(lab_code_pattern="^NOPE"))
