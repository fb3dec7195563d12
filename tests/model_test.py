"""The VO-MAE: hidden values never leak, padding never matters, the loss counts what it should."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvmae_jax.attention import (AttentionMask, check_attention, runnable_here,
                                  self_attention)
from cvmae_jax.config import default_config
from cvmae_jax.model import (ModelConfig, ValueOnlyMAE, previous_value_features,
                             reconstruction_loss)

B, L, V = 3, 16, 10


@pytest.fixture(scope="module")
def model():
    return ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=2),
                        rngs=nnx.Rngs(0))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0, 500, (B, L)), axis=1).astype(np.float32)
    codes = rng.integers(0, V, (B, L)).astype(np.int32)
    values = rng.normal(size=(B, L)).astype(np.float32)
    valid = np.arange(L)[None] < np.array([[L], [10], [4]])
    value_mask = (rng.uniform(size=(B, L)) < 0.3) & valid
    return times, codes, values, value_mask, valid


def test_output_shape_and_dtype(model):
    out = model(*_inputs())
    assert out.shape == (B, L) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_hidden_values_do_not_reach_any_output(model):
    times, codes, values, value_mask, valid = _inputs()
    changed = np.where(value_mask, values + 100.0, values)
    np.testing.assert_allclose(model(times, codes, changed, value_mask, valid),
                               model(times, codes, values, value_mask, valid), atol=1e-5)
    visible_changed = np.where(~value_mask & valid, values + 1.0, values)
    assert not np.allclose(model(times, codes, visible_changed, value_mask, valid),
                           model(times, codes, values, value_mask, valid), atol=1e-3)


def test_a_hidden_events_code_and_time_stay_visible(model):
    times, codes, values, value_mask, valid = _inputs()
    base = np.asarray(model(times, codes, values, value_mask, valid))[value_mask]
    other_codes = np.where(value_mask, (codes + 1) % V, codes)
    later = np.where(value_mask, times + 100.0, times)
    for changed in (model(times, other_codes, values, value_mask, valid),
                    model(later, codes, values, value_mask, valid)):
        assert np.abs(np.asarray(changed)[value_mask] - base).min() > 1e-4


def test_padding_does_not_change_outputs_at_real_tokens(model):
    times, codes, values, value_mask, valid = _inputs()
    noisy = np.random.default_rng(5)
    codes2 = np.where(valid, codes, noisy.integers(0, V, codes.shape)).astype(np.int32)
    values2 = np.where(valid, values, noisy.normal(size=values.shape) * 50).astype(np.float32)
    times2 = np.where(valid, times, 9999.0).astype(np.float32)
    a = np.asarray(model(times, codes, values, value_mask, valid))
    b = np.asarray(model(times2, codes2, values2, value_mask, valid))
    np.testing.assert_allclose(a[valid], b[valid], atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    m = ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, dtype="bfloat16"),
                     rngs=nnx.Rngs(0))
    params = nnx.state(m, nnx.Param)
    assert {x.dtype for x in __import__("jax").tree.leaves(params)} == {jnp.dtype("float32")}
    assert np.isfinite(np.asarray(m(*_inputs()))).all()


def test_loss_counts_masked_and_visible_separately_and_ignores_padding():
    predictions = jnp.array([[1.0, 0.0, 6.0, 7.0]])
    values = jnp.array([[0.0, 2.0, 5.0, 0.0]])
    value_mask = jnp.array([[True, True, False, True]])
    valid = jnp.array([[True, True, True, False]])
    loss, m = reconstruction_loss(predictions, values, value_mask, valid, unmasked_weight=0.5)
    assert float(m["masked_mse"]) == pytest.approx((1 + 4) / 2)
    assert float(m["unmasked_mse"]) == pytest.approx(1.0)
    assert float(m["mask_rate"]) == pytest.approx(2 / 3)
    assert float(loss) == pytest.approx(2.5 + 0.5 * 1.0)
    assert float(m["loss"]) == pytest.approx(float(loss))
    assert float(m["baseline_masked_sse"]) == pytest.approx(4.0)


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="num_heads=3"):
        ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=3), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("previous_value_inputs", [False, True])
def test_packed_examples_do_not_see_each_other(previous_value_inputs):
    model = ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=2,
                                     previous_value_inputs=previous_value_inputs),
                         rngs=nnx.Rngs(0))
    times, codes, values, value_mask, valid = _inputs()
    alone = np.asarray(model(times, codes, values, value_mask, valid))
    n1, n2 = 10, 4  # rows 1 and 2 hold 10 and 4 real tokens
    cat = lambda x: np.concatenate([x[1, :n1], x[2, :n2], np.zeros(L - n1 - n2, x.dtype)])[None]
    segments = np.concatenate([np.full(n1, 1), np.full(n2, 2), np.zeros(L - n1 - n2)])[None]
    packed_valid = segments > 0
    out = np.asarray(model(cat(times), cat(codes), cat(values), cat(value_mask) & packed_valid,
                           packed_valid, segments.astype(np.int32)))
    np.testing.assert_allclose(out[0, :n1], alone[1, :n1], atol=1e-5)
    np.testing.assert_allclose(out[0, n1:n1 + n2], alone[2, :n2], atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_attention_implementations_agree_at_real_tokens(packed):
    """The einsum attention and jax.nn.dot_product_attention give the same outputs and
    gradients wherever a real token reads them (padded and packed rows)."""
    times, codes, values, value_mask, valid = _inputs()
    segment_ids = None
    if packed:  # row 0 holds two examples of 9 and 7 tokens
        segment_ids = np.where(valid, 1, 0).astype(np.int32)
        segment_ids[0, 9:] = 2
    weight = jnp.asarray(valid, jnp.float32)

    def outputs_and_grads(attention):
        m = ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=2,
                                     attention=attention), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(m)

        def loss(p):
            out = nnx.merge(graphdef, p)(times, codes, values, value_mask, valid, segment_ids)
            return jnp.sum(jnp.square(out) * weight), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return np.asarray(out) * valid, grads

    with jax.default_matmul_precision("highest"):  # not TF32 on GPUs: the same arithmetic
        out_a, grads_a = outputs_and_grads("einsum")
        out_b, grads_b = outputs_and_grads("dot_product_attention")
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="config.model.attention"):
        ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, attention="flash"),
                     rngs=nnx.Rngs(0))(*_inputs())


def _scatter_adds(jaxpr):
    """Every scatter-add equation of a (closed) jaxpr, inner jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scatter-add":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _scatter_adds(sub)


