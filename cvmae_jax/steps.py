"""Train state and the compiled-step bodies: mask draw, forward, loss, backward, update.

The bodies here are plain functions of (state, batch); ``cvmae_jax.parallel`` compiles them.
Batches are dicts of arrays: ``times`` f32 [B, L], ``codes`` i32 [B, L], ``values`` f32 [B, L],
``valid`` bool [B, L] and ``example_id`` i32 [B]; packed batches (several examples per row)
carry ``example_id`` i32 [B, L] per token, ``segment_ids`` i32 [B, L] (0 on padding) and
``positions`` i32 [B, L] (position of each token in its example).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from cvmae_jax.carry_forward import carry_forward
from cvmae_jax.masking import sample_value_mask
from cvmae_jax.model import ModelConfig, ValueOnlyMAE, reconstruction_loss


@struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; the model's graphdef is static)."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: nnx.State
    opt_state: Any


def make_optimizer(train_config) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay, after global-norm gradient clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_config.learning_rate,
        warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
        end_value=0.1 * train_config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm),
                       optax.adamw(schedule, weight_decay=train_config.weight_decay))


def init_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
               seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """Fresh parameters and optimizer state (on the default device)."""
    model = ValueOnlyMAE(model_config, rngs=nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    mask_probs: jax.Array, mask_root: jax.Array, unmasked_weight: float,
                    axis_name: str | None = None) -> Callable:
    """(state, batch) -> (new state, metrics). Masks are drawn inside from (root, step, example).

    With ``axis_name`` (pmap) the body sees this device's rows; counts and gradients are summed
    over the axis so the update equals the jit one. A step whose loss or gradient is not finite
    leaves the state unchanged and reports ``finite = 0``.
    """

    def loss_fn(params, batch, step):
        value_mask = sample_value_mask(mask_root, step, batch["example_id"], batch["codes"],
                                       batch["valid"], mask_probs, batch.get("positions"))
        model = nnx.merge(graphdef, params)
        predictions = model(batch["times"], batch["codes"], batch["values"], value_mask,
                            batch["valid"], batch.get("segment_ids"))
        return reconstruction_loss(predictions, batch["values"], value_mask, batch["valid"],
                                   unmasked_weight, axis_name)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, state.step)
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))

    return train_step


# The per-step train metrics summed over a logging window, in ``WindowTotals.sums`` order.
SUMMED_METRICS = ("loss", "unmasked_mse", "grad_norm", "num_masked", "num_tokens", "masked_sse",
                  "baseline_masked_sse")


@struct.dataclass
class WindowTotals:
    """Train metrics summed on the device over a logging window, and the window's first step
    whose loss or gradient norm was not finite: four arrays, one transfer to read them all."""

    sums: jax.Array  # f32 [len(SUMMED_METRICS)]
    steps: jax.Array  # i32 []: steps summed
    first_nonfinite: jax.Array  # i32 []: that step's number (1-based), 0 when none
    nonfinite_values: jax.Array  # f32 [2]: its loss and gradient norm

    @classmethod
    def zeros(cls) -> "WindowTotals":
        """An empty window, as host arrays (the launcher puts them on its devices)."""
        return cls(sums=np.zeros(len(SUMMED_METRICS), np.float32), steps=np.int32(0),
                   first_nonfinite=np.int32(0), nonfinite_values=np.zeros(2, np.float32))

    def add(self, step: jax.Array, metrics: dict) -> "WindowTotals":
        """These totals plus one step's metrics (traced; ``step``: its 1-based number)."""
        first_bad = (self.first_nonfinite == 0) & (metrics["finite"] == 0)
        values = jnp.stack([metrics["loss"], metrics["grad_norm"]]).astype(jnp.float32)
        return WindowTotals(
            sums=self.sums + jnp.stack([metrics[k].astype(jnp.float32) for k in SUMMED_METRICS]),
            steps=self.steps + 1,
            first_nonfinite=jnp.where(first_bad, step, self.first_nonfinite),
            nonfinite_values=jnp.where(first_bad, values, self.nonfinite_values))

    def total(self, name: str) -> float:
        """The window's sum of metric ``name`` (of SUMMED_METRICS), from a host copy."""
        return float(self.sums[SUMMED_METRICS.index(name)])

    def summary(self) -> dict:
        """The logged window metrics, from a host copy: means of the loss, unmasked MSE and
        gradient norm; the masked MSE, its per-code-mean baseline and the mask rate pooled
        from the summed errors and counts."""
        total = dict(zip(SUMMED_METRICS, np.asarray(self.sums, np.float64).tolist()))
        steps, masked = max(int(self.steps), 1), max(total["num_masked"], 1.0)
        return dict(loss=total["loss"] / steps, unmasked_mse=total["unmasked_mse"] / steps,
                    grad_norm=total["grad_norm"] / steps,
                    masked_mse=total["masked_sse"] / masked,
                    baseline_masked_mse=total["baseline_masked_sse"] / masked,
                    mask_rate=total["num_masked"] / max(total["num_tokens"], 1.0))


