"""The compiled train step on a device mesh: compiles once, learns, and is layout-invariant."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cvmae_jax import parallel
from cvmae_jax.data import packing
from cvmae_jax.config import default_config
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import (WindowTotals, init_state, make_optimizer, make_train_step,
                             make_window_step)

V, L = 6, 32


def _batch(rng, batch_size, first_id=0):
    codes = rng.integers(0, V, (batch_size, L)).astype(np.int32)
    # Each code's value is a noisy function of the subject's level: context predicts it.
    level = rng.normal(size=(batch_size, 1))
    values = (level * (1 + codes) / V + 0.1 * rng.normal(size=(batch_size, L))).astype(np.float32)
    lengths = rng.integers(L // 2, L + 1, batch_size)
    valid = np.arange(L)[None] < lengths[:, None]
    times = np.cumsum(rng.exponential(6.0, (batch_size, L)), axis=1).astype(np.float32)
    return dict(times=np.where(valid, times, 0), codes=np.where(valid, codes, 0),
                values=np.where(valid, values, 0).astype(np.float32), valid=valid,
                example_id=np.arange(first_id, first_id + batch_size, dtype=np.int32))


def _setup(mesh, lr=3e-3, previous_value_inputs=False):
    train_config = ml_collections.ConfigDict(default_config().train)
    train_config.learning_rate, train_config.warmup_steps, train_config.num_steps = lr, 5, 200
    optimizer = make_optimizer(train_config)
    graphdef, state = init_state(ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=1,
                                             previous_value_inputs=previous_value_inputs),
                                 optimizer, seed=0)
    probs = jnp.full((V,), 0.3)
    body = make_train_step(graphdef, optimizer, probs, jax.random.key(0), unmasked_weight=0.1)
    replicated = parallel.replicated_sharding(mesh)
    step = jax.jit(body, donate_argnums=0,
                   in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated))
    return jax.device_put(state, replicated), step


def test_step_compiles_once_and_the_loss_decreases():
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8  # tests run on 8 fake CPU devices (conftest)
    state, step = _setup(mesh)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(60):
        state, metrics = step(state, parallel.global_batch(_batch(rng, 16, 16 * i), mesh))
        losses.append(float(metrics["masked_mse"]))
    assert step._cache_size() == 1
    assert int(state.step) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("previous_value_inputs", [False, True])
def test_one_and_eight_devices_give_the_same_step(previous_value_inputs):
    rng = np.random.default_rng(3)
    batch = _batch(rng, 16)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state, step = _setup(mesh, previous_value_inputs=previous_value_inputs)
        state, metrics = step(state, parallel.global_batch(batch, mesh))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m8, p8) = results
    assert float(m1["num_masked"]) == float(m8["num_masked"])  # identical masks
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_packed_rows_give_the_step_of_one_example_per_row():
    """Masks are keyed by each event's position in its example, so packing the examples
    into shared rows hides the same values and gives the same loss."""
    batch = _batch(np.random.default_rng(5), 8)
    examples = [dict(times=batch["times"][i, :n], codes=batch["codes"][i, :n],
                     values=batch["values"][i, :n], example_id=batch["example_id"][i])
                for i, n in enumerate(batch["valid"].sum(axis=1))]
    packed = packing.pack_rows(examples, 2 * L, shuffle_seed=1)
    assert len(packed["codes"]) < 8  # some rows hold several examples
    mesh = parallel.make_mesh(jax.devices()[:1])
    metrics = []
    for rows in (batch, packed):
        state, step = _setup(mesh)
        metrics.append(jax.device_get(step(state, parallel.global_batch(rows, mesh))[1]))
    padded, in_rows = metrics
    assert float(padded["num_masked"]) == float(in_rows["num_masked"])
    np.testing.assert_allclose(padded["masked_sse"], in_rows["masked_sse"], rtol=1e-5)
    np.testing.assert_allclose(padded["loss"], in_rows["loss"], rtol=1e-5)


def test_batch_not_divisible_by_devices_is_refused():
    with pytest.raises(ValueError, match="config.train.batch_size=12 must be divisible"):
        parallel.check_batch_size(12, 8, "config.train.batch_size")


def test_window_totals_pool_the_steps_and_keep_the_first_non_finite_one():
    """The loop's carry sums the steps' metrics on the device; the host's summary of them is
    what per-step host averaging gave (pooled masked MSE and mask rate); the first step whose
    loss is not finite is kept with its values."""
    train_config = ml_collections.ConfigDict(default_config().train)
    optimizer = make_optimizer(train_config)
    graphdef, state = init_state(ModelConfig(vocab_size=V, d_model=32, num_heads=4,
                                             num_layers=1), optimizer, seed=0)
    body = make_train_step(graphdef, optimizer, jnp.full((V,), 0.3), jax.random.key(0), 0.1)
    step, window_step = jax.jit(body), jax.jit(make_window_step(body))
    rng = np.random.default_rng(1)
    carry, per_step = (state, jax.tree.map(jnp.asarray, WindowTotals.zeros())), []
    for i in range(3):
        batch = _batch(rng, 8, 8 * i)
        per_step.append(jax.device_get(step(carry[0], batch)[1]))
        carry, _ = window_step(carry, batch)
    totals = jax.device_get(carry[1])
    assert int(totals.steps) == 3 and int(totals.first_nonfinite) == 0
    summary = totals.summary()
    np.testing.assert_allclose(summary["loss"], np.mean([m["loss"] for m in per_step]),
                               rtol=1e-5)
    np.testing.assert_allclose(summary["masked_mse"],
                               sum(m["masked_sse"] for m in per_step)
                               / sum(m["num_masked"] for m in per_step), rtol=1e-5)
    np.testing.assert_allclose(summary["mask_rate"], sum(m["num_masked"] for m in per_step)
                               / sum(m["num_tokens"] for m in per_step), rtol=1e-6)
    for poisoned in (True, False, True):  # steps numbered 4 (not applied), 4, 5
        batch = _batch(rng, 8, 99)
        if poisoned:
            batch = dict(batch, values=np.full_like(batch["values"], np.nan))
        carry, _ = window_step(carry, batch)
    totals = jax.device_get(carry[1])
    assert int(totals.steps) == 6 and int(totals.first_nonfinite) == 4
    assert np.isnan(totals.nonfinite_values).all()
    assert int(carry[0].step) == 4  # the non-finite steps were not applied
