"""Masking strategies: per-code probabilities on the host, mask draws inside the compiled step.

A strategy turns train-split statistics into a probability vector ``probs`` of shape [V] (one
entry per lab code). The step then draws each token's mask from a key that depends only on
(seed, step, example_id, position): ``fold_in(fold_in(fold_in(root, step), example_id),
position)``, so the same example gets the same mask whatever the batch layout, packing, device
count or parallel launcher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("random", "variance", "cv", "cv_rank")


def percentile_threshold(score: np.ndarray, threshold_percentile: float) -> float:
    """The score percentile that splits codes into tiers; an infinite score (the CV of a
    mean-0 code) counts as the largest finite one, so it never makes the threshold infinite or
    NaN, and the code lands in the high tier. A NaN score (train statistics that are not
    finite) raises ValueError: it would silently put every code in the low tier."""
    score = np.asarray(score, dtype=np.float64)
    if np.isnan(score).any():
        raise ValueError(f"{int(np.isnan(score).sum())} of {score.size} codes have a NaN masking "
                         "score (CV or variance): their train statistics are not finite; "
                         "prepare the dataset again")
    score = np.where(np.isposinf(score), np.finfo(np.float64).max, score)
    return float(np.percentile(score, threshold_percentile))


def two_tier_probs(score: np.ndarray, threshold_percentile: float, p_high: float,
                   p_low: float) -> np.ndarray:
    """p_high for codes whose score is strictly above the percentile threshold, else p_low. [V]."""
    above = np.asarray(score) > percentile_threshold(score, threshold_percentile)
    return np.where(above, p_high, p_low)


def expected_mask_rate(probs: np.ndarray, token_counts: np.ndarray) -> float:
    """Expected fraction of training tokens masked under ``probs`` (token-count weighted mean)."""
    counts = np.asarray(token_counts, dtype=np.float64)
    return float(np.sum(probs * counts) / np.sum(counts))


def rank_probs(score: np.ndarray, token_counts: np.ndarray, target_rate: float, p_high: float,
               p_low: float) -> np.ndarray:
    """Continuous mapping from score rank to probability with a given expected mask rate. [V].

    Probabilities rise linearly with the code's rank (0 = least volatile, 1 = most), spanning
    ``p_high - p_low``, shifted so the token-weighted mean equals ``target_rate`` (bisection on
    the shift; values are clipped to [0.01, 0.99]).
    """
    order = np.argsort(np.argsort(score, kind="stable"), kind="stable")
    rank = order / max(len(score) - 1, 1)
    slope = p_high - p_low

    def probs_for(shift: float) -> np.ndarray:
        return np.clip(shift + slope * rank, 0.01, 0.99)

    lo, hi = -1.0, 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if expected_mask_rate(probs_for(mid), token_counts) < target_rate:
            lo = mid
        else:
            hi = mid
    return probs_for(0.5 * (lo + hi))


def strategy_probs(strategy: str, *, cv: np.ndarray, variance: np.ndarray,
                   token_counts: np.ndarray, threshold_percentile: float, p_high: float,
                   p_low: float) -> np.ndarray:
    """Per-code mask probabilities [V] for a strategy, from train-split statistics.

    ``random`` and ``cv_rank`` match the expected mask rate of ``cv`` on the training tokens,
    so they differ from ``cv`` only in which values they hide. ``variance`` applies the same
    two-tier rule to the variance, so its rate is whatever share of tokens its top-tier codes
    hold (not matched: the paper's baseline).
    """
    cv_probs = two_tier_probs(cv, threshold_percentile, p_high, p_low)
    if strategy == "cv":
        return cv_probs
    if strategy == "variance":
        return two_tier_probs(variance, threshold_percentile, p_high, p_low)
    cv_rate = expected_mask_rate(cv_probs, token_counts)
    if strategy == "random":
        return np.full_like(cv_probs, cv_rate)
    if strategy == "cv_rank":
        return rank_probs(cv, token_counts, cv_rate, p_high, p_low)
    raise ValueError(f"config.masking.strategy={strategy!r}: expected one of {STRATEGIES}")


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
