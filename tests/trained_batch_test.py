"""Your own lab events as a pandas DataFrame -> the batch a trained run encodes."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cvmae_jax.trained import events_batch

from meds_reference import compute_stats

A, B = "LAB//A//mg/dL", "LAB//B//mmol/L"
T0 = pd.Timestamp("2100-01-01 08:00")


@pytest.fixture
def stats():
    train = pa.table({"subject_id": [1] * 6, "code": [A, A, A, B, B, B],
                      "numeric_value": [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]})
    return compute_stats(train, [A, B])


def test_events_become_the_latest_window_of_each_subject(stats):
    half_hours = [T0 + pd.Timedelta(minutes=30 * i) for i in range(5)]
    events = pd.DataFrame({
        "subject_id": [7] * 5 + [3, 3, 3, 3],
        "time": half_hours + [T0, T0 + pd.Timedelta(hours=2), T0, pd.NaT],
        "code": [A, B, A, B, A] + [B, "LAB//OTHER//x", A, A],
        "numeric_value": [1.0, 10.0, 2.0, 20.0, 3.0] + [30.0, 5.0, np.nan, 1.0]})
    batch = events_batch(events, stats, max_len=4)
    assert list(batch["subject_id"]) == [3, 7]  # by subject_id
    assert batch["valid"].sum(1).tolist() == [1, 4]  # 3: other code, NaN value, no time out
    np.testing.assert_allclose(batch["times"][1], [0.0, 0.5, 1.0, 1.5])  # the latest 4, hours
    np.testing.assert_array_equal(batch["codes"][1], [1, 0, 1, 0])
    np.testing.assert_allclose(batch["values"][1], stats.normalize([1, 0, 1, 0],
                                                                   [10.0, 2.0, 20.0, 3.0]))
    assert batch["values"][0, 0] == stats.normalize([1], [30.0])[0]


def test_each_code_latest_keeps_every_codes_latest_event_then_the_last_others(stats):
    """The label window of eval.label_window="each_code_latest": A's only event (the oldest)
    stays in a 3-event window; times count from that window's first event."""
    events = pd.DataFrame({"subject_id": [7] * 5,
                           "time": [T0 + pd.Timedelta(minutes=30 * i) for i in range(5)],
                           "code": [A, B, B, B, B],
                           "numeric_value": [1.0, 10.0, 20.0, 30.0, 40.0]})
    last = events_batch(events, stats, max_len=3)
    np.testing.assert_array_equal(last["codes"][0], [1, 1, 1])
    latest = events_batch(events, stats, max_len=3, each_code_latest=True)
    np.testing.assert_array_equal(latest["codes"][0], [0, 1, 1])
    np.testing.assert_allclose(latest["times"][0], [0.0, 1.5, 2.0])
    np.testing.assert_allclose(latest["values"][0], stats.normalize([0, 1, 1], [1.0, 30.0, 40.0]))


def test_events_without_a_meds_column_are_refused_in_one_line(stats):
    events = pd.DataFrame({"subject_id": [1], "time": [T0], "code": [A]})
    with pytest.raises(ValueError, match="events: no column numeric_value"):
        events_batch(events, stats, max_len=4)
    events["numeric_value"], events["time"] = [1.0], ["not a time"]
    with pytest.raises(ValueError, match="events: expected integer subject_id, datetime time"):
        events_batch(events, stats, max_len=4)
