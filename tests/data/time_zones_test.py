"""Time zones: no event recorded after prediction_time enters a label window, whatever the
zones of the data's `time` and the labels' `prediction_time`; naive and zone-aware never mixed."""

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import labels, meds

from meds_reference import compute_stats, read_numeric_events, train_code_counts
from conftest import T0

NY, TOKYO = "America/New_York", "Asia/Tokyo"
MAX_LEN = 8
US = 1_000_000


def _utc_us(t: datetime.datetime) -> int:
    return int((t - datetime.datetime(1970, 1, 1)).total_seconds() * US)


def _with_zone(table: pa.Table, column: str, zone: str | None) -> pa.Table:
    """The same instants (naive values read as UTC) with `zone` attached (None: as they are)."""
    if zone is None:
        return table
    i = table.column_names.index(column)
    return table.set_column(i, column, table[column].cast(pa.timestamp("us", tz=zone)))


def _zone_data(root, zone, only=None):
    for f in meds.data_files(root):
        if only in (None, f):
            pq.write_table(_with_zone(pq.read_table(f), "time", zone), f)


def _prediction_times(tiny_meds) -> list[tuple[int, datetime.datetime]]:
    """(subject, prediction_time) pairs: before the first event, on an event, between events."""
    rows = []
    for subject in (1, 5, 6):
        times = sorted({r[1] for r in tiny_meds.rows if r[0] == subject and r[1] is not None})
        rows += [(subject, times[0] - datetime.timedelta(hours=1)), (subject, times[3]),
                 (subject, times[5] + datetime.timedelta(minutes=15)), (subject, times[-1])]
    return rows


def _write_labels(path, pairs, zone) -> None:
    table = pa.table({"subject_id": pa.array([s for s, _ in pairs], pa.int64()),
                      "prediction_time": pa.array([t for _, t in pairs], pa.timestamp("us")),
                      "boolean_value": [i % 2 == 0 for i in range(len(pairs))]})
    pq.write_table(_with_zone(table, "prediction_time", zone), path)


@pytest.fixture
def setup(tiny_meds):
    train = read_numeric_events(tiny_meds.root, "train")
    stats = compute_stats(train, meds.select_lab_codes(train_code_counts(train),
                                                       tiny_meds.config()))
    return tiny_meds, stats


def _eligible(tiny_meds, stats, subject, t_pred) -> list[int]:
    """UTC microseconds of the subject's selected finite lab events at or before t_pred."""
    return sorted(_utc_us(r[1]) for r in tiny_meds.rows
                  if r[0] == subject and r[1] is not None and r[2] in stats.codes
                  and r[3] is not None and np.isfinite(r[3]) and r[1] <= t_pred)


@pytest.mark.parametrize("data_zone, label_zone", [
    (None, None), (NY, NY), (NY, TOKYO), ("UTC", NY), (TOKYO, "UTC")])
def test_windows_hold_only_events_at_or_before_prediction_time(setup, tmp_path, data_zone,
                                                               label_zone):
    tiny_meds, stats = setup
    pairs = _prediction_times(tiny_meds)
    _zone_data(tiny_meds.root, data_zone)
    _write_labels(tmp_path / "labels.parquet", pairs, label_zone)
    windows = list(labels.label_windows(tiny_meds.root, tmp_path / "labels.parquet", stats,
                                        MAX_LEN))
    assert sorted(int(w["example_id"]) for w in windows) == list(range(len(pairs)))
    for w in windows:
        subject, t_pred = pairs[int(w["example_id"])]
        eligible = _eligible(tiny_meds, stats, subject, t_pred)
        assert int(w["prediction_time_us"]) == _utc_us(t_pred)
        assert len(w["codes"]) == min(MAX_LEN, len(eligible))
        if eligible:  # the window's last event is the last one at or before prediction_time
            assert int(w["end_time_us"]) == eligible[-1] <= _utc_us(t_pred)
    assert sum(len(w["codes"]) == 0 for w in windows) == 3  # before each first event


