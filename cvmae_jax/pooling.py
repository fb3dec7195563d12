"""One vector per label window from the encoder's hidden states, for eval.py's probes and
fine-tuned heads.

``mean``: the hidden states averaged over the window's real events, [B, D]. ``per_code``: that
mean, then for each code of the vocabulary the mean of the states of its events (zeros where the
window has none) and an indicator of its presence, [B, D + V * D + V]: the encoder's view of each
lab kept apart, as the aggregates baseline keeps each lab's statistics apart, where one average
over every event mixes them. ``per_code_last``: the same with each code's latest event's state
in place of the average of its events (the window's events are in time order), as the
aggregates keep each lab's last value. The width grows with the vocabulary (42 codes x 128 =
5,546 on set-a), so ``mean`` suits vocabularies of hundreds of codes.
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
                  "event's state and each code's presence")


def per_code_pool(hidden: jax.Array, codes: jax.Array, valid: jax.Array, vocab_size: int,
                  latest: bool = False) -> jax.Array:
    """float32 [B, D + V * D + V] of hidden [B, L, D], int codes [B, L], bool valid [B, L]: the
    mean over real events, per code (code-major) the mean of its events' states, or with
    `latest` the state of its last event, and the per-code presence."""
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
    batch = hidden.shape[0]
    return jnp.concatenate([mean_pool(hidden, valid), by_code.reshape(batch, -1),
                            present.astype(jnp.float32)], axis=-1)


def pool(pooling: str, hidden: jax.Array, codes: jax.Array, valid: jax.Array,
         vocab_size: int) -> jax.Array:
    """The window vectors of ``pooling`` (one of POOLINGS), float32 [B, pooled_width(...)]."""
    if pooling == "mean":
        return mean_pool(hidden, valid)
    if pooling in ("per_code", "per_code_last"):
        return per_code_pool(hidden, codes, valid, vocab_size, latest=pooling == "per_code_last")
    raise ValueError(f"config.eval.pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")


def pooled_width(pooling: str, d_model: int, vocab_size: int) -> int:
    """The length of one window vector of ``pooling``."""
    return d_model if pooling == "mean" else d_model + vocab_size * (d_model + 1)
