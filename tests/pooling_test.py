"""Window vectors for the frozen probe (pooling.py) and the probe on the untrained network."""

import jax
import numpy as np
import pytest

from cvmae_jax.evaluation.downstream import (TaskData, embed_label_windows, fit_task_probe,
                                             make_embed_fn)
from cvmae_jax.evaluation.untrained_probe import untrained_probe
from cvmae_jax.model import ModelConfig
from cvmae_jax.config_checks import POOLINGS
from cvmae_jax.pooling import DESCRIPTIONS, per_code_pool, pool, pooled_width
from cvmae_jax.steps import init_state, make_optimizer

from train_test import tiny_config

VOCAB = 6


def test_per_code_pool_averages_each_code_apart_and_ignores_padding():
    hidden = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    codes = np.array([[2, 0, 2, 5, 1], [4, 4, 0, 0, 0]], np.int32)
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)  # code 1 only on padding
    out = np.asarray(per_code_pool(hidden, codes, valid, VOCAB))
    assert out.shape == (2, pooled_width("per_code", 3, VOCAB)) == (2, 3 + VOCAB * 4)
    mean, present = out[:, :3], out[:, -VOCAB:]
    by_code = out[:, 3:3 + VOCAB * 3].reshape(2, VOCAB, 3)
    np.testing.assert_allclose(mean[0], hidden[0, :4].mean(0))
    np.testing.assert_allclose(by_code[0, 2], hidden[0, [0, 2]].mean(0))
    np.testing.assert_allclose(by_code[0, 5], hidden[0, 3])
    np.testing.assert_array_equal(by_code[0, 1], 0.0)  # padding's code is absent
    np.testing.assert_array_equal(present[0], [1, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(present[1], [0, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(by_code[1, 4], hidden[1, :2].mean(0))
    np.testing.assert_allclose(np.asarray(pool("mean", hidden, codes, valid, VOCAB)), mean)


def test_per_code_last_pool_keeps_each_codes_latest_state():
    hidden = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    codes = np.array([[2, 0, 2, 5, 2], [4, 4, 0, 0, 0]], np.int32)
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)  # code 2 last on padding
    out = np.asarray(pool("per_code_last", hidden, codes, valid, VOCAB))
    assert out.shape == (2, pooled_width("per_code_last", 3, VOCAB))
    averaged = np.asarray(per_code_pool(hidden, codes, valid, VOCAB))
    np.testing.assert_array_equal(out[:, :3], averaged[:, :3])  # the window's mean
    np.testing.assert_array_equal(out[:, -VOCAB:], averaged[:, -VOCAB:])  # presence
    by_code = out[:, 3:3 + VOCAB * 3].reshape(2, VOCAB, 3)
    np.testing.assert_array_equal(by_code[0, 2], hidden[0, 2])  # the later of positions 0, 2
    np.testing.assert_array_equal(by_code[0, 0], hidden[0, 1])
    np.testing.assert_array_equal(by_code[0, 1], 0.0)  # absent
    np.testing.assert_array_equal(by_code[1, 4], hidden[1, 1])
    np.testing.assert_array_equal(by_code[1, 0], 0.0)  # only on padding: absent


def test_per_code_last_max_pool_adds_each_codes_elementwise_maximum():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 3)).astype(np.float32)
    hidden[0, 4] = 100.0  # a padding event's state never wins
    codes = np.array([[2, 0, 2, 5, 2], [4, 4, 0, 0, 0]], np.int32)
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    out = np.asarray(pool("per_code_last_max", hidden, codes, valid, VOCAB))
    assert out.shape == (2, pooled_width("per_code_last_max", 3, VOCAB)) == (2, 3 + VOCAB * 7)
    last = np.asarray(pool("per_code_last", hidden, codes, valid, VOCAB))
    np.testing.assert_array_equal(out[:, :3 + VOCAB * 3], last[:, :3 + VOCAB * 3])
    np.testing.assert_array_equal(out[:, -VOCAB:], last[:, -VOCAB:])  # presence last
    maximum = out[:, 3 + VOCAB * 3:-VOCAB].reshape(2, VOCAB, 3)
    np.testing.assert_array_equal(maximum[0, 2], hidden[0, [0, 2]].max(0))  # per dimension
    np.testing.assert_array_equal(maximum[0, 5], hidden[0, 3])
    np.testing.assert_array_equal(maximum[1, 4], hidden[1, :2].max(0))
    np.testing.assert_array_equal(maximum[0, [1, 3, 4]], 0.0)  # absent codes
    np.testing.assert_array_equal(maximum[1, 0], 0.0)  # only on padding: absent


def test_per_code_last_max_pool_passes_gradients_to_the_maximal_states():
    hidden = np.array([[[1.0, 5.0], [3.0, 5.0], [9.0, 9.0]],  # code 1: a tie in dimension 1
                       [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]]], np.float32)  # all padding
    codes = np.array([[1, 1, 0], [0, 1, 2]], np.int32)
    valid = np.array([[1, 1, 0], [0, 0, 0]], bool)
    d, v = 2, 3

    def code_1_maximum(h):
        out = pool("per_code_last_max", h, codes, valid, v)
        return out[0, d + v * d + d:d + v * d + 2 * d].sum()  # row 0, code 1's maximum

    grad = np.asarray(jax.grad(code_1_maximum)(hidden))
    np.testing.assert_array_equal(grad[0], [[0.0, 0.5], [1.0, 0.5], [0.0, 0.0]])  # tie split
    everything = jax.grad(lambda h: pool("per_code_last_max", h, codes, valid, v).sum())(hidden)
    assert np.isfinite(np.asarray(everything)).all()  # absent codes, an empty row
    np.testing.assert_array_equal(np.asarray(everything)[1], 0.0)  # padding never contributes


