"""What identifies a MEDS root's content in a prepared dataset's name: each file's path, size
and a digest of its content, not its times. A copy of the root (to a VM's local disk, to every
host of a job) names the same prepared dataset; a rewritten file names a new one.

A large Parquet file is identified by its footer, which holds every row group's row count,
byte sizes and column statistics, so the digest reads kilobytes, not the file; other files are
read whole."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from cvmae_jax.data import meds

_PARQUET_MAGIC = b"PAR1"
_READ_WHOLE_BYTES = 16 << 20  # files up to this size are hashed in full


def meds_identity(meds_dir: str | Path) -> list:
    """[relative path, size, content digest] of the data shards and metadata files of a MEDS
    root, in a fixed order."""
    root = Path(meds_dir)
    files = meds.data_files(root) + sorted((root / "metadata").glob("*"))
    return [[str(f.relative_to(root)), f.stat().st_size, content_digest(f)]
            for f in files if f.is_file()]


def content_digest(path: Path) -> str:
    """sha256 hex digest of the file at ``path``; of its Parquet footer (length and "PAR1"
    included) when it is a Parquet file larger than 16 MiB."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size > _READ_WHOLE_BYTES:
            f.seek(size - 8)
            tail = f.read(8)
            footer_len = struct.unpack("<I", tail[:4])[0]
            if tail[4:] == _PARQUET_MAGIC and footer_len + 8 <= size:
                f.seek(size - 8 - footer_len)
                return hashlib.sha256(f.read(footer_len) + tail).hexdigest()
            f.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
