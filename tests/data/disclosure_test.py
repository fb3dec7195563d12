"""Statistical disclosure control: no per-code aggregate rests on fewer than k subjects."""

import json

import numpy as np
import pyarrow as pa
import pytest

from cvmae_jax.data.disclosure import selectable_counts, subject_safe_bounds, suppress_rows
from cvmae_jax.data.prepare import prepare_dataset
from cvmae_jax.data.report import clipped_shares, clipped_warning
from cvmae_jax.data.stats import Reservoirs
from cvmae_jax.evaluation.report import evaluated_rows, suppressed_lines
from cvmae_jax.reconstruction import subjects_per_code

from meds_reference import compute_stats, read_numeric_events


def test_clip_bounds_rest_on_k_subjects():
    values = np.r_[np.arange(1.0, 21.0), 1000.0]  # subject 20 alone has the extreme 1000
    events = pa.table({"subject_id": np.arange(21), "code": ["x"] * 21, "numeric_value": values})
    plain = compute_stats(events, ["x"], (0.001, 0.999))
    assert plain.clip_high[0] > 900  # the 99.9% quantile: almost that one subject's value
    safe = compute_stats(events, ["x"], (0.001, 0.999), min_subjects=5)
    assert (safe.clip_low[0], safe.clip_high[0]) == (5.0, 17.0)  # 5 subjects at or beyond each
    few = compute_stats(events.slice(0, 6), ["x"], (0.001, 0.999), min_subjects=5)
    assert (few.clip_low[0], few.clip_high[0]) == (3.0, 4.0)  # half of its 6 subjects


def test_repeated_values_of_one_subject_count_once():
    events = pa.table({"subject_id": [0] * 5 + list(range(1, 11)), "code": ["x"] * 15,
                       "numeric_value": [99.0] * 5 + list(np.arange(1.0, 11.0))})
    stats = compute_stats(events, ["x"], (0.0, 1.0), min_subjects=3)
    assert stats.clip_high[0] == 9.0  # 99 (one subject, five values), 10, 9


def test_codes_with_few_train_subjects_are_not_selected(tiny_meds, tmp_path):
    prepared = prepare_dataset(tiny_meds.config(min_subjects=3), None, tmp_path)
    assert tiny_meds.C not in prepared.stats.codes  # 2 train subjects
    assert set(prepared.stats.codes) == {tiny_meds.A, tiny_meds.B, tiny_meds.D}
    assert prepared.report["selection"]["below_min_subjects"] == 1
    stats_file = json.loads((tmp_path.glob("**/data_stats.json").__next__()).read_text())
    assert tiny_meds.C not in {row["code"] for row in stats_file["codes"]}
    assert (prepared.stats.num_subjects >= 3).all()


def test_a_code_of_exactly_k_train_subjects_is_selectable():
    counts, subjects = {"LAB//k": 20, "LAB//fewer": 20}, {"LAB//k": 3, "LAB//fewer": 2}
    report = {}
    kept = selectable_counts(counts, subjects, {"min_subjects": 3}, report)
    assert kept == {"LAB//k": 20} and report["below_min_subjects"] == 1


def test_the_report_gives_each_codes_share_of_clipped_train_values(tiny_meds, tmp_path):
    prepared = prepare_dataset(tiny_meds.config(min_subjects=3), None, tmp_path)
    train = read_numeric_events(tiny_meds.root, "train")
    codes, quantiles = list(prepared.stats.codes), (0.001, 0.999)
    expected = compute_stats(train, codes, quantiles, min_subjects=3)
    np.testing.assert_array_equal(prepared.stats.clip_low, expected.clip_low)
    np.testing.assert_array_equal(prepared.stats.clip_high, expected.clip_high)
    assert not np.array_equal(expected.clip_high, compute_stats(train, codes, quantiles).clip_high)
    train = train.to_pandas()
    rows = prepared.report["codes"]
    for row, low, high in zip(rows, prepared.stats.clip_low, prepared.stats.clip_high):
        values = train.loc[train["code"] == row["code"], "numeric_value"].to_numpy()
        assert row["clipped_share"] == pytest.approx(np.mean((values < low) | (values > high)))
    assert max(r["clipped_share"] for r in rows) > 0
    table = next(tmp_path.glob("**/prepare_report.md")).read_text()
    assert "| clipped |" in table and f"| {rows[0]['clipped_share']:.1%} |" in table


