"""Streaming writer of one tfds split as array_record shards (no TensorFlow, no shuffle buffer).

Records go to disk as they are written: memory holds one record plus array_record's own chunk
buffers, never the split. A shard is closed once it holds `shard_bytes` of records, so a split
of B bytes gives about B / shard_bytes files (at least one). Shards are written under temporary
names and renamed to tfds's `{dataset}-{split}.array_record-00000-of-00004` names once their
count is known; the caller writes the whole dataset in a temporary folder (see tfds_builder.py).
"""

from __future__ import annotations

import contextlib
import os

import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

_OPTIONS = "group_size:1"  # one record per chunk, as tfds writes it: fast random access


class SplitWriter:
    """Writes serialized records of one split, in order, into shards of ~`shard_bytes` bytes.

    template: the split's tfds file template (its data_dir is the folder written to).
    Use as a context manager (which closes an open shard if the block fails): `write(record)`
    each record, then `close()` for the split's `tfds.core.SplitInfo`.
    """

    def __init__(self, template: tfds.core.ShardedFileTemplate, shard_bytes: int):
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.template, self.shard_bytes = template, shard_bytes
        self.lengths: list[int] = []  # records per shard written so far
        self._writer: ArrayRecordWriter | None = None
        self._bytes = 0

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._writer is not None:  # the block failed mid-shard: release the file
            writer, self._writer = self._writer, None
            with contextlib.suppress(RuntimeError):  # the block's own error is the one raised
                writer.close()

    def _partial_path(self, index: int) -> str:
        return f"{self.template.filepath_prefix()}.array_record-{index:05d}.partial"

    def write(self, record: bytes) -> None:
        """Appends one serialized record; starts a new shard when the current one is full."""
        if self._writer is None:
            self._writer = ArrayRecordWriter(self._partial_path(len(self.lengths)), _OPTIONS)
            self.lengths.append(0)
            self._bytes = 0
        self._writer.write(record)
        self.lengths[-1] += 1
        self._bytes += len(record)
        if self._bytes >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()  # raises RuntimeError naming the file if writing failed
        self._writer = None

    def close(self) -> tfds.core.SplitInfo:
        """Closes the last shard, gives the shards their final names, describes the split."""
        if self._writer is not None:
            self._close_shard()
        num_bytes = 0
        for index in range(len(self.lengths)):
            final = self.template.sharded_filepath(shard_index=index, num_shards=len(self.lengths))
            os.replace(self._partial_path(index), final)
            num_bytes += os.path.getsize(final)
        return tfds.core.SplitInfo(name=self.template.split, shard_lengths=list(self.lengths),
                                   num_bytes=num_bytes, filename_template=self.template)