@pytest.mark.parametrize("data_zone, label_zone, data_words, label_words", [
    (NY, None, f"has time zone {NY}", "has no time zone"),
    (None, TOKYO, "has no time zone", f"has time zone {TOKYO}")])
def test_a_naive_and_a_zone_aware_column_are_never_compared(setup, tmp_path, data_zone,
                                                            label_zone, data_words, label_words):
    tiny_meds, stats = setup
    _zone_data(tiny_meds.root, data_zone)
    _write_labels(tmp_path / "labels.parquet", _prediction_times(tiny_meds), label_zone)
    with pytest.raises(meds.MEDSFormatError) as error:
        next(labels.label_windows(tiny_meds.root, tmp_path / "labels.parquet", stats, MAX_LEN))
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/labels.parquet: column prediction_time {label_words}")
    assert f"data/held_out/0.parquet: column time {data_words}" in message
    assert "\n" not in message


def test_one_zone_aware_data_file_among_naive_ones_is_refused(setup, tmp_path):
    tiny_meds, stats = setup
    _zone_data(tiny_meds.root, NY, only=tiny_meds.root / "data/train/nested/1.parquet")
    _write_labels(tmp_path / "labels.parquet", _prediction_times(tiny_meds), None)
    with pytest.raises(meds.MEDSFormatError, match=f"data/train/nested/1.parquet: column time "
                                                   f"has time zone {NY}"):
        next(labels.label_windows(tiny_meds.root, tmp_path / "labels.parquet", stats, MAX_LEN))


def test_the_hour_repeated_when_daylight_saving_ends_keeps_its_order(setup, tmp_path):
    """New York, 2024-11-03: 01:50 EDT (05:50Z) comes before 01:40 EST (06:40Z). Compared as
    local wall time the later event would enter the window; as instants it does not."""
    tiny_meds, stats = setup
    shard = tiny_meds.root / "data/held_out/0.parquet"
    day = datetime.datetime(2024, 11, 3)
    before, after = day + datetime.timedelta(hours=5), day + datetime.timedelta(hours=6, minutes=40)
    extra = pa.table({"subject_id": pa.array([6, 6], pa.int64()),
                      "time": pa.array([before, after], pa.timestamp("us")),
                      "code": [stats.codes[0]] * 2, "numeric_value": pa.array([1.0, 2.0],
                                                                             pa.float32())})
    pq.write_table(pa.concat_tables([pq.read_table(shard), extra]), shard)
    _zone_data(tiny_meds.root, NY)
    t_pred = day + datetime.timedelta(hours=5, minutes=50)
    _write_labels(tmp_path / "labels.parquet", [(6, t_pred)], NY)
    wall = pq.read_table(tmp_path / "labels.parquet")["prediction_time"].to_pylist()[0]
    assert wall.strftime("%H:%M %Z") == "01:50 EDT"  # the event at 01:40 EST is later
    (w,) = labels.label_windows(tiny_meds.root, tmp_path / "labels.parquet", stats, MAX_LEN)
    assert len(w["codes"]) == 1 and int(w["end_time_us"]) == _utc_us(before)


def test_no_event_after_a_nanosecond_prediction_time_enters_its_window(setup, tmp_path):
    """Nanosecond times: events are rounded up to the microsecond and prediction times down,
    so an event even 1 ns after a prediction time stays out of its window (an event in the same
    microsecond but not on a whole one stays out too)."""
    tiny_meds, stats = setup
    shard = tiny_meds.root / "data/held_out/0.parquet"
    t = np.datetime64("2024-11-03T05:00:00", "ns")
    offsets = [0, 1, 999, 1001]  # ns after t
    extra = pa.table({"subject_id": pa.array([6] * 4, pa.int64()),
                      "time": pa.array([t + np.timedelta64(o, "ns") for o in offsets],
                                       pa.timestamp("ns")),
                      "code": [stats.codes[0]] * 4,
                      "numeric_value": pa.array([1.0] * 4, pa.float32())})
    old = pq.read_table(shard)
    old = old.set_column(old.column_names.index("time"), "time",
                         old["time"].cast(pa.timestamp("ns")))
    pq.write_table(pa.concat_tables([old, extra]), shard)
    kept = {0: 1, 999: 1, 1001: 3}  # prediction time (ns after t) -> extra events kept
    pq.write_table(pa.table({
        "subject_id": pa.array([6] * len(kept), pa.int64()),
        "prediction_time": pa.array([t + np.timedelta64(o, "ns") for o in kept],
                                    pa.timestamp("ns")),
        "boolean_value": [True] * len(kept)}), tmp_path / "labels.parquet")
    before = len(_eligible(tiny_meds, stats, 6, datetime.datetime(2024, 11, 3, 4)))
    windows = labels.label_windows(tiny_meds.root, tmp_path / "labels.parquet", stats, 64)
    assert [len(w["codes"]) - before for w in windows] == list(kept.values())


