"""A trained run in your own code: the model with a checkpoint's parameters, the lab statistics
it was trained with (the model's code ids index ``stats.codes``) and its config.

    from cvmae_jax.trained import load_trained
    from cvmae_jax.data.pipeline import padded_rows
    run = load_trained("runs/demo")               # the newest complete checkpoint
    batch = padded_rows(records, run.max_len)     # records of the prepared dataset
    states = run.encode(batch)                    # float32 [B, L, D]
    vectors = run.embed(batch)                    # float32 [B, W], as eval.py's probe reads
    run.labs                                      # pandas DataFrame, one row per code id
    vectors = run.embed(run.batch(events))        # your own events: a pandas DataFrame

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
import numpy as np
import pandas as pd
import pyarrow as pa
from flax import nnx

from cvmae_jax.attention import runnable_here
from cvmae_jax.checkpoint import Checkpointer
from cvmae_jax.config import label_max_len
from cvmae_jax.data import meds
from cvmae_jax.data.pipeline import padded_rows
from cvmae_jax.data.sequences import build_examples
from cvmae_jax.data.stats import DataStats
from cvmae_jax.model import ModelConfig, ValueOnlyMAE
from cvmae_jax.pooling import pool
from cvmae_jax.steps import init_state, make_optimizer
from cvmae_jax.workdir import checkpoint_dir, code_table, with_eval_defaults


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: DataStats
    config: ml_collections.ConfigDict  # config.json, missing eval.* fields at their defaults
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

    def embed(self, batch: dict, pooling: str | None = None) -> jax.Array:
        """One vector per row, float32 [B, W], no value hidden: the hidden states pooled by
        ``pooling`` (pooling.py; by default the run's ``config.eval.pooling``, the vectors
        ``eval.py``'s probe reads and ``eval/embeddings`` holds unless eval.py overrides it).
        W is ``pooling.pooled_width`` (D for ``mean``)."""
        return _embed(self.graphdef, pooling or self.config.eval.pooling, self.stats.vocab_size,
                      self.params, *_inputs(batch, None))

    def batch(self, events: pd.DataFrame) -> dict:
        """A batch of your own lab events in raw units, one row per subject: the window
        eval.py gives a label row at the subject's last event (``events_batch`` with the run's
        ``eval.label_max_len`` and ``eval.label_window``)."""
        return events_batch(events, self.stats, label_max_len(self.config),
                            self.config.eval.label_window == "each_code_latest")

    def predict(self, batch: dict, value_mask) -> jax.Array:
        """Reconstructed values float32 [B, L] in normalized units with the values at
        ``value_mask`` (bool [B, L]) hidden; ``stats.denormalize(batch["codes"], out)`` gives
        the lab's raw units."""
        return _predict(self.graphdef, self.params, *_inputs(batch, value_mask))


def load_trained(workdir: str, step: int | None = None) -> TrainedRun:
    """The run in ``workdir`` (written by train.py) at checkpoint ``step`` (default: the newest
    complete one), its parameters on this process's first device, with the config and data
    statistics saved in that checkpoint (a run resumed with other allowed settings may have
    changed them)."""
    directory = checkpoint_dir(workdir)
    latest = Checkpointer.latest_complete_step(directory)
    if latest is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint (is {workdir} a training "
                                "workdir?)")
    step = latest if step is None else int(step)
    try:
        run_info = Checkpointer.read_run_info(directory, step)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (the newest "
                                f"complete one is {latest})") from None
    config, data_stats = with_eval_defaults(run_info["config"]), run_info["data_stats"]
    stats = DataStats.from_dict(data_stats)
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
    state = Checkpointer.restore_state(directory, step, abstract, verified=True)
    return TrainedRun(graphdefs[0], state.params, stats, config, step, code_table(data_stats))


def events_batch(events: pd.DataFrame, stats: DataStats, max_len: int,
                 each_code_latest: bool = False) -> dict:
    """A padded batch (``padded_rows``) of lab events in raw units. ``events``: one row per event
    with the MEDS columns subject_id (int), time (datetime64), code and numeric_value. Rows are
    kept as prepare keeps them: with a time, a finite value not in ``stats.drop_values`` and a
    code of ``stats.codes``. Each subject keeps the label window of its events
    (``sequences.window_rows``: its latest ``max_len``, or with ``each_code_latest`` every
    code's latest event and then the last others), times in hours since the window's first
    event, values clipped and z-scored. One row per subject with an event left, by subject_id
    (``subject_id`` int64 [B]); rows are ``max_len`` long."""
    missing = [c for c in meds.EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events: no column {', '.join(missing)} (expected the MEDS columns "
                         f"{', '.join(meds.EVENT_COLUMNS)})")
    table = pa.Table.from_pandas(events[list(meds.EVENT_COLUMNS)], preserve_index=False)
    try:
        table = table.cast(pa.schema([
            ("subject_id", pa.int64()), ("time", pa.timestamp("us", _time_zone(table))),
            ("code", pa.string()), ("numeric_value", pa.float64())]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"events: expected integer subject_id, datetime time, text code and "
                         f"numeric numeric_value ({e})") from None
    table, _ = meds.numeric_rows(table, stats.drop_values)
    windows = list(build_examples(table, stats, max_len, window="last", min_window_len=1,
                                  each_code_latest=each_code_latest))
    batch = padded_rows(windows, max_len)
    batch["subject_id"] = np.array([w["subject_id"] for w in windows], np.int64)
    return batch


def _time_zone(table: pa.Table) -> str | None:
    kind = table.schema.field("time").type
    return kind.tz if pa.types.is_timestamp(kind) else None


def _inputs(batch: dict, value_mask) -> tuple:
    valid = jnp.asarray(batch["valid"], bool)
    hidden = jnp.zeros_like(valid) if value_mask is None else jnp.asarray(value_mask, bool)
    return (jnp.asarray(batch["times"], jnp.float32), jnp.asarray(batch["codes"], jnp.int32),
            jnp.asarray(batch["values"], jnp.float32), hidden & valid, valid)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, times, codes, values, value_mask, valid) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model.encode(times, codes, values, value_mask, valid).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _embed(graphdef, pooling, vocab_size, params, times, codes, values, value_mask,
           valid) -> jax.Array:
    hidden = _encode(graphdef, params, times, codes, values, value_mask, valid)
    return pool(pooling, hidden, codes, valid, vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, params, times, codes, values, value_mask, valid) -> jax.Array:
    return nnx.merge(graphdef, params)(times, codes, values, value_mask, valid)

