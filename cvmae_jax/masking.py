"""Mask draws inside the compiled step, from the per-code probabilities of
mask_probabilities.py.

The step draws each token's mask from a key that depends only on (seed, step, example_id,
position): ``fold_in(fold_in(fold_in(root, step), example_id), position)``, so the same example
gets the same mask whatever the batch layout, packing, device count or parallel launcher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_STREAM = 0x6D61736B  # "mask": folded into the seed's key for the training masks


def mask_root(seed: int) -> jax.Array:
    """The training masks' root key: ``fold_in(key(seed), MASK_STREAM)``, so no mask key equals
    a parameter-initialization key (``nnx.Rngs(params=seed)`` draws ``fold_in(key(seed), i)``
    for i = 0, 1, ..., as the step numbers would)."""
    return jax.random.fold_in(jax.random.key(seed), MASK_STREAM)


def sample_value_mask(root: jax.Array, step: jax.Array, example_id: jax.Array,
                      codes: jax.Array, valid: jax.Array, probs: jax.Array,
                      positions: jax.Array | None = None) -> jax.Array:
    """Draw the value mask inside the step.

    Each token's uniform draw comes from the key
    ``fold_in(fold_in(fold_in(root, step), example_id), position)``, so it depends only on the
    seed, the step, the example and the token's position in that example: the same masks come
    out for any batch layout, device count, launcher or packing.

    Args:
      root: the run's masking key.  step: scalar int.
      example_id: int [B] (one example per row) or [B, L] (packed rows: per token).
      codes: int [B, L] code indices.  valid: bool [B, L], False on padding.
      probs: float [V] per-code mask probabilities.
      positions: int [B, L] position of each token in its example (default: 0..L-1).
    Returns:
      bool [B, L]: True where the value is hidden; never True on padding.
    """
    shape = codes.shape
    token_example = jnp.broadcast_to(example_id[:, None] if example_id.ndim == 1
                                     else example_id, shape)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    step_key = jax.random.fold_in(root, step)

    def draw(example, position):
        key = jax.random.fold_in(jax.random.fold_in(step_key, example), position)
        return jax.random.uniform(key)

    uniform = jax.vmap(jax.vmap(draw))(token_example, positions)
    return (uniform < jnp.take(probs, codes)) & valid
