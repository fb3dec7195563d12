"""Label windows: only events at or before prediction_time; label file validation."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import labels, meds
from cvmae_jax.data.sequences import window_rows
from cvmae_jax.data.synthetic import generate_synthetic_meds

from meds_reference import compute_stats, read_numeric_events, train_code_counts


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels") / "meds"
    generate_synthetic_meds(root, num_subjects=60, seed=3)
    train = read_numeric_events(root, "train")
    codes = meds.select_lab_codes(train_code_counts(train), dict(min_code_count=5, top_k=20))
    return root, compute_stats(train, codes)


def test_windows_end_at_prediction_time(synthetic):
    root, stats = synthetic
    task = root / "labels/in_hospital_mortality_24h"
    (path,) = [p for p in labels.label_files(task) if p.stem == "tuning"]
    table = pq.read_table(path)
    events = read_numeric_events(root, "tuning", codes=stats.codes)
    ev_subject = events["subject_id"].to_numpy()
    ev_time = events["time"].cast(pa.int64()).to_numpy()
    windows = list(labels.label_windows(root, path, stats, max_len=16))
    assert sorted(int(w["example_id"]) for w in windows) == list(range(table.num_rows))
    assert sum(len(w["codes"]) == 16 for w in windows) > 0
    for w in windows:
        mine = ev_subject == w["subject_id"]
        eligible = np.sort(ev_time[mine & (ev_time <= w["prediction_time_us"])])
        n = len(w["codes"])
        assert n == min(16, len(eligible))
        assert w["end_time_us"] <= w["prediction_time_us"]  # nothing after prediction_time
        if n:
            assert w["start_time_us"] == eligible[-n] and w["end_time_us"] == eligible[-1]
            np.testing.assert_allclose(w["times"], (eligible[-n:] - eligible[-n]) / 3.6e9,
                                       rtol=1e-6, atol=1e-6)
        assert w["label"] == table["boolean_value"][int(w["example_id"])].as_py()
        assert w["codes"].dtype == np.int32 and w["values"].dtype == np.float32


def test_window_rows_keep_every_codes_latest_event():
    codes = np.array([7, 1, 1, 2, 1, 1, 1, 2, 1, 1])  # code 7 once, at the start
    np.testing.assert_array_equal(window_rows(codes, 4, False), [6, 7, 8, 9])
    np.testing.assert_array_equal(window_rows(codes, 4, True), [0, 7, 8, 9])
    np.testing.assert_array_equal(window_rows(codes, 3, True), [0, 7, 9])
    np.testing.assert_array_equal(window_rows(codes, 2, True), [7, 9])  # latest codes
    np.testing.assert_array_equal(window_rows(codes, 20, True), np.arange(10))
    assert window_rows(codes[:0], 4, True).size == 0


def test_each_code_latest_windows_hold_every_code_seen_before_prediction_time(synthetic):
    root, stats = synthetic  # 20 codes, windows of 24 events
    task = root / "labels/in_hospital_mortality_24h"
    (path,) = [p for p in labels.label_files(task) if p.stem == "tuning"]
    events = read_numeric_events(root, "tuning", codes=stats.codes)
    ev_subject = events["subject_id"].to_numpy()
    ev_time = events["time"].cast(pa.int64()).to_numpy()
    ev_code = np.array([stats.codes.index(c) for c in events["code"].to_pylist()])
    last = {int(w["example_id"]): w for w in labels.label_windows(root, path, stats, 24)}
    more_codes = 0
    for w in labels.label_windows(root, path, stats, 24, each_code_latest=True):
        eligible = (ev_subject == w["subject_id"]) & (ev_time <= w["prediction_time_us"])
        assert len(w["codes"]) == min(24, eligible.sum())
        assert set(w["codes"].tolist()) == set(ev_code[eligible].tolist())
        if len(w["codes"]):
            assert w["times"][0] == 0 and np.all(np.diff(w["times"]) >= 0)
        same_end = last[int(w["example_id"])]
        assert w["end_time_us"] == same_end["end_time_us"] <= w["prediction_time_us"]
        more_codes += len(set(w["codes"].tolist())) > len(set(same_end["codes"].tolist()))
    assert more_codes > 0  # the last 24 events of some windows miss a code


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.drop_columns(["boolean_value"]), "column 'boolean_value' is missing"),
    (lambda t: t.append_column("extra", pa.array([1] * t.num_rows)), "unexpected columns"),
    (lambda t: t.rename_columns(["predictiontime" if c == "prediction_time" else c
                                 for c in t.column_names]),
     r"column 'prediction_time' is missing \(the file has \['predictiontime'\] instead\)"),
    (lambda t: t.set_column(0, "subject_id", pc.add(t["subject_id"], 10**9)),
     "rows refer to subjects missing from the subject splits"),
    (lambda t: t.set_column(0, "subject_id", pa.array([2**63 + 7] * t.num_rows, pa.uint64())),
     r"column subject_id: a value of type uint64 does not fit int64 \(out of range"),
    (lambda t: t.set_column(2, "boolean_value", pc.cast(t["boolean_value"], pa.int64())),
     r"column 'boolean_value' has unsupported type int64; expected bool \(0/1 integers: cast "
     r"them with pyarrow.compute.cast\(column, pyarrow.bool_\(\)\)\)"),
    (lambda t: t.set_column(1, "prediction_time", pc.cast(t["prediction_time"], pa.string())),
     r"column 'prediction_time' has unsupported type string; expected a timestamp"),
])
def test_bad_label_files(synthetic, tmp_path, change, problem):
    root, stats = synthetic
    path = tmp_path / "train.parquet"
    pq.write_table(change(pq.read_table(root / "labels/in_hospital_mortality_24h/train.parquet")),
                   path)
    with pytest.raises(meds.MEDSFormatError, match=f"train.parquet: .*{problem}"):
        next(labels.label_windows(root, path, stats, max_len=8))


def test_label_windows_leave_out_the_dropped_values(synthetic):
    root, stats = synthetic
    (path,) = [p for p in labels.label_files(root / "labels/in_hospital_mortality_24h")
               if p.stem == "tuning"]
    events = read_numeric_events(root, "tuning", codes=stats.codes)
    values = events["numeric_value"].to_numpy()
    common, counts = np.unique(values, return_counts=True)
    placeholder = float(common[np.argmax(counts)])  # the most repeated tuning value
    table = pq.read_table(path)
    ev_subject = events["subject_id"].to_numpy()
    ev_time = events["time"].cast(pa.int64()).to_numpy()
    expected = sum(int(((ev_subject == s) & (ev_time <= t) & (values == placeholder)).sum())
                   for s, t in zip(table["subject_id"].to_numpy(),
                                   table["prediction_time"].cast(pa.int64()).to_numpy()))
    kept = dataclasses.replace(stats, drop_values=(placeholder,))
    tokens = [sum(len(w["codes"]) for w in labels.label_windows(root, path, s, max_len=10**6))
              for s in (stats, kept)]
    assert expected > 0 and tokens[0] - tokens[1] == expected
