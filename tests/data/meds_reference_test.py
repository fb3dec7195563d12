"""The reference reader (tests/meds_reference.py) on the tiny MEDS root, whose rows are known:
the oracle the streaming pipeline is checked against reads them right."""

import collections

import numpy as np
import pyarrow as pa

from cvmae_jax.data import meds

from meds_reference import event_counts, read_numeric_events, train_code_counts


def test_one_split_in_one_table_sorted_by_subject_and_time(tiny_meds):
    events = read_numeric_events(tiny_meds.root, "train")
    assert events.schema.equals(meds.EVENT_SCHEMA)
    subjects = events["subject_id"].to_numpy()
    times = events["time"].cast(pa.int64()).to_numpy()
    assert np.all((np.diff(subjects) > 0) | ((np.diff(subjects) == 0) & (np.diff(times) >= 0)))
    rows = zip(*(events[c].to_pylist() for c in meds.EVENT_COLUMNS))
    assert sorted(rows) == tiny_meds.numeric_rows("train")


def test_counts_of_what_was_left_out_and_kept_oddities(tiny_meds):
    counts = event_counts(read_numeric_events(tiny_meds.root, "train"))
    assert counts["nonfinite_value"] == 2  # one NaN, one inf
    assert counts["null_time"] == 5  # one static row per train subject
    assert counts["duplicate_rows"] == 1
    assert counts["after_death_rows"] == 2
    assert counts["rows_without_split"] == sum(1 for r in tiny_meds.rows if r[0] == 8)
    assert counts["kept"] == counts["rows"] - counts["null_time"] - counts["null_value"] - 2
    assert event_counts(pa.table({"x": [1]})) == {}


def test_restricted_to_codes(tiny_meds):
    events = read_numeric_events(tiny_meds.root, "tuning", codes=[tiny_meds.B])
    assert set(events["code"].to_pylist()) == {tiny_meds.B}
    assert set(events["subject_id"].to_pylist()) == {5}
    assert event_counts(events)["other_code"] > 0


def test_code_counts_of_a_table_or_a_root(tiny_meds):
    expected = collections.Counter(r[2] for r in tiny_meds.numeric_rows("train"))
    assert train_code_counts(tiny_meds.root) == expected
    assert train_code_counts(read_numeric_events(tiny_meds.root, "train")) == expected
