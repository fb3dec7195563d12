"""Sequence packing: several short windows per row, so padding does not eat the compute.

The global example order is the one ``pipeline.train_dataset`` uses (shuffled per epoch from
the seed). It is cut into chunks of ``PACK_CHUNK_BATCHES * global_batch_size`` consecutive
examples; each chunk is packed on its own, first-fit decreasing (longest example first, each
into the first row with room), and its rows are shuffled (seeded by the chunk index), so a chunk
is a pure function of its index: worker processes can pack chunks in parallel and the packed
batches do not depend on the number of processes or workers. Each process keeps its block of
rows of every global batch, and reads only the examples of those rows: the packing is planned
from the windows' lengths (stored by prepare), and where a chunk's rows fall in the global
batches follows from the rows of the chunks before it (planned from lengths too). Packed
batches are dicts of numpy arrays [b, L]: ``times``, ``codes``, ``values``, ``valid``,
per-token ``example_id``, ``segment_ids`` (1, 2, ... per example in a row, 0 on padding) and
``positions`` (index of the token in its example).
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
    plan = pack_plan(np.array([len(e["codes"]) for e in examples], np.int64), max_len,
                     shuffle_seed)
    return fill_rows([[examples[i] for i in row] for row in plan], max_len)


def pack_plan(lengths: np.ndarray, max_len: int, shuffle_seed=None) -> list[np.ndarray]:
    """First-fit decreasing packing of examples of `lengths` [n] into rows of max_len tokens:
    per row (in a random order from ``shuffle_seed``; None: packing order), the indices of its
    examples in input order."""
    if len(lengths) and lengths.max() > max_len:
        raise ValueError(f"an example has {lengths.max()} events > max_len={max_len}")
    room = np.zeros(0, np.int64)  # free slots per open row
    row_of = np.zeros(len(lengths), np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(room >= lengths[i])
        if len(fits):
            row_of[i] = fits[0]
        else:
            row_of[i] = len(room)
            room = np.append(room, max_len)
        room[row_of[i]] -= lengths[i]
    by_row = np.argsort(row_of, kind="stable")  # row by row, examples in input order
    plan = np.split(by_row, np.cumsum(np.bincount(row_of, minlength=len(room)))[:-1]) \
        if len(room) else []
    if shuffle_seed is not None:
        plan = [plan[r] for r in np.random.default_rng(shuffle_seed).permutation(len(room))]
    return plan


def fill_rows(rows_examples: list[list[dict] | None], max_len: int) -> dict:
    """Packed arrays [R, max_len] of R rows, row r holding the examples rows_examples[r] in
    that order (None: an empty row, for rows another process keeps)."""
    num_rows = len(rows_examples)
    shape = (num_rows, max_len)
    rows = {"times": np.zeros(shape, np.float32), "codes": np.zeros(shape, np.int32),
            "values": np.zeros(shape, np.float32), "example_id": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
    for row, examples in enumerate(rows_examples):
        filled, segment = 0, 0
        for example in examples or ():
            n = len(example["codes"])
            if n == 0:  # no tokens, no segment: ids stay <= max_len, as attention's mask needs
                continue
            at = slice(filled, filled + n)
            for key in ("times", "codes", "values"):
                rows[key][row, at] = example[key]
            segment += 1
            rows["example_id"][row, at] = example["example_id"]
            rows["segment_ids"][row, at] = segment
            rows["positions"][row, at] = np.arange(n)
            filled += n
    rows["valid"] = rows["segment_ids"] > 0
    return rows


@dataclasses.dataclass(frozen=True)
class ChunkPacker:
    """Chunk c -> the packed rows of positions [c*E, (c+1)*E) of ``order`` (the global example
    order; anything indexable), only the rows this process keeps filled: those falling at
    [first_row, first_row + num_rows) of a global batch of global_rows rows. The plan comes
    from ``lengths`` of the examples at ``indices`` (the global order as example indices), so
    only the kept rows' examples are read. Picklable, so worker processes can run it.

    anchor: (chunk, phase), the rows before `chunk` modulo global_rows (a stream resumed at row
    r of chunk c: phase -r); later chunks' phases follow from the plans of those between.
    """

    order: grain.MapDataset | Sequence[dict]
    indices: grain.MapDataset | Sequence[int]
    lengths: np.ndarray
    examples_per_chunk: int
    max_len: int
    seed: int
    global_rows: int
    first_row: int = 0
    num_rows: int | None = None  # None: every row
    anchor: tuple[int, int] = (0, 0)
    _phases: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def anchored(self, chunk: int, row: int) -> ChunkPacker:
        """This packer for a stream whose next global batch starts at row `row` of `chunk`."""
        return dataclasses.replace(self, anchor=(chunk, -row % self.global_rows), _phases={})

    def plan(self, chunk: int) -> list[np.ndarray]:
        """The chunk's rows: positions (in the chunk) of each row's examples."""
        start = chunk * self.examples_per_chunk
        ids = [self.indices[p] for p in range(start, start + self.examples_per_chunk)]
        return pack_plan(self.lengths[ids], self.max_len, shuffle_seed=[self.seed, chunk])

    def phase(self, chunk: int) -> int:
        """Rows before `chunk` modulo global_rows (chunk >= the anchor's)."""
        known = {**dict([self.anchor]), **self._phases}
        at = max(c for c in known if c <= chunk)
        phase = known[at]
        for c in range(at, chunk):
            phase = (phase + len(self.plan(c))) % self.global_rows
        self._phases.clear()  # one phase kept: chunks come in increasing order
        self._phases[chunk] = phase
        return phase

    def __call__(self, chunk: int) -> dict:
        start = chunk * self.examples_per_chunk
        plan = self.plan(chunk)
        slot = (self.phase(chunk) + np.arange(len(plan))) % self.global_rows
        keep = slot >= self.first_row
        if self.num_rows is not None:
            keep &= slot < self.first_row + self.num_rows
        return fill_rows([[self.order[start + i] for i in row] if kept else None
                          for row, kept in zip(plan, keep)], self.max_len)


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
    lengths = prepared.window_lengths(split)
    indices = grain.MapDataset.range(len(lengths)).seed(seed).shuffle().repeat(None)
    packer = ChunkPacker(order, indices, lengths, PACK_CHUNK_BATCHES * global_batch_size,
                         max_len, seed, global_batch_size, shard_index * local, local)
    return RowStream(packer, global_rows=global_batch_size, first_row=shard_index * local,
                     num_rows=local, workers=workers)
