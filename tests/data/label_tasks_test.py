"""Label tasks that yield nothing: empty windows counted and left out, a split with none usable
refused, folders and files that hold no task named."""

import datetime
import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import meds
from cvmae_jax.evaluation import downstream

from meds_reference import compute_stats, read_numeric_events, train_code_counts

HOUR = datetime.timedelta(hours=1)


@pytest.fixture
def setup(tiny_meds):
    train = read_numeric_events(tiny_meds.root, "train")
    stats = compute_stats(train, meds.select_lab_codes(train_code_counts(train),
                                                       tiny_meds.config()))
    return tiny_meds, stats


def _times(tiny_meds, subject):
    return sorted({r[1] for r in tiny_meds.rows if r[0] == subject and r[1] is not None})


def _write_task(tiny_meds, task, rows_of):
    """labels/<task>/labels.parquet with rows_of(subject, its event times) -> [(time, label)]
    for each subject of a split."""
    rows = [(s, t, label) for s in (1, 2, 3, 4, 7, 5, 6)
            for t, label in rows_of(s, _times(tiny_meds, s))]
    folder = tiny_meds.root / "labels" / task
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"subject_id": pa.array([r[0] for r in rows], pa.int64()),
                             "prediction_time": pa.array([r[1] for r in rows],
                                                         pa.timestamp("us")),
                             "boolean_value": [r[2] for r in rows]}), folder / "labels.parquet")


def _some_before_first_event(subject, times):
    """Both classes after some events; held_out's subject 6 also has a row before its first."""
    rows = [(times[4], subject % 2 == 0), (times[-1], subject % 2 == 1)]
    return rows + [(times[0] - HOUR, True)] if subject == 6 else rows


def test_a_split_whose_windows_are_all_empty_is_refused(setup):
    tiny_meds, stats = setup
    _write_task(tiny_meds, "early", lambda s, times: [(times[0] - HOUR, s % 2 == 0)]
                if s == 6 else [(times[4], s % 2 == 0), (times[-1], s % 2 == 1)])
    with pytest.raises(meds.MEDSFormatError, match=r"labels/early: all 1 held_out label rows "
                                                   r"have an empty window \(no selected lab event "
                                                   r"at or before their prediction_time"):
        downstream.read_label_tasks(str(tiny_meds.root), stats, 8)


@pytest.mark.parametrize("train_rows, positives", [(lambda s, times: [(times[4], False)], 0),
                                                    (lambda s, times: [], None)])
def test_a_train_split_without_both_classes_is_refused(setup, train_rows, positives):
    tiny_meds, stats = setup
    train = {int(s) for s, split in meds.read_subject_splits(tiny_meds.root).items()
             if split == "train"}
    _write_task(tiny_meds, "flat", lambda s, times: train_rows(s, times) if s in train
                else [(times[4], s % 2 == 0), (times[-1], s % 2 == 1)])
    rows = len(train) if positives == 0 else 0
    with pytest.raises(meds.MEDSFormatError, match=rf"labels/flat: the train split has {rows} "
                                                   rf"label rows with a window, 0 of them "
                                                   r"positive \(boolean_value true\): a probe "
                                                   r"needs both classes on train"):
        downstream.read_label_tasks(str(tiny_meds.root), stats, 8)


def _constant_embed(params, batch):
    return np.asarray(batch["valid"].sum(1, keepdims=True), np.float32)


_constant_embed.traces, _constant_embed.pooling = [], "mean"


