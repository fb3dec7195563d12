"""Sequence packing: rows, segment ids and positions as attention and masking read them."""

import numpy as np

from cvmae_jax.data.packing import pack_rows


def _example(example_id: int, n: int) -> dict:
    return dict(times=np.arange(n, dtype=np.float32), codes=np.full(n, example_id, np.int32),
                values=np.ones(n, np.float32), example_id=example_id)


def test_pack_rows_numbers_segments_per_row_and_skips_empty_examples():
    """Each row's segment ids are 1..k over its non-empty examples (never above max_len, which
    attention's mask relies on), positions restart per example, and an example without events
    takes no segment and no slot."""
    lengths = [5, 0, 3, 0, 0, 2, 6, 0, 1]
    rows = pack_rows([_example(i, n) for i, n in enumerate(lengths)], max_len=8)
    assert rows["valid"].sum() == sum(lengths)
    for row in range(len(rows["valid"])):
        ids = rows["segment_ids"][row][rows["valid"][row]]
        assert list(np.unique(ids)) == list(range(1, ids.max() + 1))
        for segment in np.unique(ids):
            at = rows["segment_ids"][row] == segment
            assert len(np.unique(rows["example_id"][row][at])) == 1
            assert list(rows["positions"][row][at]) == list(range(at.sum()))
    assert rows["segment_ids"].max() <= 8
    packed_ids = set(np.unique(rows["example_id"][rows["valid"]]))
    assert packed_ids == {i for i, n in enumerate(lengths) if n}
