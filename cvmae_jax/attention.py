"""Multi-head self-attention over padded or packed lab sequences.

Three implementations of the same function (``config.model.attention``):

- ``einsum`` (default): scores and weighted sums as batched matmuls in [B, H, L, Dh] layout, the
  padding or packing mask carried by the scores' matmul, the output normalized after the
  weighted sum, and a hand-written backward that takes softmax's row sums from [B, H, L, Dh]
  tensors. On XLA CPU this layout avoids the transposes of the [B, H, L, L] score tensors that
  the [B, L, H, Dh] layout needs (measured in benchmarks/NOTES.md).
- ``dot_product_attention``: ``jax.nn.dot_product_attention`` with its default implementation,
  which in jax 0.10-0.11 is XLA's.
- ``cudnn``: the same function with ``implementation='cudnn'``, cuDNN's fused flash attention
  (NVIDIA GPUs, bfloat16 compute only; a run trained with it evaluates anywhere, see
  ``runnable_here``). The [B, H, L, L] scores are never written to memory;
  padding is passed as per-row lengths, which assumes right-padded rows (every batch this
  project builds is); a row whose real tokens are not a prefix gets NaN outputs instead of
  silently attending to the wrong keys. Packed rows pass their segment mask, which cuDNN applies
  as an additive bias.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("einsum", "dot_product_attention", "cudnn")
CUDNN_DTYPES = ("bfloat16",)


def check_attention(implementation: str, dtype: str = "float32",
                    backend: str | None = None) -> None:
    """Refuses an unknown ``config.model.attention``, and ``cudnn`` with a float32 compute
    dtype or (when ``backend`` is given) off a GPU."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={implementation!r} must be one of "
                         f"{IMPLEMENTATIONS}")
    if implementation != "cudnn":
        return
    if dtype not in CUDNN_DTYPES:
        raise ValueError(f"config.model.attention='cudnn' needs config.model.dtype in "
                         f"{CUDNN_DTYPES} (cuDNN flash attention has no float32 kernel); got "
                         f"{dtype!r}")
    if backend is not None and backend != "gpu":
        raise ValueError(f"config.model.attention='cudnn' runs on NVIDIA GPUs only; this run's "
                         f"backend is {backend!r} (use 'einsum')")


def runnable_here(implementation: str, backend: str) -> str:
    """``implementation``, or ``einsum`` (the same function) for ``cudnn`` off a GPU: lets a run
    trained on GPUs be evaluated on a CPU."""
    return "einsum" if implementation == "cudnn" and backend != "gpu" else implementation


class AttentionMask(NamedTuple):
    """Which keys each query may attend to: the real tokens ``valid`` bool [B, L] and, for
    packed rows, ``segment_ids`` int [B, L] (1, 2, ... per example in a row, at most L, as
    ``data.packing.fill_rows`` numbers them; ids at padding are ignored).

    Queries at padding positions get outputs that nothing reads; keys at padding are never
    attended from a real token."""

    valid: jax.Array
    segment_ids: jax.Array | None = None

    def dense(self) -> jax.Array:
        """bool [B, 1, 1, L] (padding only) or [B, 1, L, L] (same segment, not padding)."""
        keep = self.valid[:, None, None, :]
        if self.segment_ids is not None:
            ids = self.segment_ids
            keep = keep & (ids[:, None, :, None] == ids[:, None, None, :])
        return keep


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: AttentionMask,
                   implementation: str = "einsum") -> jax.Array:
    """Softmax attention. q, k, v: [B, H, L, Dh]; keep: which keys each query may attend to.
    Returns [B, H, L, Dh] in v's dtype; the softmax is computed in float32."""
    check_attention(implementation, v.dtype.name)
    if implementation == "einsum":
        return _einsum_attention(q, k, v, keep)
    if implementation == "cudnn" and keep.segment_ids is None:
        return _cudnn_right_padded(q, k, v, keep.valid)
    mask = jnp.broadcast_to(keep.dense(), (q.shape[0], 1, q.shape[2], k.shape[2]))
    if implementation == "dot_product_attention":
        return _swap_heads(jax.nn.dot_product_attention(
            _swap_heads(q), _swap_heads(k), _swap_heads(v), mask=mask))
    return _swap_heads(jax.nn.dot_product_attention(  # packed rows: the segment mask, as a bias
        _swap_heads(q), _swap_heads(k), _swap_heads(v), mask=_no_empty_rows(mask),
        implementation="cudnn"))


def _no_empty_rows(mask: jax.Array) -> jax.Array:
    """bool [B, 1, L, L] with each query that may attend to nothing (padding) attending to
    itself instead: a fully masked row is not defined the same way by every kernel, and its
    outputs, never read, must stay finite so that no NaN reaches a gradient."""
    empty = ~mask.any(axis=-1, keepdims=True)
    return mask | (empty & jnp.eye(mask.shape[-1], dtype=bool))


@jax.custom_vjp
def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: AttentionMask) -> jax.Array:
    return _einsum_attention_forward(q, k, v, keep)[0]


