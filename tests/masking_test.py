"""Masking strategies (host) and in-step mask sampling (device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvmae_jax import mask_probabilities, masking, parallel

CV = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 1.2])
VARIANCE = np.array([5.0, 0.1, 3.0, 0.2, 9.0, 0.3, 0.4, 0.5])
COUNTS = np.array([100, 300, 50, 10, 200, 40, 80, 20])
WITHIN_CV = np.array([0.3, 0.01, 0.02, 0.25, 0.03, 0.04, 0.05, 0.06])  # ranks unlike CV


def probs(strategy, **kw):
    args = dict(cv=CV, variance=VARIANCE, within_subject_cv=WITHIN_CV, token_counts=COUNTS,
                threshold_percentile=75.0, p_high=0.8, p_low=0.2)
    args.update(kw)
    return mask_probabilities.strategy_probs(strategy, **args)


def test_cv_gives_p_high_exactly_above_the_percentile():
    p = probs("cv")
    above = CV > np.percentile(CV, 75)
    np.testing.assert_array_equal(p[above], 0.8)
    np.testing.assert_array_equal(p[~above], 0.2)
    assert above.sum() == 2


def test_variance_ranks_by_raw_variance_not_cv():
    p = probs("variance")
    np.testing.assert_array_equal(np.flatnonzero(p == 0.8), [0, 4])


def test_cv_within_ranks_by_within_subject_cv():
    p = probs("cv_within")
    np.testing.assert_array_equal(np.flatnonzero(p == 0.8), [0, 3])
    np.testing.assert_array_equal(np.flatnonzero(p == 0.2), [1, 2, 4, 5, 6, 7])


def test_a_score_at_the_threshold_stays_in_the_low_tier():
    score = np.arange(1.0, 10.0)  # the 75th percentile, 7.0, is itself a code's score
    p = mask_probabilities.two_tier_probs(score, 75.0, p_high=0.8, p_low=0.2)
    np.testing.assert_array_equal(np.flatnonzero(p == 0.8), [7, 8])


def test_expected_mask_rate_weights_each_code_by_its_tokens():
    rate = mask_probabilities.expected_mask_rate(np.array([0.8, 0.2]), np.array([3, 1]))
    assert rate == pytest.approx(0.65)


def test_random_and_cv_rank_match_the_cv_expected_rate():
    # cv hides codes 6 and 7 (100 of 800 tokens) at 0.8, the rest at 0.2: (80 + 140) / 800
    cv_rate = 0.275
    random_p = probs("random")
    np.testing.assert_allclose(random_p, cv_rate)
    # codes in an order unlike their CV, so a rank and an argsort differ
    order = np.array([3, 7, 0, 5, 1, 6, 2, 4])
    cv, counts = CV[order], COUNTS[order]
    rank_p = probs("cv_rank", cv=cv, token_counts=counts)
    assert mask_probabilities.expected_mask_rate(rank_p, counts) == pytest.approx(cv_rate, abs=1e-6)
    assert np.all(np.diff(rank_p[np.argsort(cv)]) > 0)


def test_config_fields_change_the_probabilities():
    p = probs("cv", threshold_percentile=50.0, p_high=0.9, p_low=0.1)
    assert set(np.unique(p)) == {0.1, 0.9}
    assert (p == 0.9).sum() == 4


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="config.masking.strategy='spans'"):
        probs("spans")


def _batch(num_examples=64, length=128, vocab=8, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab, (num_examples, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, num_examples)
    valid = np.arange(length)[None, :] < lengths[:, None]
    example_id = rng.permutation(10_000)[:num_examples].astype(np.int32)
    return codes, valid, example_id


def test_mask_rate_per_code_matches_probabilities_and_padding_is_never_masked():
    codes, valid, example_id = _batch(num_examples=256)
    p = jnp.asarray(probs("cv"), jnp.float32)
    mask = np.asarray(masking.sample_value_mask(jax.random.key(0), 3, example_id, codes, valid, p))
    assert not mask[~valid].any()
    for code in range(len(CV)):
        n = (valid & (codes == code)).sum()
        rate = mask[valid & (codes == code)].mean()
        tolerance = 4 * np.sqrt(p[code] * (1 - p[code]) / n)
        assert abs(rate - p[code]) < tolerance, (code, rate, float(p[code]), n)


def test_masks_do_not_depend_on_batch_layout():
    codes, valid, example_id = _batch()
    p = jnp.asarray(probs("cv"), jnp.float32)
    sample = jax.jit(masking.sample_value_mask)
    root = jax.random.key(7)
    whole = np.asarray(sample(root, 11, example_id, codes, valid, p))
    order = np.random.default_rng(1).permutation(len(example_id))
    halves = [order[:24], order[24:]]
    for rows in halves:  # the same examples, shuffled and split over two batches
        part = np.asarray(sample(root, 11, example_id[rows], codes[rows], valid[rows], p))
        np.testing.assert_array_equal(part, whole[rows])
    other_step = np.asarray(sample(root, 12, example_id, codes, valid, p))
    assert (other_step != whole).any()


def test_masks_are_the_same_on_one_device_over_the_mesh_and_under_pmap():
    codes, valid, example_id = _batch()
    p = jnp.asarray(probs("cv"), jnp.float32)
    root = jax.random.key(5)
    one = np.asarray(jax.jit(masking.sample_value_mask, device=jax.devices()[0])(
        root, 4, example_id, codes, valid, p))
    sharding = parallel.batch_sharding(parallel.make_mesh(jax.devices()))
    sharded = [jax.device_put(x, sharding) for x in (example_id, codes, valid)]
    over_mesh = jax.jit(masking.sample_value_mask)(root, 4, *sharded, p)
    assert len(over_mesh.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(over_mesh), one)
    per_device = [x.reshape(8, -1, *x.shape[1:]) for x in (example_id, codes, valid)]
    pmapped = jax.pmap(masking.sample_value_mask, in_axes=(None, None, 0, 0, 0, None))(
        root, 4, *per_device, p)
    np.testing.assert_array_equal(np.asarray(pmapped).reshape(one.shape), one)


def test_infinite_cv_counts_as_most_volatile():
    cv = np.array([0.1, 0.2, np.inf, 0.3, 0.05, 0.15, 0.25, 0.12])
    p = probs("cv", cv=cv)
    assert p[2] == 0.8 and (p == 0.8).sum() == 2


def test_a_nan_score_is_refused_not_put_in_the_low_tier():
    with pytest.raises(ValueError, match="1 of 8 codes have a NaN masking score"):
        probs("cv", cv=np.where(CV == 0.5, np.nan, CV))


def test_packed_rows_get_the_same_masks_as_one_example_per_row():
    codes, valid, example_id = _batch(num_examples=4, length=16)
    lengths = valid.sum(axis=1)
    p = jnp.asarray(probs("cv"), jnp.float32)
    root = jax.random.key(3)
    alone = np.asarray(masking.sample_value_mask(root, 5, example_id, codes, valid, p))
    # Pack the four examples into two rows of 32 tokens, in another order.
    rows = [[2, 0], [3, 1]]
    shape = (2, 32)
    packed = {k: np.zeros(shape, np.int32) for k in ("codes", "example_id", "positions")}
    packed_valid = np.zeros(shape, bool)
    for r, members in enumerate(rows):
        start = 0
        for e in members:
            n = lengths[e]
            packed["codes"][r, start:start + n] = codes[e, :n]
            packed["example_id"][r, start:start + n] = example_id[e]
            packed["positions"][r, start:start + n] = np.arange(n)
            packed_valid[r, start:start + n] = True
            start += n
    mask = np.asarray(masking.sample_value_mask(root, 5, packed["example_id"], packed["codes"],
                                                packed_valid, p, packed["positions"]))
    for r, members in enumerate(rows):
        start = 0
        for e in members:
            n = lengths[e]
            np.testing.assert_array_equal(mask[r, start:start + n], alone[e, :n])
            start += n


def test_mask_root_shares_no_key_with_parameter_initialization():
    """nnx.Rngs(params=seed) draws fold_in(key(seed), i); the step folds the step number into
    the mask root, so the root must not be key(seed) itself."""
    from cvmae_jax.masking import mask_root

    root = jax.random.key_data(mask_root(5))
    assert np.array_equal(root, jax.random.key_data(mask_root(5)))  # deterministic
    assert not np.array_equal(root, jax.random.key_data(mask_root(6)))
    init_keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(
        jax.random.key(5), i))(np.arange(10_000)))
    step_keys = jax.random.key_data(jax.vmap(lambda s: jax.random.fold_in(
        mask_root(5), s))(np.arange(10_000)))
    assert not (init_keys[:, None, :] == step_keys[None, :1000, :]).all(-1).any()