def make_window_step(train_step: Callable) -> Callable:
    """``train_step`` (``make_train_step``'s) carrying the logging window's metric totals:
    ((state, totals), batch) -> ((new state, totals with this step's metrics), new step
    number): the step number is an output of its own, not donated to the next step, which the
    host can wait for to bound how far it runs ahead of the devices."""

    def window_step(carry: tuple[TrainState, WindowTotals], batch: dict):
        state, totals = carry
        new_state, metrics = train_step(state, batch)
        return (new_state, totals.add(state.step + 1, metrics)), new_state.step

    return window_step


def make_eval_step(graphdef: nnx.GraphDef, vocab_size: int, mask_rate: float,
                   mask_seed: int, axis_name: str | None = None,
                   mode: str = "uniform") -> Callable:
    """Per-code sums [V] (count, sse, sae, baseline_sse) of the reconstruction of hidden values;
    in uniform mode also locf_sse and locf_fallbacks of the carry-forward baseline
    (``carry_forward``: the last visible value of the code earlier in the row, else its mean).

    ``mode='uniform'``: ``(params, batch)``, under a fixed uniform mask that depends only on
    (mask_seed, example_id, position): every model compared on a split sees exactly the same
    hidden values. ``mode='single_code'``: ``(params, batch, code)``, every value of lab code
    ``code`` (an int32 scalar, traced: one compile serves every code; under pmap one per device)
    is hidden and every other value is visible, whatever the model.

    A batch may carry ``targets`` f32 [B, L]: the model then reads ``values`` (e.g. a corrupted
    context) and the errors and the baseline are measured against ``targets`` (default: values).
    """
    if mode not in ("uniform", "single_code"):
        raise ValueError(f"eval step mode={mode!r}: expected 'uniform' or 'single_code'")
    root = jax.random.key(mask_seed)
    probs = jnp.full((vocab_size,), mask_rate, jnp.float32)

    def sums_under(params: nnx.State, batch: dict, value_mask: jax.Array,
                   with_carry_forward: bool = False) -> dict:
        model = nnx.merge(graphdef, params)
        predictions = model(batch["times"], batch["codes"], batch["values"], value_mask,
                            batch["valid"])
        targets = batch.get("targets", batch["values"])
        hidden = (value_mask & batch["valid"]).astype(jnp.float32)
        error = (predictions - targets) * hidden

        def per_code(x):
            return jax.ops.segment_sum(x.reshape(-1), batch["codes"].reshape(-1),
                                       num_segments=vocab_size)

        sums = dict(count=per_code(hidden), sse=per_code(jnp.square(error)),
                    sae=per_code(jnp.abs(error)),
                    baseline_sse=per_code(jnp.square(targets) * hidden))
        if with_carry_forward:
            locf, fallback = carry_forward(batch["codes"], batch["values"],
                                           batch["valid"] & ~value_mask)
            sums.update(locf_sse=per_code(jnp.square((locf - targets) * hidden)),
                        locf_fallbacks=per_code(fallback * hidden))
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    def eval_step(params: nnx.State, batch: dict) -> dict:
        value_mask = sample_value_mask(root, 0, batch["example_id"], batch["codes"],
                                       batch["valid"], probs)
        return sums_under(params, batch, value_mask, with_carry_forward=True)

    def single_code_step(params: nnx.State, batch: dict, code: jax.Array) -> dict:
        return sums_under(params, batch, (batch["codes"] == code) & batch["valid"])

    return eval_step if mode == "uniform" else single_code_step
