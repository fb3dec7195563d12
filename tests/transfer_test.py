"""The train batch packed into one int32 array for the host->device copy, and unpacked in the
step bit for bit."""

import jax
import numpy as np
import pytest

from cvmae_jax import transfer


def padded_batch(rows=4, length=6):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(rows, length)).astype(np.float32)
    values[0, 0] = np.float32(-0.0)
    values[1, 1] = np.float32(np.nan)
    return {"times": rng.uniform(0, 1e4, (rows, length)).astype(np.float32),
            "codes": rng.integers(0, 100, (rows, length)).astype(np.int32),
            "values": values, "valid": rng.uniform(size=(rows, length)) < 0.7,
            "example_id": np.arange(rows, dtype=np.int32) * 1_000_003}


def test_unpack_returns_every_field_bit_for_bit():
    batch = padded_batch()
    layout = transfer.layout_of(batch)
    packed = transfer.pack(batch, layout)
    assert packed.shape == (4, 6, 5) and packed.dtype == np.int32
    unpacked = jax.jit(lambda p: transfer.unpack(p, layout))(packed)
    assert sorted(unpacked) == sorted(batch)
    for name, value in batch.items():
        got = np.asarray(unpacked[name])
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8), err_msg=name)


def test_packed_rows_with_per_token_fields_round_trip():
    batch = padded_batch()
    batch["example_id"] = np.repeat(batch["example_id"][:, None], 6, axis=1)
    batch["segment_ids"] = np.tile(np.arange(6, dtype=np.int32) // 3, (4, 1))
    layout = transfer.layout_of(batch)
    unpacked = transfer.unpack(transfer.pack(batch, layout), layout)
    np.testing.assert_array_equal(unpacked["example_id"], batch["example_id"])
    np.testing.assert_array_equal(unpacked["segment_ids"], batch["segment_ids"])


def test_a_batch_unlike_the_compiled_one_is_refused_by_name():
    layout = transfer.layout_of(padded_batch())
    changed = padded_batch()
    changed["codes"] = changed["codes"].astype(np.float32)
    with pytest.raises(ValueError, match=r"'codes' is float32 \(4, 6\), the compiled step "
                                         r"takes int32 \(4, 6\)"):
        transfer.pack(changed, layout)
    per_token = padded_batch()
    per_token["example_id"] = np.zeros((4, 6), np.int32)
    with pytest.raises(ValueError, match=r"'example_id' is int32 \(4, 6\), the compiled step "
                                         r"takes int32 \(4,\)"):
        transfer.pack(per_token, layout)
    missing = padded_batch()
    del missing["times"]
    with pytest.raises(ValueError, match="differ from the compiled step's"):
        transfer.pack(missing, layout)
    wide = padded_batch()
    wide["times"] = wide["times"].astype(np.float64)
    with pytest.raises(ValueError, match="'times': float64 .* cannot be packed"):
        transfer.layout_of(wide)
