"""grain input pipelines over a prepared dataset: fixed-shape, padded numpy batches.

Every batch is a dict of numpy arrays with b rows and L = max_len positions:
  times float32 [b, L], codes int32 [b, L], values float32 [b, L],
  valid bool [b, L] (False on padding, where times/codes/values are 0), example_id int32 [b].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import numpy as np

from cvmae_jax.data.prepare import PreparedDataset
from cvmae_jax.data.row_stream import RowStream

BATCH_KEYS = ("times", "codes", "values", "valid", "example_id")


def _check(prepared: PreparedDataset, split: str, batch_size: int, max_len: int,
           shard_index: int, shard_count: int) -> None:
    if batch_size % shard_count or not 0 <= shard_index < shard_count:
        raise ValueError(f"batch size {batch_size} must be divisible by shard_count="
                         f"{shard_count}, and 0 <= shard_index={shard_index} < shard_count")
    if max_len < prepared.max_len:
        raise ValueError(f"max_len={max_len} is shorter than the prepared windows "
                         f"({prepared.max_len}); prepare the data with this max_len instead")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if split not in prepared.num_examples:
        raise ValueError(f"unknown split {split!r}; have {sorted(prepared.num_examples)}")


def shuffled_examples(prepared: PreparedDataset, split: str, global_batch_size: int,
                      max_len: int, seed: int, shard_index: int = 0,
                      shard_count: int = 1) -> grain.MapDataset:
    """The global training order after checking the settings: the split's examples reshuffled
    every epoch (deterministically from `seed`), repeated forever."""
    _check(prepared, split, global_batch_size, max_len, shard_index, shard_count)
    return grain.MapDataset.source(prepared.data_source(split)).seed(seed).shuffle().repeat(None)


def padded_rows(examples: list[dict], max_len: int, num_rows: int | None = None) -> dict:
    """Stored examples -> one padded batch of num_rows (default: one per example) rows:
    times/codes/values/valid [num_rows, max_len] (valid False and the rest 0 on padding, and on
    the rows past the examples) and example_id [num_rows] (-1 where an example has none)."""
    shape = (len(examples) if num_rows is None else num_rows, max_len)
    batch = {"times": np.zeros(shape, np.float32), "codes": np.zeros(shape, np.int32),
             "values": np.zeros(shape, np.float32), "valid": np.zeros(shape, bool),
             "example_id": np.full(shape[0], -1, np.int32)}
    for row, example in enumerate(examples):
        n = len(example["codes"])
        if n > max_len:
            raise ValueError(f"example {example.get('example_id', -1)} has {n} events > "
                             f"max_len={max_len}")
        for key in ("times", "codes", "values"):
            batch[key][row, :n] = example[key]
        batch["valid"][row, :n] = True
        batch["example_id"][row] = example.get("example_id", -1)
    return batch


@dataclasses.dataclass(frozen=True)
class _LocalBatchReader:
    """Local batch k -> this process's rows of global batch k (positions [k*G, (k+1)*G) of the
    global order), padded. A picklable class, so worker processes can run it."""

    order: grain.MapDataset
    global_batch_size: int
    first_row: int
    num_rows: int
    max_len: int

    def __call__(self, k: int) -> dict:
        start = k * self.global_batch_size + self.first_row
        return padded_rows([self.order[p] for p in range(start, start + self.num_rows)],
                           self.max_len)


def train_dataset(prepared: PreparedDataset, split: str, global_batch_size: int, max_len: int,
                  seed: int, shard_index: int = 0, shard_count: int = 1,
                  workers: int = 0) -> RowStream:
    """Infinite stream of this process's batches of global_batch_size // shard_count rows.

    All processes share one global order (every epoch reshuffled, deterministically from `seed`);
    global batch k is positions [k*B, (k+1)*B) of it and process `shard_index` reads only its
    block of rows of each global batch. So the global batches, and the training run, do not
    depend on the number of processes. Batches are read ahead in `workers` processes (0: in a
    thread of this one); iterators have get_state()/set_state() and can be saved with
    grain.checkpoint.CheckpointSave.
    """
    order = shuffled_examples(prepared, split, global_batch_size, max_len, seed, shard_index,
                              shard_count)
    local = global_batch_size // shard_count
    read = _LocalBatchReader(order, global_batch_size, shard_index * local, local, max_len)
    return RowStream(read, global_rows=local, first_row=0, num_rows=local, workers=workers)


def eval_batches(prepared: PreparedDataset, split: str, batch_size: int, max_len: int,
                 shard_index: int = 0, shard_count: int = 1) -> Iterator[dict]:
    """Every example of `split` once, in example_id order, in global batches of batch_size;
    the last one is padded with rows that have valid=False everywhere and example_id=-1.

    With shard_count > 1 this process gets block shard_index of each global batch
    (batch_size // shard_count rows); every process yields the same number of batches.
    """
    _check(prepared, split, batch_size, max_len, shard_index, shard_count)
    source = prepared.data_source(split)
    local = batch_size // shard_count
    for start in range(shard_index * local, len(source) + shard_index * local, batch_size):
        ids = list(range(start, min(start + local, len(source))))
        examples = source.__getitems__(ids) if ids else []
        for i, ex in zip(ids, examples):
            if ex["example_id"] != i:
                raise ValueError(f"{prepared.path}: record {i} of {split!r} holds example "
                                 f'{ex["example_id"]}; the files are not in example_id order')
        yield padded_rows(examples, max_len, local)
