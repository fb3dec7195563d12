"""A trained run in your own code: the model with a checkpoint's parameters, the lab statistics
it was trained with (the model's code ids index ``stats.codes``) and its config.

    from cvmae_jax.trained import load_trained
    from cvmae_jax.data.pipeline import padded_rows
    run = load_trained("runs/demo")               # the newest complete checkpoint
    batch = padded_rows(records, run.max_len)     # records of the prepared dataset
    states = run.encode(batch)                    # float32 [B, L, D]
    vectors = run.embed(batch)                    # float32 [B, D], mean over real events
    run.labs                                      # pandas DataFrame, one row per code id

Batches are dicts of numpy or jax arrays: ``times`` f32 [B, L] (hours since the window's first
event), ``codes`` i32 [B, L] (index into ``stats.codes``), ``values`` f32 [B, L] (normalized:
``stats.normalize``) and ``valid`` bool [B, L] (False on padding). Nothing is hidden unless a
``value_mask`` is passed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import pandas as pd
from flax import nnx

from cvmae_jax.attention import runnable_here
from cvmae_jax.checkpoint import Checkpointer
from cvmae_jax.data.stats import DataStats
from cvmae_jax.evaluation.results import code_table
from cvmae_jax.model import ModelConfig, ValueOnlyMAE, mean_pool
from cvmae_jax.steps import init_state, make_optimizer
from cvmae_jax.workdir import checkpoint_dir, read_config, read_data_stats


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: DataStats
    config: ml_collections.ConfigDict  # the run's config.json
    step: int  # the checkpoint's step
    labs: pd.DataFrame  # index code id: code, name, train statistics, mask_prob (code_table)

    @property
    def model(self) -> ValueOnlyMAE:
        """The Flax NNX module with these parameters (``model.encode``, ``model(...)``)."""
        return nnx.merge(self.graphdef, self.params)

    @property
    def max_len(self) -> int:
        """The window length the model was trained on (``config.data.max_len``)."""
        return int(self.config.data.max_len)

    def encode(self, batch: dict, value_mask=None) -> jax.Array:
        """Hidden states float32 [B, L, D]; ``value_mask`` bool [B, L] hides those values."""
        return _encode(self.graphdef, self.params, *_inputs(batch, value_mask))

    def embed(self, batch: dict) -> jax.Array:
        """One vector per row, float32 [B, D]: the hidden states averaged over the real events
        with no value hidden, as ``eval.py``'s probes and ``eval/embeddings`` use them."""
        return _embed(self.graphdef, self.params, *_inputs(batch, None))

    def predict(self, batch: dict, value_mask) -> jax.Array:
        """Reconstructed values float32 [B, L] in normalized units with the values at
        ``value_mask`` (bool [B, L]) hidden; ``stats.denormalize(batch["codes"], out)`` gives
        the lab's raw units."""
        return _predict(self.graphdef, self.params, *_inputs(batch, value_mask))


def load_trained(workdir: str, step: int | None = None) -> TrainedRun:
    """The run in ``workdir`` (written by train.py) at checkpoint ``step`` (default: the newest
    complete one), its parameters on this process's first device."""
    config = read_config(workdir)
    data_stats = read_data_stats(workdir)
    stats = DataStats.from_dict(data_stats)
    directory = checkpoint_dir(workdir)
    latest = Checkpointer.latest_complete_step(directory)
    if latest is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    step = latest if step is None else int(step)
    model_config = ModelConfig.from_config(config.model, stats.vocab_size)
    model_config = dataclasses.replace(  # cuDNN-trained runs load on a CPU too
        model_config, attention=runnable_here(model_config.attention, jax.default_backend()))
    graphdefs = []

    def fresh_state():
        graphdef, state = init_state(model_config, make_optimizer(config.train), config.seed)
        graphdefs.append(graphdef)
        return state

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(fresh_state))
    try:
        state = Checkpointer.restore_state(directory, step, abstract)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (the newest "
                                f"complete one is {latest})") from None
    return TrainedRun(graphdefs[0], state.params, stats, config, step, code_table(data_stats))


def _inputs(batch: dict, value_mask) -> tuple:
    valid = jnp.asarray(batch["valid"], bool)
    hidden = jnp.zeros_like(valid) if value_mask is None else jnp.asarray(value_mask, bool)
    return (jnp.asarray(batch["times"], jnp.float32), jnp.asarray(batch["codes"], jnp.int32),
            jnp.asarray(batch["values"], jnp.float32), hidden & valid, valid)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, times, codes, values, value_mask, valid) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model.encode(times, codes, values, value_mask, valid).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, params, times, codes, values, value_mask, valid) -> jax.Array:
    return mean_pool(_encode(graphdef, params, times, codes, values, value_mask, valid), valid)


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, params, times, codes, values, value_mask, valid) -> jax.Array:
    return nnx.merge(graphdef, params)(times, codes, values, value_mask, valid)

