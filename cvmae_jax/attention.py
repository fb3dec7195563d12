"""Multi-head self-attention over padded or packed lab sequences.

Two formulations of the same function (``config.model.attention``):

- ``einsum`` (default): scores and weighted sums as batched matmuls in [B, H, L, Dh] layout with
  the padding/segment mask applied inside the softmax's fusion. On XLA CPU this layout avoids
  the transposes of the [B, H, L, L] score tensors that the [B, L, H, Dh] layout needs
  (measured in benchmarks/NOTES.md).
- ``dot_product_attention``: ``jax.nn.dot_product_attention`` with its default implementation,
  which in jax 0.10-0.11 is XLA's (its cuDNN flash attention is only used when asked for with
  ``implementation='cudnn'``, not tried here yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("einsum", "dot_product_attention")


def check_attention(implementation: str) -> None:
    """Refuses an unknown ``config.model.attention``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={implementation!r} must be one of "
                         f"{IMPLEMENTATIONS}")


def keep_mask(valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Which keys each query may attend to: bool [B, 1, 1, L] (padding only) or, for packed
    rows with int segment_ids [B, L], bool [B, 1, L, L] (same segment, not padding).

    Queries at padding positions get outputs that nothing reads; keys at padding are never
    attended from a real token."""
    keep = valid[:, None, None, :]
    if segment_ids is not None:
        keep = keep & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return keep


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array,
                   implementation: str = "einsum") -> jax.Array:
    """Softmax attention. q, k, v: [B, H, L, Dh]; keep: bool broadcastable to [B, H, L, L].
    Returns [B, H, L, Dh] in v's dtype; the softmax is computed in float32."""
    check_attention(implementation)
    if implementation == "einsum":
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k)
        logits = jnp.where(keep, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    swap = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, H, L, Dh] <-> [B, L, H, Dh]
    mask = jnp.broadcast_to(keep, (q.shape[0], 1, q.shape[2], k.shape[2]))
    return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=mask))