def test_empty_windows_are_counted_and_left_out_of_the_metric(setup, caplog):
    tiny_meds, stats = setup
    _write_task(tiny_meds, "mixed", _some_before_first_event)
    with caplog.at_level(logging.WARNING):
        labels_dir, tasks = downstream.read_label_tasks(str(tiny_meds.root), stats, 8)
    task = tasks["mixed"]
    assert task.rows == dict(train=dict(rows=10, empty_windows=0),
                             tuning=dict(rows=2, empty_windows=0),
                             held_out=dict(rows=3, empty_windows=1))
    assert all(len(w["codes"]) for ws in task.windows.values() for w in ws)
    assert len(task.windows["held_out"]) == 2
    assert "mixed: label rows with an empty window (train 0 of 10, tuning 0 of 2, held_out 1 of " \
           "3)" in caplog.text
    result, data = downstream.probe_tasks(None, None, labels_dir, tasks, 8, 4,
                                          embed_fn=_constant_embed)
    r = result["tasks"]["mixed"]
    assert r["n"] == 2 and r["empty_windows"]["held_out"] == 1 and r["label_rows"]["held_out"] == 3
    assert len(data["mixed"].y["held_out"]) == 2
    text = "\n".join(downstream.report_lines(result))
    assert "- **Warning:** mixed: label rows with an empty window (train 0 of 10, tuning 0 of 2, " \
           "held_out 1 of 3): no selected lab event at or before their prediction_time; left " \
           "out of the probe, its metrics and the exports" in text


def test_a_copied_label_file_is_warned_about_in_counts(setup, caplog):
    """A stray copy in a subfolder is read too (ACES writes <task>/<split>/*.parquet), so the
    repeated rows are counted in a warning that holds no subject id."""
    tiny_meds, stats = setup
    _write_task(tiny_meds, "mixed", _some_before_first_event)
    with caplog.at_level(logging.WARNING):
        downstream.read_label_tasks(str(tiny_meds.root), stats, 8)
    assert "repeat another row" not in caplog.text
    (tiny_meds.root / "labels/mixed/old").mkdir()
    shutil.copy(tiny_meds.root / "labels/mixed/labels.parquet",
                tiny_meds.root / "labels/mixed/old/labels.parquet")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, tasks = downstream.read_label_tasks(str(tiny_meds.root), stats, 8)
    assert tasks["mixed"].rows["train"]["rows"] == 20
    assert ("labels/mixed: 15 label rows repeat another row's subject_id and prediction_time "
            "(the task's 2 files, subfolders included, are all read)") in caplog.text


def test_folders_and_files_that_hold_no_task_are_named(setup, caplog):
    tiny_meds, stats = setup
    _write_task(tiny_meds, "mixed", _some_before_first_event)
    (tiny_meds.root / "labels/empty").mkdir()
    (tiny_meds.root / "labels/csv_only").mkdir()
    (tiny_meds.root / "labels/csv_only/train.csv").write_text("subject_id\n1\n")
    shutil.copy(tiny_meds.root / "labels/mixed/labels.parquet", tiny_meds.root / "labels/x.parquet")
    os.symlink("/nowhere", tiny_meds.root / "labels/moved")
    with caplog.at_level(logging.WARNING):
        labels_dir, tasks = downstream.read_label_tasks(str(tiny_meds.root), stats, 8)
    assert list(tasks) == ["mixed"]
    for name, problem in (("csv_only", "a task folder without *.parquet label files, skipped"),
                          ("empty", "a task folder without *.parquet label files, skipped"),
                          ("x.parquet", "a label file outside a task folder"),
                          ("moved", "a symbolic link to /nowhere, which does not exist")):
        assert f"labels/{name}: {problem}" in caplog.text
    result, _ = downstream.probe_tasks(None, None, labels_dir, tasks, 8, 4,
                                       embed_fn=_constant_embed)
    assert f"- **Warning:** {labels_dir}/empty: a task folder without" in "\n".join(
        downstream.report_lines(result))
    only_empty = tiny_meds.root / "other_labels"
    (only_empty / "empty").mkdir(parents=True)
    result, _ = downstream.probe_tasks(None, None, str(only_empty), {}, 8, 4,
                                       embed_fn=_constant_embed)
    assert f"- **Warning:** {only_empty}/empty: a task folder" in "\n".join(
        downstream.report_lines(result))