def test_every_pooling_has_a_description_and_unknown_widths_are_refused():
    assert set(DESCRIPTIONS) == set(POOLINGS)
    with pytest.raises(ValueError, match="config.eval.pooling='max'"):
        pooled_width("max", 3, VOCAB)


def test_unknown_pooling_names_the_field():
    with pytest.raises(ValueError, match="config.eval.pooling='max'"):
        pool("max", np.zeros((1, 2, 3)), np.zeros((1, 2), np.int32), np.ones((1, 2), bool), 4)


def test_a_per_code_pooling_without_the_vocabulary_is_refused_not_read_as_the_mean():
    assert pooled_width("mean", 3, 0) == 3
    with pytest.raises(ValueError, match="pooling 'per_code' needs the vocabulary size, got 0"):
        make_embed_fn(_network()[0][0], "per_code")


def _network(seed=0):
    config = tiny_config("unused")
    return init_state(ModelConfig.from_config(config.model, VOCAB), make_optimizer(config.train),
                      seed), config.model.d_model


def _window(codes):
    n = len(codes)
    return dict(times=np.arange(n, dtype=np.float32), codes=np.array(codes, np.int32),
                values=np.linspace(-1, 1, n).astype(np.float32))


@pytest.mark.parametrize("pooling", ["per_code", "per_code_last_max"])
def test_per_code_window_vectors_of_the_encoder(pooling):
    (graphdef, state), d = _network()
    embed_fn = make_embed_fn(graphdef, pooling, VOCAB)
    windows = [_window([]), _window([1, 3, 1, 2]), _window([1, 3, 1, 2])]
    x = embed_label_windows(graphdef, state.params, windows, 8, 2, embed_fn)
    assert x.shape == (3, pooled_width(pooling, d, VOCAB))
    np.testing.assert_array_equal(x[0], 0.0)  # an empty window
    np.testing.assert_allclose(x[1], x[2], rtol=1e-5, atol=1e-6)  # batch position/pad free
    np.testing.assert_array_equal(x[1, -VOCAB:], [0, 1, 1, 1, 0, 0])
    mean = embed_label_windows(graphdef, state.params, windows, 8, 2)  # the mean part
    np.testing.assert_allclose(x[:, :d], mean, rtol=1e-5, atol=1e-6)
    assert embed_label_windows(graphdef, state.params, [], 8, 2, embed_fn).shape == (
        0, pooled_width(pooling, d, VOCAB))
    assert len(embed_fn.traces) == 1


def _task(graphdef, params, embed_fn, seed, shift=2.0, noise=0.0):
    """Label windows whose values are shifted by ``shift`` for a positive label (plus normal
    noise of sd ``noise``), their vectors and the probe fit on them."""
    rng = np.random.default_rng(seed)
    windows, y = {}, {}
    for split, n in (("train", 40), ("tuning", 30), ("held_out", 30)):
        labels = rng.random(n) < 0.5
        labels[:2] = [True, False]
        windows[split] = [dict(_window(rng.integers(0, VOCAB, 6)), subject_id=i)
                          for i in range(n)]
        for w, label in zip(windows[split], labels):  # the label shows in the values
            w["values"] = (w["values"] + shift * label
                           + noise * rng.normal(size=len(w["values"]))).astype(np.float32)
        y[split] = labels
    x = {s: embed_label_windows(graphdef, params, ws, 8, 8, embed_fn) for s, ws in windows.items()}
    result, probe = fit_task_probe(x["train"], y["train"], x["tuning"], y["tuning"],
                                   x["held_out"], y["held_out"])
    return TaskData(None, windows, x, y, probe), result


def test_untrained_probe_is_the_same_probe_on_the_initial_network():
    (graphdef, state), _ = _network(seed=0)
    (_, other), _ = _network(seed=1)
    embed_fn = make_embed_fn(graphdef, "per_code", VOCAB)
    data, result = _task(graphdef, state.params, embed_fn, 0, shift=0.5, noise=1.0)
    same = untrained_probe(graphdef, state.params, data, result, 8, 8, embed_fn)
    assert same["auroc"] == pytest.approx(result["auroc"])  # the same network: no difference
    assert same["probe_minus_untrained"]["delta"] == pytest.approx(0.0, abs=1e-12)
    assert same["probe_minus_untrained"]["ci"] == pytest.approx([0.0, 0.0], abs=1e-12)
    moved = untrained_probe(graphdef, other.params, data, result, 8, 8, embed_fn)
    assert abs(moved["auroc"] - result["auroc"]) > 0.01  # so the delta's sign is tested
    assert moved["probe_minus_untrained"]["delta"] == pytest.approx(
        result["auroc"] - moved["auroc"])
    lo, hi = moved["probe_minus_untrained"]["ci"]
    assert lo <= moved["probe_minus_untrained"]["delta"] <= hi
    assert len(embed_fn.traces) == 1  # one compile for both networks
    no_auroc = untrained_probe(graphdef, other.params, data, dict(auroc=None, reason="one class"),
                               8, 8, embed_fn)
    assert no_auroc == dict(reason="as for the probe: one class")
