"""Carry-forward (LOCF) reconstruction baseline: each hidden value predicted by the last visible
value of the same code earlier in its row, the clinical default imputation. Where the row holds
no such value the prediction falls back to the code's train mean (0 in normalized units), the
per-code-mean baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def carry_forward(codes: jax.Array, values: jax.Array,
                  visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(predictions f32 [B, L], fallback bool [B, L]) for rows of ``codes`` i32 [B, L],
    ``values`` f32 [B, L] and ``visible`` bool [B, L] (valid and not hidden).

    A token's prediction is the value of the latest visible token of its code at an earlier
    position of its row; ``fallback`` is True where there is none (prediction 0). Tokens are
    grouped by code with a stable sort (positions stay in order within a code), so a running
    maximum of the visible sorted indices finds each token's predecessor: O(L log L) per row.
    """
    batch, length = codes.shape
    order = jnp.argsort(codes, axis=1, stable=True)
    sorted_codes = jnp.take_along_axis(codes, order, 1)
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    latest = jax.lax.cummax(jnp.where(jnp.take_along_axis(visible, order, 1), index, -1), axis=1)
    before = jnp.concatenate([jnp.full((batch, 1), -1, latest.dtype), latest[:, :-1]], axis=1)
    source = jnp.maximum(before, 0)
    found = (before >= 0) & (jnp.take_along_axis(sorted_codes, source, 1) == sorted_codes)
    sorted_predictions = jnp.where(
        found, jnp.take_along_axis(jnp.take_along_axis(values, order, 1), source, 1), 0.0)
    rows = jnp.arange(batch)[:, None]
    predictions = jnp.zeros_like(values).at[rows, order].set(sorted_predictions)
    fallback = jnp.zeros((batch, length), bool).at[rows, order].set(~found)
    return predictions, fallback