def test_code_embedding_gradient_accumulates_in_float32():
    """In bfloat16 the code table's gradient is a float32 scatter-add (nnx.Embed's own call
    casts the table first, which made a bfloat16 scatter-add and a 3x slower GPU step); in
    float32 the embedding equals nnx.Embed's."""
    times, codes, values, value_mask, valid = _inputs()
    m = ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=1,
                                 dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)
    def loss(p):
        return nnx.merge(graphdef, p)(times, codes, values, value_mask, valid).sum()

    scatters = list(_scatter_adds(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    assert [eqn.outvars[0].aval.shape for eqn in scatters] == [(V, 32)]
    assert all(eqn.outvars[0].aval.dtype == jnp.float32 for eqn in scatters)
    f32 = ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(f32.embed_codes(codes), f32.code_embed(codes))


def test_cudnn_attention_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="config.model.dtype"):
        ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, attention="cudnn"),
                     rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NVIDIA GPUs only.*'cpu'"):
        check_attention("cudnn", "bfloat16", "cpu")
    check_attention("cudnn", "bfloat16", "gpu")


def test_a_cudnn_run_evaluates_off_the_gpu_with_the_einsum_attention():
    assert runnable_here("cudnn", "cpu") == "einsum"
    assert runnable_here("cudnn", "gpu") == "cudnn"
    assert runnable_here("dot_product_attention", "cpu") == "dot_product_attention"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_matches_einsum_in_bfloat16(packed):
    """cuDNN flash attention == the einsum attention (both bfloat16) at real queries, outputs
    and gradients, for right-padded rows (one all-padding) and packed rows."""
    batch, heads, length, head_dim = 4, 2, 64, 32
    q, k, v = [jax.random.normal(key, (batch, heads, length, head_dim), jnp.bfloat16)
               for key in jax.random.split(jax.random.key(0), 3)]
    valid = np.arange(length)[None] < np.array([[64], [40], [7], [0]])
    segment_ids = None
    if packed:  # row 0 holds examples of 30 and 34 tokens, row 1 of 25 and 15
        segment_ids = np.where(valid, 1, 0).astype(np.int32)
        segment_ids[0, 30:], segment_ids[1, 25:40] = 2, 2
    keep = AttentionMask(jnp.asarray(valid),
                         None if segment_ids is None else jnp.asarray(segment_ids))
    real = jnp.asarray(valid)[:, None, :, None]

    def run(implementation):
        def loss(q, k, v):
            out = self_attention(q, k, v, keep, implementation).astype(jnp.float32)
            return jnp.sum(jnp.where(real, out, 0.0) ** 2), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v)
        assert np.isfinite(out).all()  # padding queries too: the loss multiplies them by 0
        return [np.asarray(jnp.where(real, out, 0.0))] + [np.asarray(g, np.float32)
                                                          for g in grads]

    for got, want in zip(run("cudnn"), run("einsum")):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_model_loss_and_gradients_are_finite_with_padding():
    """The whole bf16 model with cuDNN attention on right-padded rows (one all padding)."""
    times, codes, values, value_mask, valid = _inputs()
    valid[2] = False
    m = ValueOnlyMAE(ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=2,
                                 dtype="bfloat16", attention="cudnn"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)

    def loss(p):
        out = nnx.merge(graphdef, p)(times, codes, values, value_mask & valid, valid)
        return reconstruction_loss(out, values, value_mask & valid, valid, 0.1)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_turns_rows_that_are_not_right_padded_into_nan():
    q = k = v = jnp.ones((2, 1, 8, 16), jnp.bfloat16)
    valid = jnp.asarray([[True] * 6 + [False] * 2, [False] + [True] * 7])
    out = np.asarray(self_attention(q, k, v, AttentionMask(valid), "cudnn"), np.float32)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


