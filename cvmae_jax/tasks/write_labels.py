"""Writes a task's label rows as MEDS label files, one per split: ``<out>/<split>.parquet``.

Columns: subject_id int64, prediction_time timestamp[us], boolean_value bool, and
integer_value int64, float_value float32, categorical_value string, all null (the MEDS label
schema). A row's split is its subject's (metadata/subject_splits.parquet). The folder is built
beside ``<out>`` and renamed into place, so a failed run leaves no partial task.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvmae_jax.data import meds


def split_counts(labels: pa.Table, splits: np.ndarray) -> dict[str, dict]:
    """{split: {rows, subjects, positives, prevalence}} of labels [N] whose rows' splits are
    ``splits`` [N] (counts only)."""
    subjects = labels["subject_id"].to_numpy()
    positive = labels["boolean_value"].to_numpy(zero_copy_only=False)
    counts = {}
    for split in meds.SPLITS:
        mine = splits == split
        rows = int(mine.sum())
        counts[split] = dict(rows=rows, subjects=int(np.unique(subjects[mine]).size),
                             positives=int(positive[mine].sum()),
                             prevalence=float(positive[mine].mean()) if rows else float("nan"))
    return counts


def row_splits(labels: pa.Table, subject_splits: dict[int, str], source: str) -> np.ndarray:
    """The split of every label row [N]; MEDSFormatError when rows refer to subjects missing
    from the subject splits (``source`` names where the rows come from)."""
    splits = np.array([subject_splits.get(s, "") for s in labels["subject_id"].to_pylist()],
                      dtype=object)
    missing = int((splits == "").sum())
    if missing:
        raise meds.MEDSFormatError(f"{source}: {missing} label rows refer to subjects missing "
                                   "from the subject splits (metadata/subject_splits.parquet)")
    return splits


def check_train_positives(task: str, counts: dict[str, dict]) -> None:
    """ValueError when the task has no positive row in train (nothing to learn from)."""
    train = counts[meds.SPLITS[0]]
    if not train["positives"]:
        raise ValueError(f"task {task}: no positive label in train ({train['rows']} rows); "
                         "check the task config's predicates against the dataset's codes")


def label_table(labels: pa.Table) -> pa.Table:
    """labels [N] in the full MEDS label schema (the optional value columns null)."""
    n = labels.num_rows
    return pa.table({"subject_id": labels["subject_id"],
                     "prediction_time": labels["prediction_time"],
                     "boolean_value": labels["boolean_value"],
                     "integer_value": pa.nulls(n, pa.int64()),
                     "float_value": pa.nulls(n, pa.float32()),
                     "categorical_value": pa.nulls(n, pa.string())})


def check_output(out: Path, overwrite: bool) -> None:
    """FileExistsError when ``out`` exists, is not an empty folder and ``overwrite`` is off."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to replace "
                              "the task's label files")


def write_task_folder(out: Path, labels: pa.Table, splits: np.ndarray,
                      overwrite: bool) -> None:
    """Writes ``<out>/<split>.parquet`` for every split (empty files included, so each split's
    file exists). An existing non-empty ``out`` is replaced only when ``overwrite``
    (``check_output``)."""
    out = Path(os.path.abspath(out))
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        table = label_table(labels)
        for split in meds.SPLITS:
            rows = pa.array(np.flatnonzero(splits == split), pa.int64())
            pq.write_table(table.take(rows), tmp / f"{split}.parquet", compression="zstd")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
