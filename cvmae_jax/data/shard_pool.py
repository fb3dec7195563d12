"""Running one function over the shards of a MEDS root on every core of a node.

Preparation works shard by shard (a MEDS subject's rows are all in one shard), so each pass is a
map over shards followed by a merge in shard order (see stream.py and window_records.py). A
`ShardPool` runs the map in this process (workers=1) or in `workers` processes started fresh
(``spawn``: safe after JAX or pyarrow started threads; pyarrow and numpy hold the GIL in places,
so threads would not scale), and hands the results back in shard order, so the merged result
does not depend on the number of workers.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

AHEAD_PER_WORKER = 2  # shards handed out per worker before their results are taken


def _share_cores(threads: int) -> None:
    """Worker set-up: pyarrow's compute threads (one per core by default) are shared out, so
    N workers do not start N x cores threads."""
    import pyarrow

    pyarrow.set_cpu_count(threads)


class ShardPool:
    """``map(fn, items)`` -> fn(item) for each item, in order, computed by `workers` processes.

    At most AHEAD_PER_WORKER * workers results wait in this process, so its memory is bounded
    by a few shards' results whatever the number of shards. `fn` and the items must be
    picklable when workers > 1 (top-level functions, `functools.partial` of them). A worker's
    exception is raised here. Use as a context manager (which stops the workers).
    """

    def __init__(self, workers: int = 1):
        if int(workers) < 1:
            raise ValueError(f"config.data.prepare_workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self._pool = None
        if self.workers > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, _share_cores, (max(1, (os.cpu_count() or 1) // self.workers),))

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, fn: Callable[[Any], Any], items: Iterable) -> Iterator:
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(self._pool.apply_async(fn, (item,)))
            if len(pending) >= AHEAD_PER_WORKER * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