@pytest.mark.parametrize("k, warned", [(5, True), (1, False)])
def test_bounds_the_subject_rule_moves_to_clip_heavily_are_warned_about(k, warned):
    values = np.r_[np.arange(1.0, 21.0), 1000.0]  # one subject each
    events = pa.table({"subject_id": np.arange(21), "code": ["x"] * 21, "numeric_value": values})
    stats = compute_stats(events, ["x"], (0.001, 0.999), min_subjects=k)
    reservoirs = Reservoirs(1, 21)
    reservoirs.add(np.zeros(21, np.int64), values, np.arange(21))
    clipped, by_quantiles = clipped_shares(stats, reservoirs, (0.001, 0.999))
    assert by_quantiles[0] == pytest.approx(2 / 21)  # 1 and 1000, beyond the quantiles
    assert clipped[0] == pytest.approx(8 / 21 if k == 5 else 2 / 21)  # bounds 5 and 17 at k=5
    warnings = clipped_warning(stats, clipped, by_quantiles, k)
    assert bool(warnings) == warned
    if warned:
        assert warnings[0].startswith("1 of 1 selected codes have more than 5% of their train "
                                      "values clipped (x 38.1% (the quantiles alone: 9.5%) to "
                                      "[5, 17], 21 subjects;")
        assert "config.data.min_subjects=5 subjects" in warnings[0]


def test_subjects_per_code_counts_each_subject_once(tiny_meds, tmp_path):
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path)
    np.testing.assert_array_equal(subjects_per_code(prepared, "train"),
                                  prepared.stats.num_subjects)
    held_out = subjects_per_code(prepared, "held_out")  # subject 6 only; no LAB//C there
    assert held_out.tolist() == [0 if c == tiny_meds.C else 1 for c in prepared.stats.codes]


def test_per_code_rows_of_few_subjects_or_values_are_suppressed():
    rows = [dict(code=c, num_masked=n, mse=0.5, rmse=0.7, mae=0.4, baseline_mse=1.0,
                 raw_rmse=2.0, raw_mae=1.0, cv=cv, train_mask_prob=0.2)
            for c, n, cv in (("a", 40, 0.1), ("b", 40, 0.2), ("c", 3, 0.3), ("d", 0, 0.4))]
    assert suppress_rows(rows, np.array([12, 4, 30, 30]), k=10) == (2, [])
    assert "mse" in rows[0] and not rows[0].get("suppressed")
    for row in rows[1:3]:  # b: values from 4 subjects; c: 3 hidden values
        assert row == dict(code=row["code"], cv=row["cv"], train_mask_prob=0.2, suppressed=True)
    assert rows[3]["num_masked"] == 0 and "suppressed" not in rows[3]  # nothing to hide
    result = dict(per_code=rows, suppressed=dict(rows=2, min_subjects=10))
    assert [r["code"] for r in evaluated_rows(result)] == ["a"]
    assert "2 code(s) not shown (config.data.min_subjects = 10): their values on this split " \
        "come from fewer than 10 subjects" in "\n".join(suppressed_lines(result))


def _rows(masked):
    return [dict(code=str(i), num_masked=n, mse=1.0) for i, n in enumerate(masked)]


def test_a_pooled_row_cannot_give_away_a_suppressed_one():
    rows = _rows([50, 30, 3, 40])  # code 2: 3 hidden values; tiers {0, 1, 2} and {3}
    tiers = (np.array([True, True, True, False]), np.array([False, False, False, True]))
    assert suppress_rows(rows, np.array([20, 20, 20, 20]), 10, tiers) == (2, [])
    assert [r.get("suppressed", False) for r in rows] == [False, True, True, False]  # tier -
    # code 0 = codes 1 and 2 together: 33 values of 20 subjects
    rows = _rows([50, 30, 40])  # codes 1 and 2 together come from 8 subjects at most
    assert suppress_rows(rows, np.array([20, 5, 3]), 10, (np.array([True, True, True]),)) == \
        (3, [])
    rows = _rows([50, 30])  # a tier whose every code has fewer than 10 subjects
    assert suppress_rows(rows, np.array([6, 4]), 10, (np.array([True, False]),
                                                     np.array([False, True]))) == (2, [0, 1])


def _bounds_reading_every_subject(values, subjects, quantiles, k):
    """subject_safe_bounds' definition, computed over the whole arrays."""
    low, high = np.quantile(values, quantiles)
    order = np.argsort(values, kind="stable")
    ascending, who = values[order], subjects[order]
    first_up = np.sort(np.unique(who, return_index=True)[1])
    first_down = np.sort(np.unique(who[::-1], return_index=True)[1])
    m = max(1, min(int(k), len(first_up) // 2))
    return (float(max(low, ascending[first_up[m - 1]])),
            float(min(high, ascending[::-1][first_down[m - 1]])))


@pytest.mark.parametrize("n,subjects,k", [(100_000, 5_000, 10), (100_000, 30, 10),
                                          (5_000, 3, 10), (2_000, 2_000, 300), (1, 1, 10),
                                          (50_000, 12, 5)])
def test_clip_bounds_equal_the_whole_array_definition(n, subjects, k):
    rng = np.random.default_rng(n + subjects + k)
    # a few subjects own the tails (many values each), ties from rounding
    who = rng.integers(0, subjects, n)
    values = np.round(rng.standard_normal(n) * (1 + (who < 3) * 20), 1)
    for q in ((0.001, 0.999), (0.0, 1.0), (0.1, 0.9)):
        assert subject_safe_bounds(values, who, q, k) == _bounds_reading_every_subject(
            values, who, q, k)
