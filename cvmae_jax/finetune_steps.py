"""Supervised fine-tuning of the VO-MAE encoder on a binary label: the classifier, its
optimizer and the compiled-step bodies (``cvmae_jax.parallel``'s launchers compile them).

The classifier reads a label window with no value hidden, pools the encoder's hidden states
into one vector as the frozen probe does (``config.eval.pooling``: pooling.py) and maps it to
one logit with a small head (linear, or one hidden layer). Its parameters are ``{"encoder": ...,
"head": ...}``: the encoder's are a pretrained run's (or freshly initialized ones, from scratch)
and every weight is updated, the encoder's with a scaled learning rate.

Batches are dicts: ``times`` f32 [B, L], ``codes`` i32 [B, L], ``values`` f32 [B, L],
``valid`` bool [B, L], ``label`` f32 [B] (0 or 1) and ``weight`` f32 [B] (1 for a label row,
0 for a padding row).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cvmae_jax.config_checks import FINETUNE_HEADS
from cvmae_jax.model import ModelConfig, ValueOnlyMAE
from cvmae_jax.pooling import pool, pooled_width
from cvmae_jax.steps import TrainState


class ClassifierHead(nnx.Module):
    """Hidden states [B, L, D] -> logits [B]: the states pooled by ``pooling`` (pooling.py)
    into [B, W], then one linear layer, or ``mlp``: W -> D (GELU) -> 1. The output layer
    starts at zero weight with the bias at ``log_odds``, so the untrained classifier predicts
    the train prevalence."""

    def __init__(self, pooling: str, d_model: int, vocab_size: int, kind: str,
                 log_odds: float, *, rngs: nnx.Rngs):
        if kind not in FINETUNE_HEADS:
            raise ValueError(f"config.eval.finetune.head={kind!r}: expected one of "
                             f"{', '.join(FINETUNE_HEADS)}")
        self.pooling, self.vocab_size = pooling, vocab_size
        width = pooled_width(pooling, d_model, vocab_size)
        self.hidden = nnx.Linear(width, d_model, rngs=rngs) if kind == "mlp" else None
        self.out = nnx.Linear(d_model if kind == "mlp" else width, 1,
                              kernel_init=nnx.initializers.zeros,
                              bias_init=nnx.initializers.constant(log_odds), rngs=rngs)

    def __call__(self, hidden: jax.Array, codes: jax.Array, valid: jax.Array) -> jax.Array:
        x = pool(self.pooling, hidden, codes, valid, self.vocab_size)
        x = x if self.hidden is None else jax.nn.gelu(self.hidden(x))
        return self.out(x)[..., 0]


def init_head(model_config: ModelConfig, pooling: str, kind: str, prevalence: float,
              seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """A fresh head (``ClassifierHead``) for ``model_config``'s encoder, whose bias is the
    log-odds of ``prevalence``."""
    p = float(np.clip(prevalence, 1e-3, 1 - 1e-3))
    head = ClassifierHead(pooling, model_config.d_model, model_config.vocab_size, kind,
                          float(np.log(p / (1 - p))), rngs=nnx.Rngs(params=seed))
    return nnx.split(head, nnx.Param)


def init_encoder(model_config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """A randomly initialized VO-MAE (the from-scratch encoder)."""
    return nnx.split(ValueOnlyMAE(model_config, rngs=nnx.Rngs(params=seed)), nnx.Param)


def _scale_encoder(encoder_lr_scale) -> optax.GradientTransformation:
    return optax.stateless(lambda updates, params=None: dict(
        updates, encoder=jax.tree.map(lambda u: u * encoder_lr_scale, updates["encoder"])))


def finetune_warmup_steps(num_steps: int) -> int:
    """Steps of the fine-tuning rate's linear warmup: 10% of ``num_steps`` (at least 1)."""
    return max(num_steps // 10, 1)


def make_finetune_optimizer(learning_rate: float, weight_decay: float,
                            num_steps: int) -> optax.GradientTransformation:
    """AdamW with a 10% linear warmup (``finetune_warmup_steps``) and cosine decay, after
    global-norm clipping at 1; the encoder's updates (weight decay included) are then scaled by
    a factor held in the optimizer state (``init_opt_state``), so one compiled step serves
    every scale."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=finetune_warmup_steps(num_steps),
        decay_steps=max(num_steps, 2), end_value=0.1 * learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=weight_decay),
                       optax.inject_hyperparams(_scale_encoder)(encoder_lr_scale=1.0))


def init_opt_state(optimizer: optax.GradientTransformation, params: dict,
                   encoder_lr_scale: float):
    """``optimizer``'s (``make_finetune_optimizer``) state for ``params``, the encoder's
    learning rate scaled by ``encoder_lr_scale``."""
    clip, adamw, scale = optimizer.init(params)
    return clip, adamw, scale._replace(hyperparams=dict(
        scale.hyperparams, encoder_lr_scale=jnp.asarray(encoder_lr_scale, jnp.float32)))


def classifier_logits(encoder_graphdef: nnx.GraphDef, head_graphdef: nnx.GraphDef,
                      params: dict, batch: dict) -> jax.Array:
    """Logits f32 [B] of ``params`` {"encoder", "head"} on ``batch`` (no value hidden)."""
    encoder = nnx.merge(encoder_graphdef, params["encoder"])
    valid = batch["valid"]
    hidden = encoder.encode(batch["times"], batch["codes"], batch["values"],
                            jnp.zeros_like(valid), valid)
    head = nnx.merge(head_graphdef, params["head"])
    return head(hidden, batch["codes"], valid).astype(jnp.float32)


def make_finetune_step(encoder_graphdef: nnx.GraphDef, head_graphdef: nnx.GraphDef,
                       optimizer: optax.GradientTransformation,
                       axis_name: str | None = None, traces: list | None = None) -> Callable:
    """(state, batch) -> (new state, metrics {loss, grad_norm, finite}): mean binary cross-entropy
    over the batch's label rows, one AdamW update. With ``axis_name`` (pmap) the row count and
    the gradients are summed over devices, so the update equals the jit one. A step whose loss
    or gradient is not finite leaves the state unchanged. Each trace appends to ``traces``."""

    def loss_fn(params, batch):
        logits = classifier_logits(encoder_graphdef, head_graphdef, params, batch)
        weight = batch["weight"]
        local = (optax.sigmoid_binary_cross_entropy(logits, batch["label"]) * weight).sum()
        rows = weight.sum() if axis_name is None else jax.lax.psum(weight.sum(), axis_name)
        rows = jax.lax.stop_gradient(jnp.maximum(rows, 1.0))
        total = local if axis_name is None else jax.lax.psum(local, axis_name)
        return local / rows, total / rows

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if traces is not None:
            traces.append(1)
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = TrainState(step=state.step + 1,
                               params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, dict(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))

    return step


def make_logit_step(encoder_graphdef: nnx.GraphDef, head_graphdef: nnx.GraphDef,
                    axis_name: str | None = None) -> Callable:
    """(params, batch) -> logits f32 [B] of the whole batch (under pmap gathered from every
    device, so each holds all B)."""

    def logit_step(params: dict, batch: dict) -> jax.Array:
        logits = classifier_logits(encoder_graphdef, head_graphdef, params, batch)
        return logits if axis_name is None else jax.lax.all_gather(logits, axis_name,
                                                                   tiled=True)

    return logit_step
