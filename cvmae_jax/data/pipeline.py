"""grain input pipelines over a prepared dataset: fixed-shape, padded numpy batches.

Every batch is a dict of numpy arrays with b rows and L = max_len positions:
  times float32 [b, L], codes int32 [b, L], values float32 [b, L],
  valid bool [b, L] (False on padding, where times/codes/values are 0), example_id int32 [b].
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from cvmae_jax.data.prepare import PreparedDataset

BATCH_KEYS = ("times", "codes", "values", "valid", "example_id")
READ_THREADS = 8
BATCHES_AHEAD = 2  # stacked batches waiting for the train loop


def pad_example(example: dict, max_len: int) -> dict:
    """One stored example -> fixed-length arrays [max_len] plus a scalar example_id (-1 when the
    example has none, e.g. a label window)."""
    n = len(example["codes"])
    example_id = example.get("example_id", -1)
    if n > max_len:
        raise ValueError(f"example {example_id} has {n} events > max_len={max_len}")
    out = {}
    for key, dtype in (("times", np.float32), ("codes", np.int32), ("values", np.float32)):
        out[key] = np.zeros(max_len, dtype)
        out[key][:n] = example[key]
    out["valid"] = np.arange(max_len) < n
    out["example_id"] = np.int32(example_id)
    return out


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


def train_dataset(prepared: PreparedDataset, split: str, global_batch_size: int, max_len: int,
                  seed: int, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Infinite stream of this process's batches of global_batch_size // shard_count rows.

    All processes share one global order (every epoch reshuffled, deterministically from `seed`);
    global batch k is positions [k*B, (k+1)*B) of it and process `shard_index` reads only its
    block of rows of each global batch. So the global batches, and the training run, do not
    depend on the number of processes. Iterators have get_state()/set_state() and can be saved
    with grain.checkpoint.CheckpointSave.
    """
    order = shuffled_examples(prepared, split, global_batch_size, max_len, seed, shard_index,
                              shard_count)
    local = global_batch_size // shard_count

    def read(k: int) -> dict:
        position = (k // local) * global_batch_size + shard_index * local + k % local
        return pad_example(order[position], max_len)

    ds = grain.MapDataset.range(len(order) // global_batch_size * local).map(read)
    # Threads read and pad examples ahead; the buffer holds about two batches.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                              prefetch_buffer_size=2 * local))
    # A background thread also stacks the batches ahead, so the train loop only pops one.
    return grain.experimental.ThreadPrefetchIterDataset(
        ds.batch(local, drop_remainder=True), prefetch_buffer_size=BATCHES_AHEAD)


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
    empty = {"times": np.zeros(0, np.float32), "codes": np.zeros(0, np.int32),
             "values": np.zeros(0, np.float32), "example_id": -1}
    for start in range(shard_index * local, len(source) + shard_index * local, batch_size):
        ids = list(range(start, min(start + local, len(source))))
        examples = source.__getitems__(ids) if ids else []
        for i, ex in zip(ids, examples):
            if ex["example_id"] != i:
                raise ValueError(f"{prepared.path}: record {i} of {split!r} holds example "
                                 f'{ex["example_id"]}; the files are not in example_id order')
        rows = [pad_example(ex, max_len) for ex in examples]
        rows += [pad_example(empty, max_len)] * (local - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
