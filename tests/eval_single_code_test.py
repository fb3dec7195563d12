"""Single-code reconstruction and separate targets in the eval step: constructed known answers
with stand-in models whose predictions we know, and mask independence from the model."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvmae_jax.reconstruction import accumulate_sums, single_code_sums, summarize, vs_baseline
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import init_state, make_eval_step, make_optimizer

from train_test import tiny_config

V, L = 6, 12


class Echo(nnx.Module):
    """Predicts scale * the values it reads: scale 1 reads the hidden values too (a perfect
    model), scale 0 predicts every code's train mean (the baseline)."""

    def __init__(self, scale):
        self.scale = nnx.Param(jnp.float32(scale))

    def __call__(self, times, codes, values, value_mask, valid, segment_ids=None):
        return values * self.scale[...]


class MaskEcho(nnx.Module):
    """Predicts 1 where the value it was told is hidden, else 0."""

    def __init__(self):
        self.unused = nnx.Param(jnp.zeros(()))

    def __call__(self, times, codes, values, value_mask, valid, segment_ids=None):
        return value_mask.astype(jnp.float32) + 0 * self.unused[...]


def _batches(seed=0, n=2, rows=4):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        lengths = rng.integers(0, L + 1, rows)
        valid = np.arange(L)[None] < lengths[:, None]
        out.append(dict(times=np.cumsum(rng.random((rows, L)), 1).astype(np.float32),
                        codes=np.where(valid, rng.integers(0, V, (rows, L)), 0).astype(np.int32),
                        values=np.where(valid, rng.normal(size=(rows, L)), 0).astype(np.float32),
                        valid=valid,
                        example_id=np.arange(b * rows, (b + 1) * rows, dtype=np.int32)))
    return out


def _counting_step(module, mode="single_code"):
    graphdef, params = nnx.split(module, nnx.Param)
    traces = []
    body = make_eval_step(graphdef, V, 0.3, 7, mode=mode)

    def counted(*args):
        traces.append(1)
        return body(*args)

    return jax.jit(counted), params, traces


def _code_counts(batches):
    return sum(np.bincount(b["codes"][b["valid"]], minlength=V) for b in batches)


def test_perfect_model_scores_zero_and_constant_model_the_baseline():
    batches = _batches()
    counts = _code_counts(batches)
    assert (counts > 0).all()
    perfect_step, perfect, traces = _counting_step(Echo(1.0))
    sums = single_code_sums(perfect_step, perfect, batches, V, lambda b: b)
    np.testing.assert_array_equal(sums["count"], counts)  # every value hidden exactly once
    np.testing.assert_array_equal(sums["sse"], 0.0)
    assert len(traces) == 1  # one compile for every code and batch
    const_step, const, _ = _counting_step(Echo(0.0))
    sums = single_code_sums(const_step, const, batches, V, lambda b: b)
    np.testing.assert_allclose(sums["sse"], sums["baseline_sse"], rtol=1e-6)
    expected = [sum(float(np.square(b["values"][b["valid"] & (b["codes"] == c)]).sum())
                    for b in batches) for c in range(V)]
    np.testing.assert_allclose(sums["baseline_sse"], expected, rtol=1e-5)
    norm_std = np.arange(1.0, V + 1.0)  # raw units: each code's normalization scale
    summary = summarize(sums, tuple(f"c{i}" for i in range(V)), norm_std)
    for row, scale in zip(summary["per_code"], norm_std):
        assert row["mse"] == pytest.approx(row["baseline_mse"], rel=1e-6)
        assert row["raw_rmse"] == pytest.approx(scale * np.sqrt(row["mse"]), rel=1e-12)
        assert row["raw_mae"] == pytest.approx(scale * row["mae"], rel=1e-12)
    assert summary["overall"]["num_masked"] == counts.sum()


def test_exactly_the_values_of_one_code_are_hidden_for_any_model():
    (batch,) = _batches(seed=1, n=1, rows=6)
    mask_step, mask_params, _ = _counting_step(MaskEcho())
    config = tiny_config("unused")
    models = [init_state(ModelConfig.from_config(config.model, V), make_optimizer(config.train),
                         seed) for seed in (0, 1)]
    step = jax.jit(make_eval_step(models[0][0], V, 0.3, 7, mode="single_code"))
    params = [state.params for _, state in models]
    for c in range(V):
        of_c = batch["valid"] & (batch["codes"] == c)
        # The model is told exactly the values of code c are hidden: error |1 - v| on them.
        sums = mask_step(mask_params, batch, np.int32(c))
        np.testing.assert_allclose(sums["sae"][c], np.abs(1 - batch["values"][of_c]).sum(),
                                   rtol=1e-5)
        counts = [np.asarray(step(p, batch, np.int32(c))["count"]) for p in params]
        expected = np.zeros(V)
        expected[c] = of_c.sum()
        for count in counts:  # the same hidden set whatever the parameters
            np.testing.assert_array_equal(count, expected)
    sse = [np.asarray(step(p, batch, np.int32(0))["sse"]) for p in params]
    assert not np.allclose(sse[0], sse[1])  # the two models do differ


def test_uniform_step_scores_against_separate_targets():
    batches = _batches(seed=2)
    step, params, traces = _counting_step(Echo(1.0), mode="uniform")
    same = [dict(b, targets=b["values"]) for b in batches]  # one compile for both calls
    clean = accumulate_sums(step, params, same, lambda b: b)
    assert clean["count"].sum() > 0
    np.testing.assert_array_equal(clean["sse"], 0.0)
    zeroed = [dict(b, values=np.zeros_like(b["values"]), targets=b["values"]) for b in batches]
    corrupted = accumulate_sums(step, params, zeroed, lambda b: b)
    assert len(traces) == 1
    np.testing.assert_array_equal(corrupted["count"], clean["count"])  # same uniform mask
    np.testing.assert_allclose(corrupted["sse"], corrupted["baseline_sse"], rtol=1e-6)
    np.testing.assert_allclose(corrupted["baseline_sse"], clean["baseline_sse"], rtol=1e-6)
    assert corrupted["sse"].sum() > 0


def test_a_constant_code_has_no_ratio_to_its_baseline_and_is_left_out_of_the_plot(tmp_path):
    """A code constant on train (held_out values = its train mean, baseline MSE 0) gave
    ratios of ~1e10, and a y axis that hid every other lab in reconstruction_by_lab.png."""
    from cvmae_jax.evaluation import report

    rows = [dict(code=f"LAB//{i}", name=f"LAB//{i}", num_masked=10, mse=mse, baseline_mse=base,
                 cv=0.1 * i)
            for i, (mse, base) in enumerate([(0.5, 1.0), (0.8, 0.8), (3e-4, 0.0)])]
    assert [vs_baseline(r) for r in rows] == [0.5, 1.0, None]
    result = dict(per_code=rows, split="held_out", cv_threshold=0.15)
    with mock.patch.object(report.plt.Axes, "bar") as bar:
        report.plot_by_lab(str(tmp_path / "by_lab.png"), result)
    assert list(bar.call_args.args[1]) == [0.5, 1.0]
    assert (tmp_path / "by_lab.png").exists()
