"""The compiled train step on a device mesh: compiles once, learns, and is layout-invariant."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cvmae_jax import parallel
from cvmae_jax.config import default_config
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import init_state, make_optimizer, make_train_step

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


def _setup(mesh, lr=3e-3):
    train_config = ml_collections.ConfigDict(default_config().train)
    train_config.learning_rate, train_config.warmup_steps, train_config.num_steps = lr, 5, 200
    optimizer = make_optimizer(train_config)
    graphdef, state = init_state(ModelConfig(vocab_size=V, d_model=32, num_heads=4,
                                             num_layers=1), optimizer, seed=0)
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


def test_one_and_eight_devices_give_the_same_step():
    rng = np.random.default_rng(3)
    batch = _batch(rng, 16)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state, step = _setup(mesh)
        state, metrics = step(state, parallel.global_batch(batch, mesh))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m8, p8) = results
    assert float(m1["num_masked"]) == float(m8["num_masked"])  # identical masks
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_devices_is_refused():
    with pytest.raises(ValueError, match="config.train.batch_size=12 must be divisible"):
        parallel.check_batch_size(12, 8, "config.train.batch_size")
