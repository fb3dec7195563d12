"""The Value-Only Masked Autoencoder (Flax NNX).

Each token is a lab event: code embedding + continuous time encoding + value embedding. At masked
positions the value embedding is replaced by one learned mask vector, so the model still sees which
lab was measured and when, but not its result. A pre-LayerNorm transformer encoder with a
padding-aware attention mask produces one hidden state per token and a linear head regresses the
normalized value. With ``previous_value_inputs`` each token also reads the latest visible value of
its code earlier in its example and the hours since it (the carry-forward estimate, GRU-D's
"last observation" input), so a hidden value starts from what carry-forward would predict.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvmae_jax.attention import AttentionMask, check_attention, self_attention
from cvmae_jax.carry_forward import latest_visible_predecessor


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the VO-MAE; built from ``config.model`` by ``ModelConfig.from_config``."""

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    time_frequencies: int = 16
    max_time_period_hours: float = 24.0 * 365.0
    dtype: str = "float32"
    attention: str = "einsum"  # see cvmae_jax/attention.py
    previous_value_inputs: bool = False  # see previous_value_features

    @classmethod
    def from_config(cls, model_config, vocab_size: int) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
        return cls(vocab_size=vocab_size,
                   **{k: model_config[k] for k in fields if k in model_config})


def time_features(hours: jax.Array, num_frequencies: int, max_period: float) -> jax.Array:
    """Sinusoidal features of time since the window's first event.

    hours: float [B, L]. Returns float32 [B, L, 2 * num_frequencies + 1]: sin/cos at periods
    spaced geometrically from 1 hour to ``max_period`` hours, plus log1p(hours).
    """
    periods = np.geomspace(1.0, max_period, num_frequencies).astype(np.float32)
    angles = hours[..., None] * (2.0 * np.pi / periods)
    return jnp.concatenate(
        [jnp.sin(angles), jnp.cos(angles), jnp.log1p(jnp.maximum(hours, 0.0))[..., None]], axis=-1)


def previous_value_features(times: jax.Array, codes: jax.Array, values: jax.Array,
                            visible: jax.Array, segment_ids: jax.Array | None,
                            vocab_size: int) -> jax.Array:
    """Each token's latest visible predecessor of the same code in its example.

    times/values float [B, L], codes int [B, L], visible bool [B, L] (valid and not hidden),
    segment_ids int [B, L] or None (one example per row). Returns float32 [B, L, 3]: the
    predecessor's value, 1, and log1p of the hours since it; all three 0 where there is none.
    """
    keys = codes if segment_ids is None else codes + segment_ids * vocab_size
    source, found = latest_visible_predecessor(keys, visible)
    previous = jnp.take_along_axis(values, source, 1)
    hours = jnp.maximum(times - jnp.take_along_axis(times, source, 1), 0.0)
    return jnp.where(found[..., None], jnp.stack(
        [previous, jnp.ones_like(previous), jnp.log1p(hours)], axis=-1), 0.0).astype(jnp.float32)


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        self.num_heads = cfg.num_heads
        self.attention = cfg.attention
        self.attn_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, dtype=dtype, rngs=rngs)
        self.attn_out = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(d, cfg.mlp_ratio * d, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_ratio * d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, keep: AttentionMask) -> jax.Array:
        """x: [B, L, D]; keep: which keys each query may attend to (attention.AttentionMask).
        Returns [B, L, D]."""
        batch, length, d = x.shape
        # Split along features (its gradient is one concatenate; unpacking a [3, ...] axis
        # gave pads and adds of full-size buffers: 0.89x the CPU step, benchmarks/NOTES.md).
        q, k, v = (t.reshape(batch, length, self.num_heads, d // self.num_heads)
                   .transpose(0, 2, 1, 3)  # [B, H, L, Dh]
                   for t in jnp.split(self.qkv(self.attn_norm(x)), 3, axis=-1))
        attended = self_attention(q, k, v, keep, self.attention)
        x = x + self.attn_out(attended.transpose(0, 2, 1, 3).reshape(batch, length, d))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class ValueOnlyMAE(nnx.Module):
    """VO-MAE: encodes lab sequences with hidden values and regresses the normalized values."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"config.model.d_model={cfg.d_model} is not divisible by "
                             f"config.model.num_heads={cfg.num_heads}")
        check_attention(cfg.attention, cfg.dtype)
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.code_embed = nnx.Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.time_proj = nnx.Linear(2 * cfg.time_frequencies + 1, d, dtype=dtype, rngs=rngs)
        self.value_proj = nnx.Linear(1, d, dtype=dtype, rngs=rngs)
        self.previous_proj = (nnx.Linear(3, d, dtype=dtype, rngs=rngs)
                              if cfg.previous_value_inputs else None)
        self.mask_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
        self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(d, 1, dtype=dtype, rngs=rngs)

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """int codes [B, L] -> [B, L, D] in the compute dtype, gathered from the float32 table.

        ``nnx.Embed.__call__`` casts the whole table to the compute dtype before the gather, so in
        bfloat16 the table's gradient is a bfloat16 scatter-add, which makes the bfloat16 step 3x
        slower than float32 on GPUs (benchmarks/NOTES.md). Gathering first keeps the
        scatter-add in float32; in float32 nothing changes."""
        table = self.code_embed.embedding[...]
        return jnp.take(table, codes, axis=0).astype(self.code_embed.dtype)

    def encode(self, times: jax.Array, codes: jax.Array, values: jax.Array,
               value_mask: jax.Array, valid: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
        """Hidden states [B, L, D] for float times/values [B, L], int codes [B, L] and bool
        value_mask/valid [B, L]. Hidden values never leak: they are replaced before embedding.
        With packed rows, int segment_ids [B, L] (0 on padding) keep attention inside each
        example."""
        cfg = self.cfg
        value_emb = self.value_proj(jnp.where(value_mask, 0.0, values)[..., None])
        value_emb = jnp.where(value_mask[..., None],
                              self.mask_embedding[...].astype(value_emb.dtype), value_emb)
        x = (self.embed_codes(codes)
             + self.time_proj(time_features(times, cfg.time_frequencies, cfg.max_time_period_hours))
             + value_emb)
        if cfg.previous_value_inputs:
            x = x + self.previous_proj(previous_value_features(
                times, codes, values, valid & ~value_mask, segment_ids, cfg.vocab_size))
        keep = AttentionMask(valid, segment_ids)
        for block in self.blocks:
            x = block(x, keep)
        return self.final_norm(x)

    def __call__(self, times, codes, values, value_mask, valid, segment_ids=None) -> jax.Array:
        """Predicted normalized values, float32 [B, L]."""
        hidden = self.encode(times, codes, values, value_mask, valid, segment_ids)
        return self.head(hidden)[..., 0].astype(jnp.float32)


def mean_pool(hidden: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of hidden [B, L, D] over the real events (valid bool [B, L]), float32 [B, D]; a row
    without any real event gives zeros."""
    weight = valid.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * weight).sum(1) / jnp.maximum(weight.sum(1), 1.0)