def _einsum_attention_forward(q, k, v, keep):
    """The output [B, H, L, Dh] and what the backward needs: the float32 softmax numerators
    exp(s - max s) [B, H, L, L] and the reciprocals of their row sums [B, H, L, 1].

    The output is normalized after the weighted sum, on [B, H, L, Dh] instead of [B, H, L, L]
    (as flash attention does), and the mask enters the scores' matmul as extra features
    instead of a pass of its own (``_masked_scores``)."""
    logits = _masked_scores(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, keep)
    numerators = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    inverse_sums = 1.0 / numerators.sum(axis=-1, keepdims=True)
    out = (jnp.einsum("bhqk,bhkd->bhqd", numerators.astype(v.dtype), v)
           * inverse_sums).astype(v.dtype)
    return out, (q, k, v, numerators, inverse_sums, out)


def _masked_scores(q: jax.Array, k: jax.Array, keep: AttentionMask) -> jax.Array:
    """float32 [B, H, L, L] scores q.k, plus a large negative bias where ``keep`` forbids
    (-1e30 per feature; less in size in float16, ``_scores_with_features``).

    The mask rides in the scores' matmul as extra features instead of a pass of its own over the
    scores (0.83x the attention layer's time, benchmarks/NOTES.md). A key-padding mask is an
    additive bias per key: q gets a feature of ones and k one holding the bias (0 or -1e30).
    Packed rows get two features per bit of the segment id (0 on padding): q has the bit and its
    complement, k 0 where its bit is the same and -1e30 where it differs, so a score gains -1e30
    for each bit in which the two tokens' segments differ and nothing within a segment. That is
    exact for any number of examples per row, at 2 ceil(log2(L + 1)) features (18 for L = 256)."""
    if keep.segment_ids is None:
        ones = jnp.ones(keep.valid.shape + (1,), q.dtype)
        return _scores_with_features(q, k, ones, keep.valid[..., None])
    ids = jnp.where(keep.valid, keep.segment_ids, 0)  # 0 on padding, at most L elsewhere
    bits = ((ids[..., None] >> jnp.arange(ids.shape[-1].bit_length())) & 1).astype(bool)
    bits = jnp.concatenate([bits, ~bits], axis=-1)  # [B, L, 2 bits]
    return _scores_with_features(q, k, bits.astype(q.dtype), bits)


def _scores_with_features(q: jax.Array, k: jax.Array, q_features: jax.Array,
                          key_allowed: jax.Array) -> jax.Array:
    """float32 [B, H, L, L] scores of q and k [B, H, L, Dh] extended by F features per token:
    q's ``q_features`` [B, L, F], k's 0 where ``key_allowed`` bool [B, L, F] else a bias of
    -1e30, or less in size where F of them would overflow k's dtype (float16: -65504 / 4F), so
    that no score becomes -inf (an all-padding row would then give NaN)."""
    shape, features = q.shape[:-1], key_allowed.shape[-1]
    bias = -min(1e30, float(jnp.finfo(k.dtype).max) / (4 * features))
    q_ext = jnp.broadcast_to(q_features[:, None], shape + (features,))
    k_ext = jnp.broadcast_to(jnp.where(key_allowed, 0.0, bias).astype(k.dtype)[:, None],
                             shape + (features,))
    return jnp.einsum("bhqd,bhkd->bhqk", jnp.concatenate([q, q_ext], axis=-1),
                      jnp.concatenate([k, k_ext], axis=-1)).astype(jnp.float32)


def _einsum_attention_backward(residuals, d_out):
    """Softmax attention's backward from the forward's numerators E and inverse row sums r
    (weights P = E r): dS = E r (dP - sum(dO * O)), with softmax's row sums taken from
    [B, H, L, Dh] tensors instead of [B, H, L, L] ones, and dV = E^T (r dO). No cotangent for
    ``keep``."""
    q, k, v, numerators, inverse_sums, out = residuals
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, v).astype(jnp.float32)
    row_sums = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                       keepdims=True)
    d_logits = (numerators * ((d_weights - row_sums) * inverse_sums)).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k) * scale
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q) * scale
    d_v = jnp.einsum("bhqk,bhqd->bhkd", numerators.astype(v.dtype),
                     (d_out * inverse_sums).astype(v.dtype))
    return d_q, d_k, d_v, None


_einsum_attention.defvjp(_einsum_attention_forward, _einsum_attention_backward)


def _swap_heads(x: jax.Array) -> jax.Array:
    """[B, H, L, Dh] <-> [B, L, H, Dh] (jax.nn.dot_product_attention's layout)."""
    return x.transpose(0, 2, 1, 3)


def _cudnn_right_padded(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """cuDNN attention of rows whose real tokens ``valid`` [B, L] are a prefix, passed as
    lengths; rows that are not right-padded get NaN outputs, padding queries zeros (whatever
    the kernel leaves there, so no NaN reaches the loss). q, k, v, result: [B, H, L, Dh]."""
    lengths = valid.sum(axis=-1, dtype=jnp.int32)
    right_padded = jnp.all(valid == (jnp.arange(valid.shape[-1]) < lengths[:, None]), axis=-1)
    lengths = jnp.maximum(lengths, 1)  # all-padding rows attend to their first key
    attended = _swap_heads(jax.nn.dot_product_attention(
        _swap_heads(q), _swap_heads(k), _swap_heads(v), query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation="cudnn"))
    attended = jnp.where(valid[:, None, :, None], attended, 0)
    return jnp.where(right_padded[:, None, None, None], attended, jnp.nan)
