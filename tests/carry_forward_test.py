"""Carry-forward (LOCF) reconstruction baseline: a hand-made window with hand-computed values,
and the eval step's per-code sums against a plain loop under the same evaluation mask."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvmae_jax.carry_forward import carry_forward
from cvmae_jax.masking import sample_value_mask
from cvmae_jax.reconstruction import accumulate_sums, against_baselines, summarize
from cvmae_jax.steps import make_eval_step

from eval_single_code_test import V, Echo, _batches


def test_carry_forward_on_a_hand_made_window():
    codes = np.array([[0, 1, 0, 0, 1, 2, 0, 0]], np.int32)  # the last token is padding
    values = np.array([[1.0, 5.0, 2.0, 3.0, 6.0, 9.0, 4.0, 0.0]], np.float32)
    hidden = np.array([[0, 1, 0, 1, 1, 1, 1, 0]], bool)
    valid = np.array([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
    predictions, fallback = carry_forward(jnp.asarray(codes), jnp.asarray(values),
                                          jnp.asarray(valid & ~hidden))
    # hidden tokens: code 1 has no visible earlier value (its first one is hidden), nor has
    # code 2: both fall back to the mean (0); code 0 carries 2.0 (position 2) past the hidden 3.0
    at = hidden[0]
    np.testing.assert_array_equal(np.asarray(predictions)[0, at], [0.0, 2.0, 0.0, 0.0, 2.0])
    np.testing.assert_array_equal(np.asarray(fallback)[0, at], [True, False, True, True, False])
    assert np.asarray(predictions)[0, 2] == 1.0  # a visible token: the visible value before it


def _loop_carry_forward(codes, values, visible):
    """The same baseline as a plain loop over each row."""
    predictions, fallback = np.zeros_like(values), np.ones(codes.shape, bool)
    for b in range(codes.shape[0]):
        last = {}
        for i in range(codes.shape[1]):
            if codes[b, i] in last:
                predictions[b, i], fallback[b, i] = last[codes[b, i]], False
            if visible[b, i]:
                last[codes[b, i]] = values[b, i]
    return predictions, fallback


def test_eval_step_sums_match_a_loop_under_the_eval_mask():
    graphdef, params = nnx.split(Echo(0.0), nnx.Param)  # predicts the mean: MSE = baseline
    step = jax.jit(make_eval_step(graphdef, V, 0.5, 7))
    batches = _batches(seed=3, n=2, rows=6)
    sums = accumulate_sums(step, params, batches, lambda b: b)
    sse, fallbacks = np.zeros(V), np.zeros(V)
    for b in batches:
        hidden = np.asarray(sample_value_mask(jax.random.key(7), 0, b["example_id"], b["codes"],
                                              b["valid"], jnp.full((V,), 0.5)))
        pred, fb = _loop_carry_forward(b["codes"], b["values"], b["valid"] & ~hidden)
        np.add.at(sse, b["codes"][hidden], np.square(pred - b["values"])[hidden])
        np.add.at(fallbacks, b["codes"][hidden], fb[hidden])
    assert 0 < fallbacks.sum() < sums["count"].sum()  # both kinds of hidden value occur
    np.testing.assert_allclose(sums["locf_sse"], sse, rtol=1e-5)
    np.testing.assert_array_equal(sums["locf_fallbacks"], fallbacks)
    result = summarize(sums, tuple(map(str, range(V))), np.ones(V))
    overall = result["overall"]
    assert overall["locf_fallback_share"] == fallbacks.sum() / sums["count"].sum()
    np.testing.assert_allclose(overall["locf_masked_mse"], sse.sum() / sums["count"].sum())
    np.testing.assert_allclose(overall["mse_vs_locf"],
                               overall["masked_mse"] / overall["locf_masked_mse"])
    row = next(r for r in result["per_code"] if r["num_masked"])
    code = int(row["code"])
    np.testing.assert_allclose(row["locf_mse"], sse[code] / sums["count"][code], rtol=1e-5)


def test_the_console_line_puts_the_model_beside_both_simple_methods():
    overall = dict(masked_mse=0.5, baseline_masked_mse=1.0, mse_vs_baseline=0.5,
                   locf_masked_mse=0.4, mse_vs_locf=1.25)
    assert against_baselines(overall) == ("masked_mse 0.5000 (per-code mean 1.0000, ratio "
                                          "0.500; carry-forward 0.4000, ratio 1.250)")
    del overall["locf_masked_mse"], overall["mse_vs_locf"]  # a step without carry-forward
    assert against_baselines(overall) == "masked_mse 0.5000 (per-code mean 1.0000, ratio 0.500)"
