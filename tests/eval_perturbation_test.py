"""Corruptions of the visible context: known answers on constructed events, and the
downstream sensitivity with a stand-in encoder."""

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation.downstream import TaskData, embed_label_windows, fit_probe
from cvmae_jax.evaluation.perturbation import (corrupt_batches, corrupt_values, corrupt_windows,
                                               downstream_sensitivity)


def _events(seed=0, n=500, num_codes=7):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, num_codes, n)
    codes[-1] = num_codes  # a code with a single event
    return codes, rng.normal(size=n).astype(np.float32)  # distinct values name the events


def test_shuffle_within_code_moves_values_inside_their_code():
    codes, values = _events()
    out = corrupt_values(codes, values, "shuffle_within_code", np.random.default_rng(1))
    for c in np.unique(codes):
        mine = codes == c
        np.testing.assert_array_equal(np.sort(out[mine]), np.sort(values[mine]))  # multiset
        if mine.sum() > 1:
            assert (out[mine] != values[mine]).all()  # every event takes another's value
        else:
            assert out[mine] == values[mine]  # nothing to swap with
    same = corrupt_values(codes, values, "shuffle_within_code", np.random.default_rng(1))
    np.testing.assert_array_equal(out, same)
    other = corrupt_values(codes, values, "shuffle_within_code", np.random.default_rng(2))
    assert not np.array_equal(out, other)


def test_code_mean_and_unknown_kind():
    codes, values = _events()
    np.testing.assert_array_equal(corrupt_values(codes, values, "code_mean", None), 0.0)
    with pytest.raises(ValueError, match="perturbation kind"):
        corrupt_values(codes, values, "nope", np.random.default_rng(0))


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(3):
        valid = np.arange(10)[None] < rng.integers(0, 11, (4, 1))
        out.append(dict(codes=np.where(valid, rng.integers(0, 4, (4, 10)), 0).astype(np.int32),
                        values=np.where(valid, rng.normal(size=(4, 10)), 0).astype(np.float32),
                        valid=valid, example_id=np.arange(4, dtype=np.int32) + 4 * b))
    return out


def test_corrupt_batches_keep_targets_and_pool_the_whole_split():
    batches = _batches()
    zeroed = corrupt_batches(batches, "code_mean", 0)
    shuffled = corrupt_batches(batches, "shuffle_within_code", 0)
    for b, z, s in zip(batches, zeroed, shuffled):
        np.testing.assert_array_equal(z["values"], 0.0)  # visible values -> train mean
        for corrupted in (z, s):
            np.testing.assert_array_equal(corrupted["targets"], b["values"])  # targets intact
            for key in ("codes", "valid", "example_id"):
                np.testing.assert_array_equal(corrupted[key], b[key])
        np.testing.assert_array_equal(s["values"][~b["valid"]], 0.0)  # padding untouched
    flat = lambda bs, key: np.concatenate([b[key][b["valid"]] for b in bs])  # noqa: E731
    codes = flat(batches, "codes")
    moved = 0
    for c in np.unique(codes):
        before = np.sort(flat(batches, "values")[codes == c])
        after = flat(shuffled, "values")[codes == c]
        np.testing.assert_array_equal(np.sort(after), before)
        moved += (after != flat(batches, "values")[codes == c]).sum()
    assert moved == len(codes)  # every value moved (every code has several events)
    # Across batches: some values now come from another batch.
    first = set(flat(batches[:1], "values").tolist())
    assert not set(flat(shuffled[:1], "values").tolist()) <= first


def test_corrupt_windows():
    rng = np.random.default_rng(3)
    windows = [dict(codes=rng.integers(0, 3, n).astype(np.int32),
                    values=rng.normal(size=n).astype(np.float32), label=True)
               for n in (0, 5, 9, 1)]
    out = corrupt_windows(windows, "shuffle_within_code", 0)
    assert [len(w["values"]) for w in out] == [0, 5, 9, 1]
    assert all(w["values"].dtype == np.float32 and w["label"] for w in out)
    all_codes = np.concatenate([w["codes"] for w in windows])
    before = np.concatenate([w["values"] for w in windows])
    after = np.concatenate([w["values"] for w in out])
    for c in np.unique(all_codes):
        np.testing.assert_array_equal(np.sort(after[all_codes == c]),
                                      np.sort(before[all_codes == c]))
    assert all((w["values"] == 0).all() for w in corrupt_windows(windows, "code_mean", 0))
    np.testing.assert_array_equal(windows[1]["values"], before[:5])  # inputs not modified
    assert corrupt_windows([], "code_mean", 0) == []


def _mean_value_embed(params, batch):
    """A stand-in encoder: the window's mean value (one feature)."""
    valid = batch["valid"]
    return ((batch["values"] * valid).sum(1) / np.maximum(valid.sum(1), 1))[:, None]


def _task(rng, n):
    y = np.arange(n) % 3 == 0
    windows = [dict(times=np.arange(4, dtype=np.float32), codes=np.array([0, 1, 0, 1], np.int32),
                    values=(2.0 * label + rng.normal(size=4)).astype(np.float32), label=label)
               for label in y]
    x = embed_label_windows(None, None, windows, 8, 16, _mean_value_embed)
    return windows, x, y


def test_downstream_sensitivity_known_answers():
    rng = np.random.default_rng(0)
    (train_w, train_x, train_y), (test_w, test_x, test_y) = _task(rng, 60), _task(rng, 45)
    probe = fit_probe(train_x, train_y, 1.0)
    task = TaskData(None, dict(train=train_w, held_out=test_w),
                    dict(train=train_x, held_out=test_x), dict(train=train_y, held_out=test_y),
                    probe)
    clean_auroc = roc_auc_score(test_y, probe.decision(test_x))
    assert clean_auroc > 0.9
    zero = downstream_sensitivity(None, None, task, "code_mean", 0, 8, 16, _mean_value_embed)
    assert zero["n"] == 45 and zero["auroc_clean"] == pytest.approx(clean_auroc)
    assert zero["auroc_corrupted"] == pytest.approx(0.5)  # every window looks the same
    p0 = probe.probability(np.zeros((1, 1)))[0]
    assert zero["mean_abs_prob_change"] == pytest.approx(
        np.mean(np.abs(p0 - probe.probability(test_x))))
    shuffled = downstream_sensitivity(None, None, task, "shuffle_within_code", 0, 8, 16,
                                      _mean_value_embed)
    assert shuffled["auroc_corrupted"] < clean_auroc - 0.2  # values no longer the subject's own
    assert shuffled["auroc_ratio"] == pytest.approx(shuffled["auroc_corrupted"] / clean_auroc)
    assert downstream_sensitivity(None, None, dataclasses.replace(task, probe=None), "code_mean",
                                  0, 8, 16, _mean_value_embed)["auroc_corrupted"] is None
