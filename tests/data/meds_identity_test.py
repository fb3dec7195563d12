"""The MEDS content in a prepared dataset's name: copies name the same dataset, rewritten files
a new one, large Parquet files by their footer."""

import os
import shutil

import pyarrow.parquet as pq

from cvmae_jax.data import meds_identity as identity_lib
from cvmae_jax.data.tfds_builder import MedsLabConfig


def test_a_copy_with_other_times_names_the_same_dataset(tiny_meds, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_meds.root, copy)
    for folder, _, names in os.walk(copy):
        for name in names:
            os.utime(os.path.join(folder, name), ns=(1, 1))
    assert (MedsLabConfig.create(tiny_meds.config(), copy).name
            == MedsLabConfig.create(tiny_meds.config(), tiny_meds.root).name)


def test_same_size_same_times_other_bytes_names_a_new_dataset(tiny_meds):
    before = MedsLabConfig.create(tiny_meds.config()).name
    path = tiny_meds.root / "data" / "tuning" / "0.parquet"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; restored times below
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert MedsLabConfig.create(tiny_meds.config()).name != before


def test_large_parquet_files_are_identified_by_their_footer(tiny_meds, tmp_path, monkeypatch):
    monkeypatch.setattr(identity_lib, "_READ_WHOLE_BYTES", 0)  # every file counts as large
    shard = tiny_meds.root / "data" / "train" / "0.parquet"
    table = pq.read_table(shard)
    footer = pq.ParquetFile(shard).metadata.serialized_size
    copy = tmp_path / "copy.parquet"
    shutil.copyfile(shard, copy)
    assert identity_lib.content_digest(copy) == identity_lib.content_digest(shard)
    values = table.column("numeric_value").to_pylist()
    first = next(i for i, v in enumerate(values) if v is not None)
    values[first] += 1000.0  # a new maximum: the footer's statistics change
    edited = tmp_path / "edited.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("numeric_value"),
                                    "numeric_value", [values]).cast(table.schema), edited)
    assert identity_lib.content_digest(edited) != identity_lib.content_digest(shard)
    read = []
    real_open = open

    def counting_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        real_read = handle.read
        handle.read = lambda n=-1: read.append(len(data := real_read(n))) or data
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    identity_lib.content_digest(shard)
    assert sum(read) == footer + 8 < shard.stat().st_size  # the footer, not the file


def test_a_large_file_that_is_not_parquet_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(identity_lib, "_READ_WHOLE_BYTES", 0)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(b'{"x": 1}' + b" " * 100 + b"PAR1")
    b.write_bytes(b'{"x": 2}' + b" " * 100 + b"PAR1")
    assert identity_lib.content_digest(a) != identity_lib.content_digest(b)
