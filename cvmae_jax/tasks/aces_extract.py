"""Label rows of one ACES task config over a MEDS dataset, via ACES's Python API.

ACES (package ``es-aces``, the ``[tasks]`` extra) reads one data shard at a time; a MEDS
subject's events are all in one shard, so the shards' cohorts together are the dataset's.
The config is loaded afresh for every shard: ACES's query changes the loaded config's windows.
"""

from __future__ import annotations

import logging as std_logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from cvmae_jax.data import meds as meds_files
from cvmae_jax.data.labels import empty_label_table


def import_aces():
    """(aces.config, aces.predicates, aces.query, omegaconf.DictConfig); ImportError with the
    install line when ACES is absent."""
    try:
        from aces import config, predicates, query
        from omegaconf import DictConfig
    except ImportError as error:
        raise ImportError("the labels command needs ACES: pip install -e '.[tasks]' in the "
                          f"checkout (es-aces; {error})") from None
    return config, predicates, query, DictConfig


def load_task_config(path: Path):
    """The parsed ACES task config; ValueError naming the file and ACES's complaint."""
    config, *_ = import_aces()
    try:
        return config.TaskExtractorConfig.load(config_path=Path(path))
    except Exception as error:  # noqa: BLE001 - ACES raises many types for a bad config
        message = _one_line(error)
        raise ValueError(f"{path}: not a valid ACES task config: {message}") from None


def extract_labels(config_path: Path, meds_dir: str | Path) -> pa.Table:
    """The task's label rows over every data shard of meds_dir: subject_id int64,
    prediction_time timestamp[us] (the data's time zone, if any), boolean_value bool (true when
    the config's label predicate occurs in its label window), [N] rows sorted by
    (subject_id, prediction_time). ValueError naming the shard if ACES fails on one."""
    _, predicates, query, DictConfig = import_aces()
    load_task_config(config_path)  # a bad config is named before any data is read
    parts = []
    aces_log = std_logging.getLogger("aces")
    level = aces_log.level
    aces_log.setLevel(std_logging.ERROR)  # per-shard notes ("all labels the same") mislead
    try:
        for shard in meds_files.data_files(meds_dir):
            task = load_task_config(config_path)
            try:
                found = query.query(task, predicates.get_predicates_df(
                    task, DictConfig({"path": str(shard), "standard": "meds"})))
            except Exception as error:  # noqa: BLE001 - polars/ACES errors of many types
                message = _one_line(error)
                raise ValueError(f"{shard}: ACES could not extract task {config_path}: "
                                 f"{message}") from None
            if len(found):
                parts.append(found.select("subject_id", "index_timestamp", "label").to_arrow())
    finally:
        aces_log.setLevel(level)
    return _label_table(parts)


def _one_line(error: Exception) -> str:
    """The error's message on one line (a KeyError's without its quotes)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def _label_table(parts: list[pa.Table]) -> pa.Table:
    if not parts:
        return empty_label_table()
    table = pa.concat_tables(parts, promote_options="permissive")
    zone = table.schema.field("index_timestamp").type.tz
    subject = table["subject_id"].cast(pa.int64())
    time = table["index_timestamp"].cast(pa.timestamp("us", tz=zone))
    order = np.lexsort((time.cast(pa.int64()).to_numpy(), subject.to_numpy()))
    label = np.asarray(table["label"].to_numpy(zero_copy_only=False)) > 0  # a count in ACES
    return pa.table({"subject_id": subject.take(order), "prediction_time": time.take(order),
                     "boolean_value": pa.array(label[order], pa.bool_())})
