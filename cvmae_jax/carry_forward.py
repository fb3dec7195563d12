"""Carry-forward (LOCF): each token's latest visible predecessor of the same code.

The reconstruction baseline predicts each hidden value by the last visible value of the same code
earlier in its row, the clinical default imputation; where the row holds no such value the
prediction falls back to the code's train mean (0 in normalized units), the per-code-mean
baseline. The model's optional previous-value inputs (``config.model.previous_value_inputs``)
read the same predecessor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def latest_visible_predecessor(keys: jax.Array,
                               visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(source i32 [B, L], found bool [B, L]) for rows of grouping ``keys`` i32 [B, L] (a code,
    or a code within one packed example) and ``visible`` bool [B, L].

    ``source`` is the position of the latest visible token with the same key at an earlier
    position of the row (0 where ``found`` is False). Tokens are grouped by key with a stable sort
    (positions stay in order within a key), so a running maximum of the visible sorted indices
    finds each token's predecessor: O(L log L) per row.
    """
    batch, length = keys.shape
    order = jnp.argsort(keys, axis=1, stable=True)
    sorted_keys = jnp.take_along_axis(keys, order, 1)
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    latest = jax.lax.cummax(jnp.where(jnp.take_along_axis(visible, order, 1), index, -1), axis=1)
    before = jnp.concatenate([jnp.full((batch, 1), -1, latest.dtype), latest[:, :-1]], axis=1)
    sorted_source = jnp.maximum(before, 0)
    sorted_found = (before >= 0) & (jnp.take_along_axis(sorted_keys, sorted_source, 1)
                                    == sorted_keys)
    rows = jnp.arange(batch)[:, None]
    source = jnp.zeros((batch, length), order.dtype).at[rows, order].set(
        jnp.where(sorted_found, jnp.take_along_axis(order, sorted_source, 1), 0))
    found = jnp.zeros((batch, length), bool).at[rows, order].set(sorted_found)
    return source, found


def carry_forward(codes: jax.Array, values: jax.Array,
                  visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(predictions f32 [B, L], fallback bool [B, L]) for rows of ``codes`` i32 [B, L],
    ``values`` f32 [B, L] and ``visible`` bool [B, L] (valid and not hidden).

    A token's prediction is the value of the latest visible token of its code at an earlier
    position of its row; ``fallback`` is True where there is none (prediction 0).
    """
    source, found = latest_visible_predecessor(codes, visible)
    return jnp.where(found, jnp.take_along_axis(values, source, 1), 0.0), ~found
