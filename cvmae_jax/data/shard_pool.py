"""Running one function over the shards of a MEDS root on every core of a node.

Preparation works shard by shard (a MEDS subject's rows are all in one shard), so each pass is a
map over shards followed by a merge in shard order (see stream.py and window_records.py). A
`ShardPool` runs the map in `workers` processes: this one and workers - 1 started fresh
(``spawn``: safe after JAX or pyarrow started threads; pyarrow and numpy hold the GIL in places,
so threads would not scale). This process computes shards too, whenever the oldest shard
handed out is not ready, so it works from the first moment while the others start, and
between its merges. The results come back in shard order, so the merged result does not
depend on the number of workers, nor on which process computed what. The workers write the
records themselves: a shard's records are numbered from the count of its split's earlier
shards, which `RecordOffsets` gives a worker when those shards are counted (each count is an
empty file's name in a folder of the pool's: no process to start and ask); a shard finished
before an earlier one (the workers run side by side) goes back with its records, which the
process taking the results in order writes, so no worker waits for another.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

AHEAD_PER_WORKER = 2  # shards each other process is handed beyond those it finished
_END = object()  # no item left


def _share_cores(threads: int) -> None:
    """Worker set-up: pyarrow's compute threads (one per core by default) are shared out, so
    N workers do not start N x cores threads."""
    import pyarrow

    pyarrow.set_cpu_count(threads)


class ShardPool:
    """``map(fn, items)`` -> fn(item) for each item, in order, computed by `workers` processes
    (this one and workers - 1 others).

    At most 2 * AHEAD_PER_WORKER * workers results wait in this process, so its memory is
    bounded by a few shards' results whatever the number of shards. `fn` and the items must be
    picklable when workers > 1 (top-level functions, `functools.partial` of them). A worker's
    exception is raised here. Use as a context manager (which stops the workers).
    """

    def __init__(self, workers: int = 1):
        if int(workers) < 1:
            raise ValueError(f"config.data.prepare_workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self._pool = self._counts_dir = None
        self._context = multiprocessing.get_context("spawn")
        if self.workers > 1:
            self._pool = self._context.Pool(
                self.workers - 1, _share_cores, (max(1, (os.cpu_count() or 1) // self.workers),))

    def __str__(self) -> str:
        return f"{self.workers} process(es)"

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._counts_dir is not None:
            shutil.rmtree(self._counts_dir, ignore_errors=True)
            self._counts_dir = None

    def offsets(self) -> RecordOffsets:
        """Record numbering shared by this pool's workers (for functions passed to `map`), new
        for each call; its files are removed when the pool closes."""
        if self._pool is None:
            return RecordOffsets()
        if self._counts_dir is None:
            self._counts_dir = tempfile.mkdtemp(prefix="cvmae_record_counts_")
        return RecordOffsets(tempfile.mkdtemp(dir=self._counts_dir))

    def map(self, fn: Callable[[Any], Any], items: Iterable) -> Iterator:
        """Items are handed out in order: to the other processes, each kept AHEAD_PER_WORKER
        items ahead of what it finished, and to this process while the oldest item out is not
        ready; at most 2 * AHEAD_PER_WORKER * workers results wait to be taken. A worker's error
        stops the workers before it is raised here (none is left writing)."""
        if self._pool is None:
            yield from map(fn, items)
            return
        items, exhausted = iter(items), False
        queued: collections.deque = collections.deque()  # in item order: a worker's
        # AsyncResult, or (result,) computed here
        most = 2 * AHEAD_PER_WORKER * self.workers
        try:
            while True:
                busy = sum(not isinstance(q, tuple) and not q.ready() for q in queued)
                while (not exhausted and len(queued) < most
                       and busy < AHEAD_PER_WORKER * (self.workers - 1)):
                    item = next(items, _END)
                    if item is _END:
                        exhausted = True
                    else:
                        queued.append(self._pool.apply_async(fn, (item,)))
                        busy += 1
                if not queued:
                    return
                oldest = queued[0]
                if not (isinstance(oldest, tuple) or oldest.ready() or exhausted
                        or len(queued) >= most):
                    item = next(items, _END)  # this process takes the next item meanwhile
                    if item is _END:
                        exhausted = True
                    else:
                        queued.append((fn(item),))
                    continue
                queued.popleft()
                yield oldest[0] if isinstance(oldest, tuple) else oldest.get()
        except (Exception, KeyboardInterrupt):  # not GeneratorExit: a consumer may stop early
            self.close()
            raise


class RecordOffsets:
    """Where each shard's records start in the split-wide numbering (example_id 0, 1, ...).

    ``first_id(split, index, count)``: shard `index` of `split` has `count` records; returns
    how many records the split's shards 0..index-1 have if all of them have called it, else
    None (nothing waits: the caller hands the records to the process that takes the results in
    shard order, which knows every earlier count by then). Shared by processes through
    `folder` (picklable: a path), where each call leaves an empty file named
    ``<split>-<index>-<count>`` (a name is created whole, so no reader sees half a count);
    without a folder, a dict in one process, where the shards come in order and the answer is
    always known.
    """

    def __init__(self, folder: str | None = None):
        self._folder = folder
        self._counts: dict[tuple[str, int], int] = {}

    def first_id(self, split: str, index: int, count: int) -> int | None:
        self._counts[split, index] = count
        if self._folder is not None:
            open(os.path.join(self._folder, f"{split}-{index}-{count}"), "w").close()
            for name in os.listdir(self._folder):
                name_split, shard, shard_count = name.rsplit("-", 2)
                self._counts[name_split, int(shard)] = int(shard_count)
        earlier = [self._counts.get((split, i)) for i in range(index)]
        return None if None in earlier else sum(earlier)
