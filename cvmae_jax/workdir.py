"""The files of a training workdir: train.py writes them; eval.py, the study, ``--compare`` and
``load_trained`` read them (docs/training.md, *Outputs in the workdir*)."""

from __future__ import annotations

import os

import ml_collections
import pandas as pd

from cvmae_jax.config import default_config
from cvmae_jax.data.code_names import lab_names
from cvmae_jax.jsonio import read_json

CONFIG_FILE = "config.json"
DATA_STATS_FILE = "data_stats.json"
METRICS_FILE = "metrics.jsonl"
EVAL_METRICS_FILE = "metrics.json"  # in eval_dir
_FIRST_CODE_COLUMNS = ["code", "name", "count", "num_subjects", "mean", "std", "cv",
                       "mask_prob"]


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def eval_dir(workdir: str, split: str = "held_out", step: int | None = None) -> str:
    """Where eval.py writes: ``eval/`` for held_out (what the study and ``--compare`` read),
    ``eval_<split>/`` for another split, so evaluating it keeps the held_out results; for a
    chosen checkpoint ``step`` (not the newest by default) that name + ``_step<step>``."""
    name = "eval" if split == "held_out" else f"eval_{split}"
    return os.path.join(workdir, name if step is None else f"{name}_step{step}")


def eval_metrics_path(workdir: str, split: str = "held_out") -> str:
    """eval.py's ``metrics.json`` of ``split``."""
    return os.path.join(eval_dir(workdir, split), EVAL_METRICS_FILE)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config the run was trained with (its ``config.json``)."""
    return ml_collections.ConfigDict(_read(workdir, CONFIG_FILE))


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's ``config.json`` with the ``eval.*`` fields it lacks at their defaults: eval
    settings leave the trained model unchanged, so a run can be evaluated by a version of
    eval.py with more of them."""
    return with_eval_defaults(read_config(workdir))


def with_eval_defaults(config) -> ml_collections.ConfigDict:
    """A run's config (a dict or ConfigDict) as a ConfigDict with the ``eval.*`` fields it
    lacks at their defaults (``run_config``)."""
    config = ml_collections.ConfigDict(config)
    settings = default_config().eval
    settings.update(config.eval.to_dict())
    config.eval = settings
    return config


def read_data_stats(workdir: str) -> dict:
    """``data_stats.json``: the lab codes (the model's code ids index them), their statistics,
    the masking settings and the prepared dataset's id."""
    return _read(workdir, DATA_STATS_FILE)


def code_table(data_stats: dict) -> pd.DataFrame:
    """The lab codes of a run's ``data_stats.json`` (dict), index ``code_id`` (the model's
    code id): code, name (``code_names.lab_name``), count, num_subjects, mean, std, cv (raw
    train values), mask_prob (the run's masking), clip bounds and normalization moments."""
    rows = data_stats["codes"]  # a row without "description" is named by its code
    table = pd.DataFrame(rows).drop(columns="description", errors="ignore")
    table = table.rename_axis("code_id")
    table["name"] = lab_names([r["code"] for r in rows], [r.get("description") for r in rows])
    return columns_first(table, _FIRST_CODE_COLUMNS)


def columns_first(table: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    """``table`` with those of ``first`` it has as its first columns, in that order."""
    first = [c for c in first if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def read_eval_metrics(workdir: str) -> dict:
    """``eval/metrics.json`` of the held_out evaluation."""
    return read_json(eval_metrics_path(workdir),
                     f"run `python eval.py --workdir={workdir}` first")


def _read(workdir: str, name: str):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"{workdir}: a file, not a folder; --workdir is the folder train.py "
                         "wrote the run to")
    return read_json(os.path.join(workdir, name), f"is {workdir} a training workdir?")
