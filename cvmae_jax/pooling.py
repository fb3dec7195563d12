"""One vector per label window from the encoder's hidden states, for eval.py's probes and
fine-tuned heads.

``mean``: the hidden states averaged over the window's real events, [B, D]. ``per_code``: that
mean, then for each code of the vocabulary the mean of the states of its events (zeros where the
window has none) and an indicator of its presence, [B, D + V * D + V]: the encoder's view of each
lab kept apart, as the aggregates baseline keeps each lab's statistics apart, where one average
over every event mixes them. The width grows with the vocabulary (42 codes x 128 = 5,546 on
set-a), so ``mean`` suits vocabularies of hundreds of codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cvmae_jax.config_checks import POOLINGS
from cvmae_jax.model import mean_pool

DESCRIPTIONS = dict(  # what the probe and the fine-tuned heads read, for reports
    mean="the encoder states averaged over the window's events",
    per_code="the encoder states averaged over the window's events and over each code's events, "
             "with each code's presence")


def per_code_pool(hidden: jax.Array, codes: jax.Array, valid: jax.Array,
                  vocab_size: int) -> jax.Array:
    """float32 [B, D + V * D + V] of hidden [B, L, D], int codes [B, L], bool valid [B, L]: the
    mean over real events, the per-code means (code-major) and the per-code presence."""
    hidden = hidden.astype(jnp.float32)
    member = ((codes[..., None] == jnp.arange(vocab_size)) & valid[..., None]).astype(jnp.float32)
    counts = member.sum(1)  # [B, V]
    by_code = jnp.einsum("blv,bld->bvd", member, hidden) / jnp.maximum(counts, 1.0)[..., None]
    batch = hidden.shape[0]
    return jnp.concatenate([mean_pool(hidden, valid), by_code.reshape(batch, -1),
                            (counts > 0).astype(jnp.float32)], axis=-1)


def pool(pooling: str, hidden: jax.Array, codes: jax.Array, valid: jax.Array,
         vocab_size: int) -> jax.Array:
    """The window vectors of ``pooling`` (one of POOLINGS), float32 [B, pooled_width(...)]."""
    if pooling == "mean":
        return mean_pool(hidden, valid)
    if pooling == "per_code":
        return per_code_pool(hidden, codes, valid, vocab_size)
    raise ValueError(f"config.eval.pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")


def pooled_width(pooling: str, d_model: int, vocab_size: int) -> int:
    """The length of one window vector of ``pooling``."""
    return d_model if pooling == "mean" else d_model + vocab_size * (d_model + 1)
