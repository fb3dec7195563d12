"""One tfds split written as array_record files, one file per MEDS shard (no TensorFlow).

Each MEDS shard's records go to their own part file (`part_path`), so the shards can be written
by separate processes; `finish_split` then gives the parts that hold records tfds's
``{dataset}-{split}.array_record-00000-of-00004`` names, in shard order. The caller writes the
whole dataset in a temporary folder (see tfds_builder.py), so a failed write leaves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from array_record.python.array_record_module import ArrayRecordWriter

if TYPE_CHECKING:  # the workers that write parts need no tfds (0.3 s of imports each)
    import tensorflow_datasets as tfds

_OPTIONS = "group_size:1"  # one record per chunk, as tfds writes it: fast random access


def part_path(template: tfds.core.ShardedFileTemplate, shard_index: int) -> str:
    """Where the records of a split's `shard_index`-th MEDS shard are written."""
    return f"{template.filepath_prefix()}.array_record-{shard_index:05d}.partial"


def write_part(path: str, records: Iterable[bytes]) -> None:
    """Writes `records` (serialized, in order) to a new array_record file. Raises OSError
    naming the file if writing fails (array_record raises RuntimeError, say on a full disk)."""
    try:
        writer = ArrayRecordWriter(path, _OPTIONS)
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"{path}: could not write the prepared records ({reason})") from error


def finish_split(template: tfds.core.ShardedFileTemplate,
                 records_per_shard: Sequence[int]) -> tfds.core.SplitInfo:
    """Renames the parts of the MEDS shards that have records (the i-th shard's part written
    by `write_part` unless records_per_shard[i] is 0) to tfds's names; the split's info."""
    import tensorflow_datasets as tfds

    parts = [(i, n) for i, n in enumerate(records_per_shard) if n]
    num_bytes = 0
    for index, (shard_index, _) in enumerate(parts):
        final = template.sharded_filepath(shard_index=index, num_shards=len(parts))
        os.replace(part_path(template, shard_index), final)
        num_bytes += os.path.getsize(final)
    return tfds.core.SplitInfo(name=template.split, shard_lengths=[n for _, n in parts],
                               num_bytes=num_bytes, filename_template=template)
