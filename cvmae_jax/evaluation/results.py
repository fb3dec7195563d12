"""Results as pandas DataFrames: the Python view of a run's ``data_stats.json`` and
``eval/metrics.json`` and of a study's ``summary.json`` (the JSON files stay what the tools
write; these functions read them).

    from cvmae_jax.evaluation import results
    labs = results.per_lab_table("runs/demo")      # one row per lab code of eval.py
    labs.sort_values("mse_vs_baseline").head()
    study = results.study_table("runs/study")      # one row per masking strategy
    diffs = results.study_lab_table("runs/study")  # one row per (strategy, lab) vs random
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cvmae_jax.evaluation.compare_summary import LAB_KINDS, SUMMARY_FILE
from cvmae_jax.evaluation.compared_runs import REFERENCE
from cvmae_jax.jsonio import read_json
from cvmae_jax.reconstruction import vs_baseline
from cvmae_jax.workdir import columns_first, eval_metrics_path

_FIRST_LAB_COLUMNS = ["code", "name", "cv", "train_mask_prob", "num_masked", "mse",
                      "baseline_mse", "mse_vs_baseline", "raw_rmse"]
def per_lab_table(workdir: str, split: str = "held_out", kind: str = "uniform"
                  ) -> pd.DataFrame:
    """eval.py's per-lab reconstruction of the run in ``workdir`` on ``split``, one row per
    lab code, index ``code_id``: code, name, cv (train), train_mask_prob, num_masked, mse and
    baseline_mse (normalized units), mse_vs_baseline (NaN for a code constant on train: no
    ratio), raw_rmse (the lab's units), then metrics.json's other per-code fields (NaN in the
    measured columns of a row ``suppressed`` for resting on too few subjects).
    ``kind="single_code"``: each code hidden in turn (config.eval.single_code)."""
    if kind not in LAB_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {LAB_KINDS}")
    path = eval_metrics_path(workdir, split)
    metrics = read_json(path, f"run `python eval.py --workdir={workdir} --split={split}` first")
    block = metrics if kind == "uniform" else metrics.get(kind)
    if not block:
        raise ValueError(f"{path}: no {kind} results (config.eval.single_code=False)")
    table = pd.DataFrame(block["per_code"]).rename_axis("code_id")
    table["mse_vs_baseline"] = [_ratio(row) for row in block["per_code"]]
    return columns_first(table, _FIRST_LAB_COLUMNS)


def study_table(study: str | dict) -> pd.DataFrame:
    """One row per masking strategy of a study or ``eval.py --compare`` (``study``: its
    workdir, or the summary that ``run_study``/``compare_runs`` return), index strategy:
    seeds, masked_mse (mean over seeds), against the paired random runs win_rate, n_labs,
    wilcoxon_p, cohens_d (per-lab MSE, uniform mask) and convergence_ratio (median), and per
    downstream task ``<task>_auroc`` (mean over seeds), ``<task>_auroc_delta``,
    ``<task>_auroc_delta_ci_low``, ``<task>_auroc_delta_ci_high`` (95% paired bootstrap). The
    random row has NaN comparisons."""
    summary = _summary(study)
    rows = []
    for strategy, entry in summary["strategies"].items():
        row = dict(strategy=strategy, seeds=entry["seeds"],
                   masked_mse=entry["masked_mse"]["mean"])
        vs = entry.get("vs_random")
        pooled = vs["reconstruction"]["uniform"].get("pooled", {}) if vs else {}
        row.update({k: pooled.get(k) for k in ("win_rate", "n_labs", "wilcoxon_p",
                                               "cohens_d")})
        row["convergence_ratio"] = vs["convergence"]["median"] if vs else None
        for task in summary["tasks"]:
            delta = vs["auroc_delta"][task] if vs else {}
            ci = delta.get("ci") or (None, None)
            row.update({f"{task}_auroc": entry["auroc"][task]["mean"],
                        f"{task}_auroc_delta": delta.get("delta"),
                        f"{task}_auroc_delta_ci_low": ci[0],
                        f"{task}_auroc_delta_ci_high": ci[1]})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("strategy")
    numeric = table.columns.drop("seeds")
    table[numeric] = table[numeric].apply(pd.to_numeric)
    table["n_labs"] = table["n_labs"].astype("Int64")  # <NA> in the random row
    return table


def study_lab_table(study: str | dict, kind: str = "uniform") -> pd.DataFrame:
    """One row per (strategy, lab) compared with ``random`` (``study`` as in
    ``study_table``): strategy, code, name, cv (train), num_masked, random_mse and
    strategy_mse (each averaged over the paired seeds, normalized units) and diff =
    random_mse - strategy_mse (positive: the strategy reconstructs the lab better)."""
    if kind not in LAB_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {LAB_KINDS}")
    summary = _summary(study)
    rows = [dict(strategy=strategy, **lab) for strategy, entry in summary["strategies"].items()
            if strategy != REFERENCE
            for lab in entry["vs_random"]["reconstruction"][kind].get("per_lab", [])]
    columns = ["strategy", "code", "name", "cv", "num_masked", "random_mse", "strategy_mse",
               "diff"]
    return pd.DataFrame(rows, columns=columns)


def _ratio(row: dict) -> float:
    """``vs_baseline`` of a per-code row; NaN without one or when the row is suppressed."""
    ratio = vs_baseline(row) if "mse" in row else None
    return np.nan if ratio is None else ratio


def _summary(study: str | dict) -> dict:
    if isinstance(study, dict):
        return study
    return read_json(os.path.join(study, SUMMARY_FILE),
                     f"run the study or `python eval.py --compare=... --workdir={study}` first")
