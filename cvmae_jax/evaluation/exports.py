"""Data exports of ``eval.py`` (they hold subject ids; logs never do).

- ``eval/embeddings/<task>.parquet``: subject_id int64, prediction_time timestamp[us] (in the
  label files' time zone, if they have one), split string, embedding list<float32> [W] (the
  vector the probe reads, ``pooling.pooled_width`` of config.eval.pooling): every label row of
  every split (train, tuning, held_out; each in label-file order) but those whose window is
  empty (``downstream.read_task``: nothing to embed).
- ``eval/predictions/<task>/<split>.parquet`` (MEDS-DEV prediction format): the label rows of
  the split (but those with an empty window) in label-file order with their columns as read
  (subject_id int64, prediction_time timestamp[us] with the label file's time zone, if any: the
  file's own values, so that predictions join back to it; boolean_value, optional
  integer/float/categorical_value), plus predicted_boolean_probability float64 (the probe fit on
  train, C chosen on tuning) and predicted_boolean_value (probability >= 0.5).
- ``eval/predictions_<model>/<task>/<split>.parquet``: the same rows and columns from another
  model: ``aggregates_logistic_regression``, ``aggregates_gradient_boosting``,
  ``probe_plus_aggregates`` (``aggregates``), ``pretrained``, ``scratch`` (``finetune``).

Files are written to a temporary name in the same folder and renamed. Exports of an earlier
evaluation that this one did not write (a model it did not fit, a task it did not find) are
removed after the new files are in place, so the folders hold what metrics.json reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from cvmae_jax.data import meds
from cvmae_jax.data.labels import (LABEL_CHECKS, OPTIONAL, empty_label_table, label_files,
                                   prediction_time_zone)
from cvmae_jax.evaluation.downstream import TEST, TUNING, TaskData
from cvmae_jax.jsonio import atomic_path

PREDICTION_SPLITS = (TUNING, TEST)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    """Writes ``table`` to ``path`` atomically (``jsonio.atomic_path``)."""
    with atomic_path(path, suffix=".parquet.tmp") as tmp:
        pq.write_table(table, tmp)


def embeddings_table(task: TaskData) -> pa.Table:
    """One row per label row of every split (see module docstring)."""
    splits = [s for s in meds.SPLITS if s in task.windows]
    windows = [w for s in splits for w in task.windows[s]]
    x = np.concatenate([task.x[s] for s in splits]).astype(np.float32)
    width = x.shape[1] if x.ndim == 2 else 0
    return pa.table({
        "subject_id": pa.array([int(w["subject_id"]) for w in windows], pa.int64()),
        "prediction_time": pa.array([int(w["prediction_time_us"]) for w in windows], pa.timestamp(
            "us", tz=prediction_time_zone(label_files(task.task_dir)))),
        "split": pa.array([s for s in splits for _ in task.windows[s]], pa.string()),
        "embedding": list_column(x.reshape(len(windows), width)),
    })


LIST_VALUES_PER_CHUNK = 2**31 - 1  # a list array's int32 offsets address at most this many


def list_column(x: np.ndarray) -> pa.ChunkedArray:
    """The rows of ``x`` float32 [N, W] as a list<float32> column, in chunks of whole rows
    whose values fit a list array's int32 offsets (wide per-code vectors of many label rows
    exceed 2**31 values)."""
    n, width = x.shape
    rows = max(1, LIST_VALUES_PER_CHUNK // max(width, 1))
    chunks = [pa.ListArray.from_arrays(
        pa.array(np.arange(len(part) + 1, dtype=np.int64) * width, pa.int32()),
        pa.array(part.reshape(-1), pa.float32())) for part in np.split(x, range(rows, n, rows))]
    return pa.chunked_array(chunks, pa.list_(pa.float32()))


def label_rows(task: TaskData, split: str) -> pa.Table:
    """The label rows of ``split`` as read from the task's files, in the windows' order
    (label-file order), subject_id cast to int64 and prediction_time to timestamp[us] (its
    time zone kept)."""
    windows = task.windows[split]
    parts = []
    for f, path in enumerate(label_files(task.task_dir)):
        rows = [int(w["example_id"]) for w in windows if int(w["label_file"]) == f]
        if not rows:
            continue
        table = meds.read_small_parquet(path)
        keep = [c for c in (*LABEL_CHECKS, *OPTIONAL) if c in table.column_names]
        table = table.select(keep).take(pa.array(rows, pa.int64()))
        table = table.set_column(0, "subject_id", table["subject_id"].cast(pa.int64()))
        zone = table.schema.field("prediction_time").type.tz
        table = table.set_column(1, "prediction_time", meds.whole_microseconds(
            table["prediction_time"], round_up=False).cast(pa.timestamp("us", tz=zone)))
        parts.append(table)
    if not parts:
        return empty_label_table()
    table = pa.concat_tables(parts, promote_options="permissive")
    times = table["prediction_time"].cast(pa.int64()).to_numpy()
    if (table["subject_id"].to_pylist() != [int(w["subject_id"]) for w in windows]
            or not np.array_equal(times, [int(w["prediction_time_us"]) for w in windows])):
        raise AssertionError(f"{task.task_dir}: label rows of {split!r} do not line up with "
                             "their windows")
    return table


def predictions_table(task: TaskData, split: str) -> pa.Table | None:
    """MEDS-DEV predictions of ``split`` from the task's probe (None without a probe)."""
    if task.probe is None:
        return None
    return with_probabilities(task, split, task.probe.probability(task.x[split]))