def test_nanosecond_times_in_the_hour_repeated_when_daylight_saving_ends(setup, tmp_path):
    """Zone-aware nanosecond times are rounded as UTC instants: in New York's repeated hour a
    local-time rounding would be ambiguous."""
    tiny_meds, stats = setup
    shard = tiny_meds.root / "data/held_out/0.parquet"
    _zone_data(tiny_meds.root, NY)
    ns = pa.timestamp("ns", tz=NY)
    before = np.datetime64("2024-11-03T05:50:00", "ns")  # 01:50 EDT
    after = np.datetime64("2024-11-03T06:40:00", "ns") + np.timedelta64(1, "ns")  # 01:40 EST
    old = pq.read_table(shard)
    old = old.set_column(old.column_names.index("time"), "time", old["time"].cast(ns))
    extra = pa.table({"subject_id": pa.array([6, 6], pa.int64()),
                      "time": pa.array([before, after], pa.timestamp("ns")).cast(ns),
                      "code": [stats.codes[0]] * 2,
                      "numeric_value": pa.array([1.0, 2.0], pa.float32())})
    pq.write_table(pa.concat_tables([old, extra]), shard)
    t_pred = before + np.timedelta64(500, "ns")
    pq.write_table(pa.table({
        "subject_id": pa.array([6], pa.int64()),
        "prediction_time": pa.array([t_pred], pa.timestamp("ns")).cast(ns),
        "boolean_value": [True]}), tmp_path / "labels.parquet")
    (w,) = labels.label_windows(tiny_meds.root, tmp_path / "labels.parquet", stats, MAX_LEN)
    assert int(w["end_time_us"]) == int(before.astype("datetime64[us]").astype(np.int64))


def test_label_files_of_one_task_share_a_zone(tmp_path):
    pairs = [(1, T0)]
    _write_labels(tmp_path / "train.parquet", pairs, NY)
    _write_labels(tmp_path / "tuning.parquet", pairs, NY)
    assert labels.prediction_time_zone(labels.label_files(tmp_path)) == NY
    _write_labels(tmp_path / "tuning.parquet", pairs, None)
    with pytest.raises(meds.MEDSFormatError, match=f"tuning.parquet: column prediction_time has "
                                                   f"no time zone .* but .*train.parquet's has "
                                                   f"time zone {NY}"):
        labels.prediction_time_zone(labels.label_files(tmp_path))


def test_prepare_says_which_data_files_carry_a_zone(tiny_meds):
    from cvmae_jax.data.stream import SplitLookup, scan_meds

    _zone_data(tiny_meds.root, NY, only=tiny_meds.root / "data/train/nested/1.parquet")
    lines = []
    scan = scan_meds(tiny_meds.root, SplitLookup(meds.read_subject_splits(tiny_meds.root)),
                     log=lines.append)
    assert f"[prepare] column time carries a time zone ({NY} in 1 of 4 files): read as UTC " \
           "instants" in "\n".join(lines)
    assert {f["file"]: f["time_zone"] for f in scan.files}["data/train/nested/1.parquet"] == NY
    (warning,) = scan.warnings
    assert warning.startswith(f"column time carries a time zone in 1 of 4 data files ({NY} in "
                              "1) and none in 3")
