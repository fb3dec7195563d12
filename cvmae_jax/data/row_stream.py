"""A checkpointable stream of training batches built from numbered chunks of rows.

A *chunk* is a dict of numpy arrays that share their first axis (rows), computed by a pure
function of its index: a padded batch (``pipeline.train_dataset``) or a packed block of rows
(``packing.packed_train_dataset``). The stream concatenates the chunks' rows in index order,
cuts them into global batches, and keeps this process's block of rows of each.

Chunks are computed ahead by grain: in READ_THREADS thread(s) of this process (``workers=0``),
or in ``workers`` separate processes (``grain``'s ``mp_prefetch``; no GIL, so the chunks are
made in parallel, which fast accelerators need); with workers, a background thread cuts them
into batches ahead. The position saved in checkpoints is the next row (chunk index, row in it), so a
run resumes on the same batches whatever the worker count.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
from collections.abc import Callable

import grain
import numpy as np
from absl import flags, logging

Chunk = dict[str, np.ndarray]

CHUNKS_AHEAD_PER_WORKER = 2  # finished chunks each worker process keeps ready
READ_THREADS = 1  # threads computing chunks when there are no workers (2 or 4: slower)
CHUNKS_AHEAD_IN_THREADS = 4  # finished chunks the threads keep ready (workers=0)
BATCHES_AHEAD = 2  # batches cut from the chunks, ready for the training loop
STOP_WAIT_S = 30  # how long close() waits for the background thread before closing anyway


def _worker_ignores_stop_signals(worker_index: int, worker_count: int) -> None:
    """Worker set-up: SIGTERM/SIGINT sent to the whole process group (a scheduler's preemption,
    Ctrl-C) leave the workers to the training process, which saves its checkpoint and then
    stops them (grain sets their stop event and kills them if they do not exit)."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class RowStream:
    """Infinite stream of ``[num_rows, ...]`` batches: rows ``[first_row, first_row + num_rows)``
    of each global batch of ``global_rows`` consecutive rows of chunks 0, 1, 2, ...

    Args:
      make_chunk: chunk index -> Chunk; picklable when ``workers > 0`` (it runs in the workers).
        One with an ``anchored(chunk, row)`` method (``packing.ChunkPacker``) is told where the
        stream starts (the next global batch begins at that row of that chunk).
      global_rows / first_row / num_rows: the global batch size and this process's rows of it.
      workers: worker processes computing chunks (0: READ_THREADS threads of this process).
    """

    def __init__(self, make_chunk: Callable[[int], Chunk], global_rows: int, first_row: int,
                 num_rows: int, workers: int = 0):
        if workers < 0:
            raise ValueError(f"config.data.workers must be >= 0, got {workers}")
        self.make_chunk, self.global_rows = make_chunk, global_rows
        self.first_row, self.num_rows = first_row, num_rows
        self.workers = workers

    def __iter__(self) -> "RowStreamIterator":
        return RowStreamIterator(self)

    def chunks_from(self, first_chunk: int, row: int = 0) -> grain.IterDataset:
        """Chunks first_chunk, first_chunk + 1, ..., computed ahead by workers or threads, for
        a stream whose next global batch starts at `row` of first_chunk."""
        make_chunk = self.make_chunk
        if hasattr(make_chunk, "anchored"):
            make_chunk = make_chunk.anchored(first_chunk, row)
        chunks = grain.MapDataset.range(first_chunk, np.iinfo(np.int64).max).map(make_chunk)
        if self.workers:
            if not flags.FLAGS.is_parsed():  # outside an absl app (tests, notebooks): grain's
                flags.FLAGS.mark_as_parsed()  # worker set-up reads its flags' defaults
            # Each worker computes its chunks one at a time (grain's default is 16 threads).
            serial = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
            return chunks.to_iter_dataset(serial).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers,
                                             per_worker_buffer_size=CHUNKS_AHEAD_PER_WORKER),
                worker_init_fn=_worker_ignores_stop_signals)
        return chunks.to_iter_dataset(grain.ReadOptions(
            num_threads=READ_THREADS, prefetch_buffer_size=CHUNKS_AHEAD_IN_THREADS))