def with_probabilities(task: TaskData, split: str, prob: np.ndarray) -> pa.Table:
    """The label rows of ``split`` (``label_rows``) with predicted_boolean_value and
    predicted_boolean_probability from ``prob`` float [N] (P(label = True), window order)."""
    prob = np.asarray(prob, np.float64)
    table = label_rows(task, split)
    return (table.append_column("predicted_boolean_value", pa.array(prob >= 0.5, pa.bool_()))
            .append_column("predicted_boolean_probability", pa.array(prob, pa.float64())))


def write_task_exports(eval_dir: str, name: str, task: TaskData) -> dict:
    """Writes the task's embeddings and predictions; returns {"embeddings": rows,
    "predictions": {split: rows}} (predictions empty without a probe)."""
    table = embeddings_table(task)
    write_parquet_atomic(table, os.path.join(eval_dir, "embeddings", f"{name}.parquet"))
    written = dict(embeddings=table.num_rows, predictions={})
    for split in PREDICTION_SPLITS:
        predictions = predictions_table(task, split)
        if predictions is not None:
            write_parquet_atomic(predictions,
                                 os.path.join(eval_dir, "predictions", name, f"{split}.parquet"))
            written["predictions"][split] = predictions.num_rows
    return written


def write_model_predictions(eval_dir: str, name: str, task: TaskData,
                            probabilities: dict[str, dict[str, np.ndarray]]) -> dict:
    """Writes ``predictions_<model>/<task>/<split>.parquet`` (MEDS-DEV format, as the probe's
    ``predictions/``) for each model of ``probabilities`` {model: {split: float64 [N]}};
    returns {model: {split: rows}}."""
    written = {}
    for model, by_split in probabilities.items():
        for split, prob in by_split.items():
            table = with_probabilities(task, split, prob)
            write_parquet_atomic(table, os.path.join(eval_dir, f"predictions_{model}", name,
                                                     f"{split}.parquet"))
            written.setdefault(model, {})[split] = table.num_rows
    return written


def remove_stale_exports(eval_dir: str, exports: dict, models: tuple[str, ...]) -> list[str]:
    """Removes what ``eval_dir`` holds of an earlier evaluation but ``exports`` (this one's
    {task: {"embeddings": rows, "predictions": {split: rows}, "models": {model: {split:
    rows}}}}) does not: ``embeddings/<task>.parquet``, ``predictions/<task>/`` and
    ``predictions_<model>/<task>/`` for the ``models`` eval.py writes (other folders and links
    are left alone), and the folders that leaves empty. Task names match case-insensitively,
    as on a case-insensitive disk. A file that cannot be removed is logged and left. Returns
    the removed paths relative to ``eval_dir``."""
    tasks = {task.casefold(): written for task, written in exports.items()}
    stale = [os.path.join("embeddings", f) for f in _listing(eval_dir, "embeddings")
             if f.endswith(".parquet") and f.removesuffix(".parquet").casefold() not in tasks]
    for folder in ("predictions", *(f"predictions_{m}" for m in models)):
        stale += [os.path.join(folder, task) for task in _listing(eval_dir, folder)
                  if os.path.isdir(os.path.join(eval_dir, folder, task))
                  and not _written(tasks.get(task.casefold()), folder)]
    removed = []
    for path in stale:
        full = os.path.join(eval_dir, path)
        try:
            if os.path.islink(full):
                continue
            if os.path.isdir(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
        except OSError as error:
            logging.warning("eval: could not remove %s of an earlier evaluation: %s", path,
                            error.strerror)
            continue
        removed.append(path)
        with contextlib.suppress(OSError):  # an empty folder left behind is harmless
            if not os.listdir(os.path.dirname(full)):
                os.rmdir(os.path.dirname(full))
    return removed


def _written(task_exports: dict | None, folder: str) -> bool:
    """Whether this evaluation wrote ``folder`` (predictions or predictions_<model>) of a task
    with ``task_exports`` (None: a task it did not evaluate)."""
    if not task_exports:
        return False
    if folder == "predictions":
        return bool(task_exports["predictions"])
    return folder.removeprefix("predictions_") in task_exports.get("models", {})


def _listing(eval_dir: str, folder: str) -> list[str]:
    """Sorted names in ``eval_dir/folder`` ([] when it is not a folder)."""
    path = os.path.join(eval_dir, folder)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
