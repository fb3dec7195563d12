"""Per-code train statistics: exact values, train-only, normalization, JSON round trip."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import meds
from cvmae_jax.data.stats import CodeMoments, DataStats

from meds_reference import compute_stats, read_numeric_events


def _stats(tiny_meds, quantiles=(0.001, 0.999)):
    train = read_numeric_events(tiny_meds.root, "train")
    return compute_stats(train, [tiny_meds.A, tiny_meds.B, tiny_meds.D], quantiles)


def test_exact_stats_match_numpy(tiny_meds):
    stats = _stats(tiny_meds, (0.1, 0.9))
    assert stats.codes == (tiny_meds.A, tiny_meds.B, tiny_meds.D) and stats.vocab_size == 3
    for i, code in enumerate(stats.codes):
        v = tiny_meds.values(code)
        assert stats.count[i] == len(v)
        np.testing.assert_allclose(stats.mean[i], v.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats.std[i], v.std(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.variance[i], v.var(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose([stats.clip_low[i], stats.clip_high[i]],
                                   np.quantile(v, [0.1, 0.9]), rtol=1e-12)
        clipped = np.clip(v, *np.quantile(v, [0.1, 0.9]))
        np.testing.assert_allclose([stats.norm_mean[i], stats.norm_std[i]],
                                   [clipped.mean(), clipped.std()], rtol=1e-12, atol=1e-12)
    a = tiny_meds.values(tiny_meds.A)
    np.testing.assert_allclose(stats.cv[0], a.std() / abs(a.mean()), rtol=1e-12)
    assert stats.cv[2] == 0.0  # LAB//D is constant
    np.testing.assert_array_equal(stats.num_subjects, [5, 5, 5])
    assert stats.mean.dtype == np.float64 and stats.count.shape == (3,)


def test_stats_ignore_tuning_and_held_out(tiny_meds):
    before = _stats(tiny_meds)
    for rel in ("data/tuning/0.parquet", "data/held_out/0.parquet"):
        table = pq.read_table(tiny_meds.root / rel)
        other = pc.is_in(table["subject_id"], pa.array([5, 6, 8]))
        scaled = pc.if_else(other, pc.multiply(table["numeric_value"], 1000.0),
                                    table["numeric_value"])
        pq.write_table(table.set_column(3, "numeric_value", scaled), tiny_meds.root / rel)
    after = _stats(tiny_meds)
    for field in ("count", "mean", "std", "cv", "clip_low", "clip_high", "norm_mean", "norm_std"):
        np.testing.assert_array_equal(getattr(before, field), getattr(after, field))


def test_cv_of_zero_mean_is_inf():
    events = pa.table({"subject_id": [1, 1], "code": ["x", "x"], "numeric_value": [-1.0, 1.0]})
    stats = compute_stats(events, ["x"], (0.0, 1.0))
    assert stats.cv[0] == np.inf and stats.std[0] == 1.0


def test_cv_of_a_negative_mean_is_std_over_its_magnitude():
    events = pa.table({"subject_id": [1, 2, 3], "code": ["x"] * 3,
                       "numeric_value": [-8.0, -10.0, -12.0]})
    stats = compute_stats(events, ["x"], (0.0, 1.0))
    np.testing.assert_allclose(stats.cv[0], np.std([8.0, 10.0, 12.0]) / 10.0, rtol=1e-12)


def test_code_without_train_values_is_an_error(tiny_meds):
    train = read_numeric_events(tiny_meds.root, "train")
    with pytest.raises(meds.MEDSFormatError, match="LAB//E//x"):
        compute_stats(train, [tiny_meds.A, tiny_meds.E], (0.0, 1.0))


def test_normalize_clips_then_zscores_and_round_trips(tiny_meds):
    stats = _stats(tiny_meds, (0.1, 0.9))
    idx = np.array([[0, 1], [2, 0]])
    raw = np.array([[stats.clip_low[0] + 0.5, stats.clip_high[1] + 100.0], [7.0, -1e9]])
    norm = stats.normalize(idx, raw)
    assert norm.dtype == np.float32 and norm.shape == (2, 2)
    np.testing.assert_allclose(norm[0, 0], (raw[0, 0] - stats.norm_mean[0]) / stats.norm_std[0],
                               rtol=1e-6)
    np.testing.assert_allclose(norm[0, 1],
                               (stats.clip_high[1] - stats.norm_mean[1]) / stats.norm_std[1],
                               rtol=1e-6)
    assert norm[1, 0] == 0.0  # constant code: clipped to its only value
    np.testing.assert_allclose(stats.denormalize(idx[0, :1], norm[0, :1]), raw[0, :1], rtol=1e-6)
    inside = np.clip(raw, stats.clip_low[idx], stats.clip_high[idx])
    np.testing.assert_allclose(stats.denormalize(idx, norm), inside, rtol=1e-5)


def test_json_round_trip_with_extra_and_inf(tmp_path, tiny_meds):
    stats = _stats(tiny_meds)
    stats = DataStats(**{**stats.__dict__, "cv": np.array([np.inf, 1.0, 0.0])})
    (tmp_path / "out").mkdir()
    path = tmp_path / "out/data_stats.json"
    stats.save_json(path, extra={"mask_prob": np.array([0.8, 0.2, 0.2])})
    assert [p.name for p in path.parent.iterdir()] == ["data_stats.json"]  # no temporary left
    d = json.loads(path.read_text())  # strict JSON: inf is written as a string
    assert d["codes"][0]["cv"] == "inf" and d["codes"][0]["mask_prob"] == 0.8
    assert set(d["codes"][1]) >= {"code", "count", "mean", "std", "cv", "variance", "clip_low",
                                  "clip_high", "num_subjects"}
    loaded = DataStats.from_dict(d)
    assert loaded.codes == stats.codes
    for field in ("count", "mean", "std", "cv", "variance", "clip_low", "clip_high",
                  "num_subjects"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(stats, field))


def test_moments_of_huge_values_do_not_overflow():
    values = np.array([0.0, 2e154] * 10)  # squared deviations 1e308: their sum overflowed
    events = pa.table({"subject_id": np.arange(20), "code": ["x"] * 20, "numeric_value": values})
    stats = compute_stats(events, ["x"], (0.0, 1.0))
    np.testing.assert_allclose([stats.mean[0], stats.std[0], stats.cv[0], stats.norm_std[0]],
                               [1e154, 1e154, 1.0, 1e154], rtol=1e-12)
    np.testing.assert_allclose(stats.variance[0], 1e308, rtol=1e-12)
    np.testing.assert_array_equal(stats.normalize(np.zeros(2, int), [0.0, 2e154]), [-1.0, 1.0])


def test_streamed_moments_rescale_exactly_when_larger_values_arrive():
    rng = np.random.default_rng(0)
    batches = [rng.normal(100, 3, 50) * 10.0 ** k for k in (-3, 0, 5, 2)]
    moments = CodeMoments()
    for b in batches:
        moments.add(pa.array(["x"] * len(b)), b, np.arange(len(b)))
    everything = np.concatenate(batches)
    np.testing.assert_allclose([moments.means()[0], moments.stds()[0]],
                               [everything.mean(), everything.std()], rtol=1e-12)


def test_values_whose_variance_passes_float64_refuse_the_code_by_name():
    values = np.array([1e307, 1.7e307] * 10)  # the sum of the values alone overflows
    events = pa.table({"subject_id": np.arange(20), "code": ["LAB//huge"] * 20,
                       "numeric_value": values})
    with pytest.raises(meds.MEDSFormatError, match=r"too large for float64 statistics "
                                                   r"\(LAB//huge;"):
        compute_stats(events, ["LAB//huge"], (0.001, 0.999))



def _within_subject_cv(subjects, values):
    """Median over subjects with >= 2 values of std / |mean| (numpy, one subject at a time)."""
    cvs = [v.std() / abs(v.mean()) for s in np.unique(subjects)
           if len(v := values[subjects == s]) >= 2]
    return np.median(cvs) if cvs else 0.0


def test_within_subject_cv_is_the_median_of_each_subjects_cv(tiny_meds):
    train = read_numeric_events(tiny_meds.root, "train").to_pandas()
    stats = _stats(tiny_meds)
    for i, code in enumerate(stats.codes):
        rows = train[train["code"] == code]
        np.testing.assert_allclose(stats.within_subject_cv[i], _within_subject_cv(
            rows["subject_id"].to_numpy(), rows["numeric_value"].to_numpy()), rtol=1e-12)
    assert stats.within_subject_cv[2] == 0.0  # LAB//D is constant


def test_within_subject_cv_leaves_out_the_spread_between_subjects():
    # two subjects steady at 10 and 1000: the population CV is large, each subject's is small
    values = np.array([9.0, 11.0, 990.0, 1010.0])
    events = pa.table({"subject_id": [1, 1, 2, 2], "code": ["x"] * 4, "numeric_value": values})
    stats = compute_stats(events, ["x"], (0.0, 1.0))
    assert stats.cv[0] > 0.9
    np.testing.assert_allclose(stats.within_subject_cv[0], np.median([1 / 10, 10 / 1000]))


def test_within_subject_cv_is_0_when_no_subject_has_two_values():
    events = pa.table({"subject_id": [1, 2, 3], "code": ["x"] * 3,
                       "numeric_value": [60.0, 70.0, 80.0]})
    stats = compute_stats(events, ["x"], (0.0, 1.0))
    assert stats.within_subject_cv[0] == 0.0 and stats.cv[0] > 0


def test_within_subject_cv_leaves_out_subjects_with_one_value():
    events = pa.table({"subject_id": [1, 1, 2, 3], "code": ["x"] * 4,
                       "numeric_value": [9.0, 11.0, 50.0, 70.0]})
    stats = compute_stats(events, ["x"], (0.0, 1.0))
    np.testing.assert_allclose(stats.within_subject_cv[0], 1.0 / 10.0, rtol=1e-12)


def test_within_subject_cv_joins_a_subjects_values_across_batches_and_merges_shards():
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 30, 400)
    values = rng.normal(50, 5, 400) * (1 + subjects)  # each subject on its own scale
    codes = np.where(rng.random(400) < 0.5, "x", "y")
    expected = [_within_subject_cv(subjects[codes == c], values[codes == c]) for c in "xy"]
    shards = [subjects < 12, subjects >= 12]  # a subject lies in one shard
    merged = CodeMoments()
    for shard in shards:
        moments = CodeMoments()
        for batch in np.array_split(np.flatnonzero(shard), 5):  # subjects span batches
            moments.add(pa.array(codes[batch]), values[batch], subjects[batch])
        moments.end_shard()
        merged.merge(moments)
    got = merged.within_subject_cvs()[[merged.index["x"], merged.index["y"]]]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_array_equal(merged.subjects[[merged.index["x"], merged.index["y"]]],
                                  [len(np.unique(subjects[codes == c])) for c in "xy"])


def test_statistics_written_without_within_subject_cv_read_it_as_nan(tmp_path, tiny_meds):
    record = _stats(tiny_meds).to_dict()
    for row in record["codes"]:
        del row["within_subject_cv"]
    loaded = DataStats.from_dict(record)
    assert np.isnan(loaded.within_subject_cv).all() and loaded.vocab_size == 3
