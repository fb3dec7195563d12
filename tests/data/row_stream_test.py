"""RowStream: chunks of varying row counts cut into batches; process blocks; exact resume."""

import itertools

import numpy as np
import pytest

from cvmae_jax.data.row_stream import RowStream, _BackgroundBatches


def numbered_rows(chunk: int) -> dict:
    """Chunk c holds (c % 3) + 1 rows; each row records (chunk, row)."""
    rows = chunk % 3 + 1
    return {"chunk": np.full(rows, chunk), "row": np.arange(rows)}


def rows_of(batch):
    return list(zip(batch["chunk"].tolist(), batch["row"].tolist()))


def test_batches_are_consecutive_rows_across_chunk_boundaries():
    stream = iter(RowStream(numbered_rows, global_rows=4, first_row=0, num_rows=4))
    expected = list(itertools.islice(
        ((c, r) for c in itertools.count() for r in range(c % 3 + 1)), 40))
    assert expected[:5] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]  # batch 1 starts mid-chunk
    got = [row for _ in range(10) for row in rows_of(next(stream))]
    assert got == expected


def test_each_process_keeps_its_block_of_every_global_batch():
    whole = iter(RowStream(numbered_rows, global_rows=4, first_row=0, num_rows=4))
    parts = [iter(RowStream(numbered_rows, global_rows=4, first_row=2 * i, num_rows=2))
             for i in range(2)]
    for _ in range(8):
        assert rows_of(next(whole)) == rows_of(next(parts[0])) + rows_of(next(parts[1]))


@pytest.mark.parametrize("taken", [1, 2, 3, 5])
def test_state_restores_the_next_batch_mid_chunk(taken):
    stream = iter(RowStream(numbered_rows, global_rows=4, first_row=0, num_rows=4))
    for _ in range(taken):
        next(stream)
    state = stream.get_state()
    expected = [rows_of(next(stream)) for _ in range(4)]
    restored = iter(RowStream(numbered_rows, global_rows=4, first_row=0, num_rows=4))
    next(restored)  # a position to move away from
    restored.set_state(state)
    assert [rows_of(next(restored)) for _ in range(4)] == expected


def failing_at_chunk_2(chunk: int) -> dict:
    if chunk == 2:
        raise ValueError("chunk 2 is unreadable")
    return numbered_rows(chunk)


def test_an_error_while_assembling_ahead_reaches_the_training_loop():
    stream = RowStream(failing_at_chunk_2, global_rows=2, first_row=0, num_rows=2)
    batches = _BackgroundBatches(stream, chunk=0, row=0)  # the thread used with workers > 0
    try:
        first, position = batches.get()
        assert rows_of(first) == [(0, 0), (1, 0)] and position == (1, 1)
        for _ in range(2):  # and again: a retry does not wait forever
            with pytest.raises(ValueError, match="chunk 2 is unreadable"):
                batches.get()
    finally:
        batches.stop()
    assert not batches.thread.is_alive()
