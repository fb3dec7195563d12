"""Running one function over the shards of a MEDS root on every core of a node.

Preparation works shard by shard (a MEDS subject's rows are all in one shard), so each pass is a
map over shards followed by a merge in shard order (see stream.py and window_records.py). A
`ShardPool` runs the map in this process (workers=1) or in `workers` processes started fresh
(``spawn``: safe after JAX or pyarrow started threads; pyarrow and numpy hold the GIL in places,
so threads would not scale), and hands the results back in shard order, so the merged result
does not depend on the number of workers. The workers write the records themselves: a shard's
records are numbered from the count of its split's earlier shards, which `RecordOffsets` hands
each worker once those shards are counted.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from multiprocessing.managers import SyncManager
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
        self._pool = self._manager = None
        self._context = multiprocessing.get_context("spawn")
        if self.workers > 1:
            self._pool = self._context.Pool(
                self.workers, _share_cores, (max(1, (os.cpu_count() or 1) // self.workers),))
            # started now, beside the workers and in the background, not when the windows
            # pass needs it (its process takes ~0.2 s to answer)
            self._manager, self._manager_error = SyncManager(ctx=self._context), None
            self._manager_started = threading.Thread(target=self._start_manager, daemon=True)
            self._manager_started.start()

    def _start_manager(self) -> None:
        try:
            self._manager.start()
        except Exception as error:  # noqa: BLE001 - raised by offsets(), in the caller's thread
            self._manager_error = error

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._manager is not None:
            self._manager_started.join()
            if self._manager_error is None:
                self._manager.shutdown()
            self._manager = None

    def offsets(self) -> RecordOffsets:
        """Record numbering shared by this pool's workers (for functions passed to `map`)."""
        if self._manager is None:
            return RecordOffsets({}, threading.Condition())
        self._manager_started.join()
        if self._manager_error is not None:
            raise RuntimeError("the preparation workers' record-numbering manager did not "
                               f"start: {self._manager_error}") from self._manager_error
        return RecordOffsets(self._manager.dict(), self._manager.Condition())

    def map(self, fn: Callable[[Any], Any], items: Iterable) -> Iterator:
        """Items are handed to the workers in order, so a worker waiting on `RecordOffsets` for
        an earlier item waits on one that is being computed. A worker's error stops the
        workers before it is raised here (none is left writing)."""
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(self._pool.apply_async(fn, (item,)))
                if len(pending) >= AHEAD_PER_WORKER * self.workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
        except (Exception, KeyboardInterrupt):  # not GeneratorExit: a consumer may stop early
            self.close()
            raise


class RecordOffsets:
    """Where each shard's records start in the split-wide numbering (example_id 0, 1, ...).

    ``first_id(split, index, count)``: shard `index` of `split` has `count` records; returns
    how many records the split's shards 0..index-1 have, once all of them have called it
    (waiting until then). Shared by processes through a multiprocessing manager (picklable), or
    a plain dict in one process, where the shards come in order and nothing waits.
    """

    def __init__(self, counts: MutableMapping, condition):
        self._counts, self._condition = counts, condition

    def first_id(self, split: str, index: int, count: int) -> int:
        with self._condition:
            self._counts[split, index] = count
            self._condition.notify_all()
            while True:
                counts = self._counts.copy()  # one call to a manager's dict, not one per key
                earlier = [counts.get((split, i)) for i in range(index)]
                if None not in earlier:
                    return sum(earlier)
                self._condition.wait()