class _BatchAssembler:
    """Cuts chunks into batches from a given row on: ``get()`` -> (batch, position of the row
    after it). Owns the grain iterator computing the chunks."""

    def __init__(self, stream: RowStream, chunk: int, row: int):
        self.stream, self.chunk, self.row = stream, chunk, row
        self.chunks = iter(stream.chunks_from(chunk, row))
        self.current: Chunk | None = None  # chunk `self.chunk`, once fetched

    def get(self) -> tuple[Chunk, tuple[int, int]]:
        parts, wanted = [], self.stream.global_rows
        while wanted:
            if self.current is None:
                self.current = self._receive(next(self.chunks))
            rows = len(next(iter(self.current.values())))
            take = min(wanted, rows - self.row)
            parts.append({k: v[self.row:self.row + take] for k, v in self.current.items()})
            wanted -= take
            self.row += take
            if self.row == rows:
                self.chunk, self.row, self.current = self.chunk + 1, 0, None
        keep = slice(self.stream.first_row, self.stream.first_row + self.stream.num_rows)
        if len(parts) == 1:
            batch = {k: v[keep] for k, v in parts[0].items()}
        else:
            batch = {k: np.concatenate([p[k] for p in parts])[keep] for k in parts[0]}
        return batch, (self.chunk, self.row)

    def _receive(self, chunk: Chunk) -> Chunk:
        """A chunk from the workers copied out of grain's shared memory, which is then freed
        at once: views of it held until the process exits (the current chunk, the batches
        cut from it) are never unlinked, and Python's resource tracker warns of each."""
        return {k: np.array(v) for k, v in chunk.items()} if self.stream.workers else chunk

    def stop(self) -> None:
        self.chunks.close()


class _BackgroundBatches:
    """Runs a _BatchAssembler in a thread, BATCHES_AHEAD batches ahead, so that taking a batch
    (receiving chunks from the worker processes, slicing, concatenating) is off the training
    loop. (Without workers, grain's thread already computes the chunks ahead; a second thread
    only added GIL contention: 67-81 vs ~100 steps/s on a host-bound tiny model, 2 cores.)"""

    def __init__(self, stream: RowStream, chunk: int, row: int):
        self.ready: queue.Queue = queue.Queue(BATCHES_AHEAD)
        self.stopping = threading.Event()
        self.assembler = _BatchAssembler(stream, chunk, row)
        self.error: BaseException | None = None  # raised again by every later get()
        self.thread = threading.Thread(target=self._run, name="row_stream", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                item = self.assembler.get()
                while not self.stopping.is_set():
                    try:
                        self.ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # re-raised in the training loop's thread
            self.ready.put(error)

    def get(self) -> tuple[Chunk, tuple[int, int]]:
        if self.error is None:
            item = self.ready.get()
            if not isinstance(item, BaseException):
                return item
            self.error = item
        raise self.error

    def stop(self) -> None:
        self.stopping.set()
        for _ in range(int(STOP_WAIT_S / 0.1)):
            if not self.thread.is_alive():
                break
            try:
                self.ready.get(timeout=0.1)  # unblock a waiting put
            except queue.Empty:
                pass
        else:
            logging.warning("The input pipeline's thread did not stop within %d s (a worker "
                            "process hangs?); stopping its workers anyway", STOP_WAIT_S)
        self.assembler.stop()


class RowStreamIterator:
    """Iterator over a RowStream with ``get_state``/``set_state`` (JSON bytes), so that
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` store its position: the row after
    the last batch handed out, whatever the background thread has assembled beyond it."""

    def __init__(self, stream: RowStream):
        self.stream = stream
        self.position = (0, 0)  # next row to hand out: (chunk index, row in that chunk)
        self._batches: _BackgroundBatches | _BatchAssembler | None = None

    def __iter__(self) -> "RowStreamIterator":
        return self

    def __next__(self) -> Chunk:
        if self._batches is None:
            ahead = _BackgroundBatches if self.stream.workers else _BatchAssembler
            self._batches = ahead(self.stream, *self.position)
        batch, self.position = self._batches.get()
        return batch

    def get_state(self) -> bytes:
        chunk, row = self.position
        return json.dumps({"chunk": chunk, "row": row}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        self.close()
        self.position = (int(saved["chunk"]), int(saved["row"]))

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint restore; batches are assembled from the next one on."""

    def close(self) -> None:
        """Stops the thread and the worker processes (they restart on the next batch)."""
        if self._batches is not None:
            self._batches.stop()
        self._batches = None
