"""Sequence packing: several short windows per row, so padding does not eat the compute.

The global example order is the one ``pipeline.train_dataset`` uses (shuffled per epoch from
the seed). It is cut into chunks of ``PACK_CHUNK_BATCHES * global_batch_size`` consecutive
examples; each chunk is packed on its own, first-fit decreasing (longest example first, each
into the first row with room), and its rows are shuffled (seeded by the chunk index), so a chunk
is a pure function of its index: worker processes can pack chunks in parallel and the packed
batches do not depend on the number of processes or workers. Each process keeps its block of
rows of every global batch. Packed batches are dicts of numpy arrays [b, L]:
``times``, ``codes``, ``values``, ``valid``, per-token ``example_id``, ``segment_ids`` (1, 2, ...
per example in a row, 0 on padding) and ``positions`` (index of the token in its example).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from cvmae_jax.data.pipeline import shuffled_examples
from cvmae_jax.data.prepare import PreparedDataset
from cvmae_jax.data.row_stream import RowStream

# Examples per packed chunk, in global batches. Larger chunks leave fewer part-filled rows at
# chunk ends: on the benchmarks' long-tailed lengths (32-row batches of 256 slots; padding fills
# 52.5%), chunks of 1 / 2 / 4 / 8 / 16 batches' examples filled 95.4% / 97.4% / 98.7% / 99.3% /
# 99.6% of the token slots (grain's streaming first-fit packer, used before, 97.4%).
PACK_CHUNK_BATCHES = 4


def pack_rows(examples: list[dict], max_len: int, shuffle_seed=None) -> dict:
    """First-fit decreasing packing of examples (``times``, ``codes``, ``values`` [n], scalar
    ``example_id``) into rows of max_len tokens; returns the packed arrays [R, max_len], rows in
    a random order from ``shuffle_seed`` (an int or list of ints; None: in packing order)."""
    lengths = np.array([len(e["codes"]) for e in examples], np.int64)
    if len(lengths) and lengths.max() > max_len:
        raise ValueError(f"an example has {lengths.max()} events > max_len={max_len}")
    room = np.zeros(0, np.int64)  # free slots per open row
    row_of = np.zeros(len(examples), np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(room >= lengths[i])
        if len(fits):
            row_of[i] = fits[0]
        else:
            row_of[i] = len(room)
            room = np.append(room, max_len)
        room[row_of[i]] -= lengths[i]
    num_rows = len(room)
    shape = (num_rows, max_len)
    rows = {"times": np.zeros(shape, np.float32), "codes": np.zeros(shape, np.int32),
            "values": np.zeros(shape, np.float32), "example_id": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
    filled = np.zeros(num_rows, np.int64)
    segments = np.zeros(num_rows, np.int32)
    for i in np.argsort(row_of, kind="stable"):  # row by row, examples in input order
        row, n = row_of[i], lengths[i]
        if n == 0:  # no tokens, no segment: ids stay <= max_len, as attention's mask needs
            continue
        at = slice(filled[row], filled[row] + n)
        for key in ("times", "codes", "values"):
            rows[key][row, at] = examples[i][key]
        segments[row] += 1
        rows["example_id"][row, at] = examples[i]["example_id"]
        rows["segment_ids"][row, at] = segments[row]
        rows["positions"][row, at] = np.arange(n)
        filled[row] += n
    rows["valid"] = rows["segment_ids"] > 0
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(num_rows)
        rows = {key: value[order] for key, value in rows.items()}
    return rows


@dataclasses.dataclass(frozen=True)
class ChunkPacker:
    """Chunk c -> the packed rows of positions [c*E, (c+1)*E) of ``order`` (the global example
    order; anything indexable). Picklable, so worker processes can run it."""

    order: grain.MapDataset | Sequence[dict]
    examples_per_chunk: int
    max_len: int
    seed: int

    def __call__(self, chunk: int) -> dict:
        start = chunk * self.examples_per_chunk
        examples = [self.order[p] for p in range(start, start + self.examples_per_chunk)]
        return pack_rows(examples, self.max_len, shuffle_seed=[self.seed, chunk])


def packed_train_dataset(prepared: PreparedDataset, split: str, global_batch_size: int,
                         max_len: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                         workers: int = 0) -> RowStream:
    """Infinite stream of this process's packed batches (global_batch_size // shard_count rows).

    Every process packs the same global order the same way and keeps its rows, so the global
    batches do not depend on the number of processes (or of ``workers``, the processes packing
    ahead; 0: threads). Checkpointable like ``train_dataset``.
    """
    order = shuffled_examples(prepared, split, global_batch_size, max_len, seed,
                              shard_index, shard_count)
    local = global_batch_size // shard_count
    packer = ChunkPacker(order, PACK_CHUNK_BATCHES * global_batch_size, max_len, seed)
    return RowStream(packer, global_rows=global_batch_size, first_row=shard_index * local,
                     num_rows=local, workers=workers)
