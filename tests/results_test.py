"""The pandas view of a run's data_stats.json and eval/metrics.json."""

import json

import numpy as np
import pandas as pd
import pytest

from cvmae_jax.evaluation import results
from cvmae_jax.workdir import code_table


def _write_metrics(workdir, **extra):
    rows = [dict(code="LAB//50912//mg/dL", name="Creatinine [mg/dL]", cv=0.5, num_masked=10,
                 mse=0.5, baseline_mse=1.0, train_mask_prob=0.3, raw_rmse=0.2),
            dict(code="LAB//X//UNK", name="LAB//X//UNK", cv=0.0, num_masked=4, mse=1e-9,
                 baseline_mse=0.0, train_mask_prob=0.3, raw_rmse=0.0),  # constant on train
            dict(code="LAB//Y//x", name="Y [x]", cv=0.2, train_mask_prob=0.3, suppressed=True)]
    (workdir / "eval").mkdir()
    (workdir / "eval" / "metrics.json").write_text(json.dumps(dict(per_code=rows, **extra)))


def test_per_lab_table_is_a_dataframe_by_code_id(tmp_path):
    _write_metrics(tmp_path)
    table = results.per_lab_table(str(tmp_path))
    assert isinstance(table, pd.DataFrame) and table.index.name == "code_id"
    assert list(table.columns[:4]) == ["code", "name", "cv", "train_mask_prob"]
    assert table.loc[0, "name"] == "Creatinine [mg/dL]" and table.loc[0, "mse_vs_baseline"] == 0.5
    assert np.isnan(table.loc[1, "mse_vs_baseline"])  # no ratio for a constant code
    assert table.loc[2, "suppressed"] and np.isnan(table.loc[2, ["mse", "mse_vs_baseline"]]).all()


def test_per_lab_table_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval/metrics.json: missing; run `python eval"):
        results.per_lab_table(str(tmp_path))
    _write_metrics(tmp_path)
    with pytest.raises(ValueError, match="no single_code results"):
        results.per_lab_table(str(tmp_path), kind="single_code")


def test_code_table_names_the_codes_of_data_stats():
    stats = dict(codes=[dict(code="LAB//50912//mg/dL", description="Creatinine", count=5,
                             num_subjects=2, mean=1.0, std=0.5, cv=0.5, mask_prob=0.4),
                        dict(code="LAB//X//UNK", description=None, count=3, num_subjects=1,
                             mean=2.0, std=0.0, cv=0.0, mask_prob=0.1)])
    table = code_table(stats)
    assert list(table["name"]) == ["Creatinine [mg/dL]", "LAB//X//UNK"]
    assert list(table.columns[:3]) == ["code", "name", "count"]
    assert "description" not in table and table.loc[1, "mask_prob"] == 0.1
    del stats["codes"][0]["description"]
    assert code_table(stats).loc[0, "name"] == "LAB//50912//mg/dL"
