"""One vector per label window from the encoder's hidden states, for eval.py's probes and
fine-tuned heads.

``mean``: the hidden states averaged over the window's real events, [B, D]. ``per_code``: that
mean, then for each code of the vocabulary the mean of the states of its events (zeros where the
window has none) and an indicator of its presence, [B, D + V * D + V]: the encoder's view of each
lab kept apart, as the aggregates baseline keeps each lab's statistics apart, where one average
over every event mixes them. ``per_code_last``: the same with each code's latest event's state
in place of the average of its events (the window's events are in time order), as the
aggregates keep each lab's last value. ``per_code_last_max``: that and, after the latest
states, each code's elementwise maximum over its events' states, [B, D + V * 2D + V], as the
aggregates keep each lab's extremes. The width grows with the vocabulary (42 codes x 128 =
5,546 on set-a for ``per_code_last``), so ``mean`` suits vocabularies of hundreds of codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cvmae_jax.config_checks import POOLINGS
from cvmae_jax.model import mean_pool

DESCRIPTIONS = dict(  # what the probe and the fine-tuned heads read, for reports
    mean="the encoder states averaged over the window's events",
    per_code="the encoder states averaged over the window's events and over each code's events, "
             "with each code's presence",
    per_code_last="the encoder states averaged over the window's events, each code's latest "
                  "event's state and each code's presence",
    per_code_last_max="the encoder states averaged over the window's events, each code's "
                      "latest event's state, each code's elementwise maximum state and each "
                      "code's presence")
PER_CODE = dict(  # per-code pooling: (each code's latest state in place of its average, maximum)
    per_code=(False, False), per_code_last=(True, False), per_code_last_max=(True, True))


def per_code_pool(hidden: jax.Array, codes: jax.Array, valid: jax.Array, vocab_size: int,
                  latest: bool = False, maximum: bool = False) -> jax.Array:
    """float32 [B, D + V * D + V] of hidden [B, L, D], int codes [B, L], bool valid [B, L]: the
    mean over real events, per code (code-major) the mean of its events' states, or with
    `latest` the state of its last event, with `maximum` then per code the elementwise maximum
    of its events' states ([B, D + V * 2D + V]), and the per-code presence; an absent code's
    entries are zeros."""
    hidden = hidden.astype(jnp.float32)
    member = (codes[..., None] == jnp.arange(vocab_size)) & valid[..., None]  # [B, L, V]
    present = member.any(1)  # [B, V]
    if latest:
        last = jnp.max(jnp.where(member, jnp.arange(codes.shape[1])[:, None], -1), axis=1)
        by_code = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[..., None], axis=1)
        by_code = jnp.where(present[..., None], by_code, 0.0)  # [B, V, D]
    else:
        weights = member.astype(jnp.float32)
        by_code = jnp.einsum("blv,bld->bvd", weights, hidden) / jnp.maximum(
            weights.sum(1), 1.0)[..., None]
    parts = [mean_pool(hidden, valid), by_code]
    if maximum:
        parts.append(jnp.where(present[..., None], code_maximum(hidden, codes, valid, vocab_size),
                               0.0))
    batch = hidden.shape[0]
    return jnp.concatenate([p.reshape(batch, -1) for p in parts]
                           + [present.astype(jnp.float32)], axis=-1)


def code_maximum(hidden: jax.Array, codes: jax.Array, valid: jax.Array,
                 vocab_size: int) -> jax.Array:
    """float32 [B, V, D]: per code the elementwise maximum of its real events' states (-inf
    where it has none: ``per_code_pool`` puts zeros there), one segment maximum per row, so
    memory stays [B, L, D]."""
    segments = jnp.where(valid, codes, vocab_size)  # padding to a segment that is dropped
    by_row = jax.vmap(lambda h, s: jax.ops.segment_max(h, s, num_segments=vocab_size + 1))
    return by_row(hidden, segments)[:, :vocab_size]


def pool(pooling: str, hidden: jax.Array, codes: jax.Array, valid: jax.Array,
         vocab_size: int) -> jax.Array:
    """The window vectors of ``pooling`` (one of POOLINGS), float32 [B, pooled_width(...)]."""
    if pooling == "mean":
        return mean_pool(hidden, valid)
    latest, maximum = _per_code(pooling, vocab_size)
    return per_code_pool(hidden, codes, valid, vocab_size, latest, maximum)


def pooled_width(pooling: str, d_model: int, vocab_size: int) -> int:
    """The length of one window vector of ``pooling``."""
    if pooling == "mean":
        return d_model
    _, maximum = _per_code(pooling, vocab_size)
    return d_model + vocab_size * ((2 if maximum else 1) * d_model + 1)


def _per_code(pooling: str, vocab_size: int) -> tuple[bool, bool]:
    if pooling not in PER_CODE:
        raise ValueError(f"config.eval.pooling={pooling!r}: expected one of "
                         f"{', '.join(POOLINGS)}")
    if vocab_size < 1:
        raise ValueError(f"pooling {pooling!r} needs the vocabulary size, got {vocab_size}")
    return PER_CODE[pooling]