@pytest.mark.parametrize("packed", [None, "two examples", "one example per token"])
def test_einsum_attention_backward_equals_autodiff(packed):
    """The einsum attention's hand-written backward == autodiff of jax.nn.dot_product_attention
    (float32, highest precision), for padded rows (one all padding) and packed rows (also one
    with as many examples as tokens, whose segment ids use every bit of the mask's features),
    with the cotangent zero at padding queries as in the model (no loss reads them; what the
    two implementations put there differs)."""
    batch, heads, length, head_dim = 3, 2, 16, 8
    q, k, v, d_out = [jax.random.normal(key, (batch, heads, length, head_dim))
                      for key in jax.random.split(jax.random.key(1), 4)]
    valid = np.arange(length)[None] < np.array([[16], [9], [0]])
    segment_ids = None
    if packed:  # row 0 holds examples of 7 and 9 tokens, or 16 of one token
        segment_ids = np.where(valid, 1, 0).astype(np.int32)
        segment_ids[0, 7:] = 2
        if packed == "one example per token":
            segment_ids[0] = np.arange(1, length + 1)
    keep = AttentionMask(jnp.asarray(valid),
                         None if segment_ids is None else jnp.asarray(segment_ids))
    d_out = d_out * valid[:, None, :, None]

    def grads(implementation):
        def loss(q, k, v):
            return jnp.sum(self_attention(q, k, v, keep, implementation) * d_out)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with jax.default_matmul_precision("highest"):
        for got, want in zip(grads("einsum"), grads("dot_product_attention")):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_einsum_attention_keeps_packed_examples_apart(dtype):
    """A packed row of two examples and padding (the mask carried as per-segment features in
    the scores' matmul) attends at its real tokens exactly as the two examples in rows of
    their own, in float32 and in the 16-bit dtypes, where the features' bias must still mask
    (bfloat16) and not overflow (float16); segment ids left at padding change nothing."""
    heads, length, head_dim, n1, n2 = 2, 16, 8, 9, 5
    q, k, v = [jax.random.normal(key, (1, heads, length, head_dim), dtype)
               for key in jax.random.split(jax.random.key(2), 3)]
    ids = np.concatenate([np.full(n1, 1), np.full(n2, 2), np.zeros(length - n1 - n2)])[None]
    valid = jnp.asarray(ids > 0)
    packed = self_attention(q, k, v, AttentionMask(valid, jnp.asarray(ids, jnp.int32)))
    stale_ids = jnp.asarray(np.where(ids > 0, ids, 1), jnp.int32)  # a real id at padding
    stale = self_attention(q, k, v, AttentionMask(valid, stale_ids))
    alone = jnp.concatenate([
        self_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                       AttentionMask(jnp.ones((1, b - a), bool)))
        for a, b in ((0, n1), (n1, n1 + n2))], axis=2)
    atol = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}[dtype]
    for got in (packed, stale):
        np.testing.assert_allclose(np.asarray(got[:, :, :n1 + n2], np.float32),
                                   np.asarray(alone, np.float32), atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("packed", [False, True])
def test_einsum_attention_gradients_stay_finite_with_an_all_padding_row(dtype, packed):
    """A row without real tokens: its outputs are never read, but they and every gradient
    must stay finite (a -inf score row would give NaN), in every compute dtype."""
    q, k, v = [jax.random.normal(key, (2, 2, 8, 4), dtype)
               for key in jax.random.split(jax.random.key(3), 3)]
    valid = jnp.asarray([[True] * 5 + [False] * 3, [False] * 8])
    segment_ids = jnp.where(valid, 1, 0).astype(jnp.int32) if packed else None

    def loss(q, k, v):
        out = self_attention(q, k, v, AttentionMask(valid, segment_ids)).astype(jnp.float32)
        return jnp.sum(out * valid[:, None, :, None]), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def _loop_previous_value_features(times, codes, values, visible, segment_ids):
    """previous_value_features as a plain loop: the last visible value of the token's code in
    its example, 1, and log1p(hours since it)."""
    features = np.zeros(codes.shape + (3,), np.float32)
    for b in range(codes.shape[0]):
        last = {}
        for i in range(codes.shape[1]):
            key = (segment_ids[b, i], codes[b, i])
            if key in last:
                value, time = last[key]
                features[b, i] = value, 1.0, np.log1p(times[b, i] - time)
            if visible[b, i]:
                last[key] = values[b, i], times[b, i]
    return features


def test_previous_value_features_match_a_loop_within_packed_examples():
    times, codes, values, value_mask, valid = _inputs(3)
    segment_ids = np.where(valid, 1 + (np.arange(L)[None] >= 7), 0).astype(np.int32)
    got = previous_value_features(times, codes, values, valid & ~value_mask, segment_ids, V)
    want = _loop_previous_value_features(times, codes, values, valid & ~value_mask, segment_ids)
    assert 0 < want[..., 1].sum() < valid.sum()  # tokens with and without a predecessor
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_previous_value_inputs_follow_the_config():
    config = default_config()
    assert not ModelConfig.from_config(config.model, V).previous_value_inputs
    config.model.previous_value_inputs = True
    assert ModelConfig.from_config(config.model, V).previous_value_inputs


def test_previous_value_inputs_add_parameters_and_keep_hidden_values_hidden():
    config = dict(vocab_size=V, d_model=32, num_heads=4, num_layers=1)
    plain = ValueOnlyMAE(ModelConfig(**config), rngs=nnx.Rngs(0))
    with_previous = ValueOnlyMAE(ModelConfig(**config, previous_value_inputs=True),
                                 rngs=nnx.Rngs(0))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(with_previous) == count(plain) + 3 * 32 + 32
    times, codes, values, value_mask, valid = _inputs()
    changed = np.where(value_mask, values + 100.0, values)
    np.testing.assert_allclose(with_previous(times, codes, changed, value_mask, valid),
                               with_previous(times, codes, values, value_mask, valid), atol=1e-5)
    # the input is wired: the new projection's weights get a gradient
    grads = nnx.grad(lambda m: jnp.sum(m(times, codes, values, value_mask, valid) ** 2))(
        with_previous)
    assert np.abs(np.asarray(grads.previous_proj.kernel[...])).sum() > 0