def reconstruction_loss(predictions: jax.Array, values: jax.Array, value_mask: jax.Array,
                        valid: jax.Array, unmasked_weight: float,
                        axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """L = MSE over masked values + unmasked_weight * MSE over visible values; padding ignored.

    All arrays are [B, L]. Returns the scalar loss and a dict of scalar metrics of the whole
    batch (sums and counts too, so callers can aggregate exactly across steps). Under ``pmap``
    pass ``axis_name``: the counts are then summed over devices and the returned loss is this
    device's share of the global loss, so the psum of per-device gradients is the gradient of
    the global loss, exactly as under ``jit``.
    """
    squared_error = jnp.square(predictions - values)
    masked = (value_mask & valid).astype(jnp.float32)
    visible = (~value_mask & valid).astype(jnp.float32)
    local = dict(num_masked=masked.sum(), num_visible=visible.sum(),
                 masked_sse=(squared_error * masked).sum(),
                 visible_sse=(squared_error * visible).sum(),
                 baseline_masked_sse=(jnp.square(values) * masked).sum())
    total = local if axis_name is None else jax.lax.psum(local, axis_name)
    num_masked = jax.lax.stop_gradient(jnp.maximum(total["num_masked"], 1.0))
    num_visible = jax.lax.stop_gradient(jnp.maximum(total["num_visible"], 1.0))
    loss = local["masked_sse"] / num_masked + unmasked_weight * local["visible_sse"] / num_visible
    masked_mse, unmasked_mse = total["masked_sse"] / num_masked, total["visible_sse"] / num_visible
    num_tokens = total["num_masked"] + total["num_visible"]
    metrics = dict(loss=masked_mse + unmasked_weight * unmasked_mse, masked_mse=masked_mse,
                   unmasked_mse=unmasked_mse, mask_rate=total["num_masked"] / jnp.maximum(
                       num_tokens, 1.0), num_masked=total["num_masked"], num_tokens=num_tokens,
                   masked_sse=total["masked_sse"],
                   baseline_masked_sse=total["baseline_masked_sse"])
    return loss, metrics
