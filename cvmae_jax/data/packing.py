"""Sequence packing: several short windows per row, so padding does not eat the compute.

The global example order is the one ``pipeline.train_dataset`` uses (shuffled per epoch from
the seed); grain's first-fit packer fills ``global_batch_size`` rows at a time from it, and each
process keeps its block of rows. Packed batches are dicts of numpy arrays [b, L]:
``times``, ``codes``, ``values``, ``valid``, per-token ``example_id``, ``segment_ids`` (1, 2, ...
per example in a row, 0 on padding) and ``positions`` (index of the token in its example).
"""

from __future__ import annotations

import functools

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from cvmae_jax.data.pipeline import READ_THREADS, shuffled_examples
from cvmae_jax.data.prepare import PreparedDataset

_TOKEN_FEATURES = ("times", "codes", "values", "example_id")
# Open rows the packer fills at once, per row of a batch. More rows fit windows better: on the
# benchmarks' long-tailed lengths with 32-row batches, 1 / 2 / 4 / 8 bins per row filled
# 94.7% / 96.0% / 97.4% / 97.9% of the token slots.
BINS_PER_ROW = 4


def _token_features(example: dict) -> dict:
    """A stored example -> per-token arrays [n] (the example id repeated on every token)."""
    n = len(example["codes"])
    return dict(times=np.asarray(example["times"], np.float32),
                codes=np.asarray(example["codes"], np.int32),
                values=np.asarray(example["values"], np.float32),
                example_id=np.full(n, example["example_id"], np.int32))


def _local_rows(batch: dict, first_row: int, num_rows: int) -> dict:
    """This process's rows of a packed global batch, in the training batch format."""
    rows = slice(first_row, first_row + num_rows)
    segment_ids = batch["codes_segment_ids"][rows].astype(np.int32)
    out = {name: batch[name][rows] for name in _TOKEN_FEATURES}
    out.update(segment_ids=segment_ids, positions=batch["codes_positions"][rows].astype(np.int32),
               valid=segment_ids > 0)
    return out


def packed_train_dataset(prepared: PreparedDataset, split: str, global_batch_size: int,
                         max_len: int, seed: int, shard_index: int = 0,
                         shard_count: int = 1) -> grain.IterDataset:
    """Infinite stream of this process's packed batches (global_batch_size // shard_count rows).

    Every process packs the same global order the same way and keeps its rows, so the global
    batches do not depend on the number of processes. Checkpointable like ``train_dataset``.
    """
    examples = shuffled_examples(prepared, split, global_batch_size, max_len, seed,
                                 shard_index, shard_count)
    examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                          prefetch_buffer_size=global_batch_size))
    local = global_batch_size // shard_count
    return pack_examples(examples, global_batch_size, max_len, shard_index * local, local)


def pack_examples(examples: grain.IterDataset, global_batch_size: int, max_len: int,
                  first_row: int = 0, num_rows: int | None = None) -> grain.IterDataset:
    """Packs a stream of examples (dicts with ``times``, ``codes``, ``values`` [n] and a scalar
    ``example_id``) first-fit into batches of global_batch_size rows of max_len tokens, and
    keeps rows [first_row, first_row + num_rows) of each (all by default)."""
    packed = FirstFitPackIterDataset(
        examples.map(_token_features),
        length_struct={name: max_len for name in _TOKEN_FEATURES},
        num_packing_bins=BINS_PER_ROW * global_batch_size, shuffle_bins=False)
    return packed.batch(global_batch_size, drop_remainder=True).map(functools.partial(
        _local_rows, first_row=first_row, num_rows=num_rows or global_batch_size))
