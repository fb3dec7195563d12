"""Random access to a prepared split for training and evaluation: the TFDS dataset's
array_record files read directly, each record's tf.train.Example decoded into the four fields
the pipelines use.

``tfds.data_source`` reads the same files (and is what the data contract promises); its
generic numpy decoding of every feature costs ~290 us per example on the 2-core CPU VM, this
one ~95 us, which sets how many batches one process can feed an accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow_datasets.proto import tf_example_pb2

# field -> (tf.train.Feature list it is stored in, dtype the pipelines use)
FIELDS = {"times": ("float_list", np.float32), "codes": ("int64_list", np.int32),
          "values": ("float_list", np.float32)}


class LabRecords:
    """``len()``, ``[i]`` and ``__getitems__`` over one split -> dicts with ``times`` float32
    [n], ``codes`` int32 [n], ``values`` float32 [n] and ``example_id`` (int). Picklable, so
    grain worker processes can read it."""

    def __init__(self, dataset_path: str, split: str):
        self.files = [str(path) for path in
                      tfds.builder_from_directory(dataset_path).info.splits[split].filepaths]
        self.split = split
        self.records = ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.decode(self.records[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self.decode(raw, i) for raw, i in zip(self.records.__getitems__(indices), indices)]

    def decode(self, raw: bytes, index: int) -> dict:
        features = tf_example_pb2.Example.FromString(raw).features.feature
        missing = [name for name in (*FIELDS, "example_id") if name not in features]
        if missing:
            raise ValueError(f"{self.files}: record {index} of split {self.split!r} lacks "
                             f"field(s) {missing} (was it written by this version's prepare?)")
        example = {name: np.array(getattr(features[name], kind).value, dtype)
                   for name, (kind, dtype) in FIELDS.items()}
        example["example_id"] = int(features["example_id"].int64_list.value[0])
        return example
