"""What identifies a MEDS root's content in a prepared dataset's name: each file's path, size
and the sha256 of its bytes, not its times. A copy of the root (to a VM's local disk, to every
host of a job) names the same prepared dataset; a file rewritten in place, even to the same
size, names a new one.

Reading every byte costs about a second per 2 GB from the page cache (sha256 with the CPU's
SHA extensions), more from a network disk, so each file's digest is remembered in a cache on
this machine (``digest_cache_path``), keyed by the file's path, size, inode and modification
and status-change times: an unchanged file is read once, a rewritten or copied one again (a
write changes the status-change time even when the modification time is set back)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path

from absl import logging

from cvmae_jax.data import meds
from cvmae_jax.jsonio import read_json, write_json_atomic


def meds_identity(meds_dir: str | Path) -> list:
    """[relative path, size, sha256 hex digest] of the data shards and metadata files of a
    MEDS root, in a fixed order."""
    root = Path(meds_dir)
    files = [f for f in meds.data_files(root) + sorted((root / "metadata").glob("*"))
             if f.is_file()]
    cache = _read_cache()
    computed = {}
    out = []
    for f in files:
        stat = f.stat()
        key = str(f.resolve())
        signature = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = cache.get(key)
        if entry is None or entry[:-1] != signature:
            computed[key] = entry = [*signature, content_digest(f)]
        out.append([str(f.relative_to(root)), stat.st_size, entry[-1]])
    if computed:
        _add_to_cache(computed)
    return out


def content_digest(path: Path) -> str:
    """sha256 hex digest of the bytes of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_cache_path() -> Path:
    """``$XDG_CACHE_HOME/cvmae_jax/meds_digests_<host>.json`` (default ``~/.cache``): one file
    per machine, so hosts sharing a home folder, each with its own copy of the MEDS files at
    the same path, keep their own entries."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cvmae_jax" / f"meds_digests_{socket.gethostname()}.json"


def _read_cache() -> dict[str, list]:
    """The cache's entries {resolved path: [size, inode, mtime_ns, ctime_ns, digest]}; empty
    when it is missing or unreadable (every digest is then computed again)."""
    try:
        entries = read_json(digest_cache_path())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, list) and len(v) == 5}


def _add_to_cache(computed: dict[str, list]) -> None:
    """Adds ``computed`` to the cache as it is on disk now and drops the entries of files that
    no longer exist, under an exclusive lock on ``<cache>.lock``, so processes hashing other
    roots at the same time keep each other's entries. Where the lock stays taken for
    ``CACHE_LOCK_WAIT_S`` (a stopped process holds it) or the cache cannot be written (a
    read-only home), nothing is written: that only costs the next run the reading again."""
    path = digest_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            if not _locked(lock):
                logging.info("MEDS digest cache not written (%s.lock stayed locked for %g s): "
                             "the next run reads the files again", path, CACHE_LOCK_WAIT_S)
                return
            cache = _read_cache() | computed
            write_json_atomic(path, {k: v for k, v in cache.items() if os.path.exists(k)})
    except OSError as error:
        logging.info("MEDS digest cache not written (%s): the next run reads the files again",
                     error)


CACHE_LOCK_WAIT_S = 10


def _locked(lock) -> bool:
    """Whether the open file ``lock`` got an exclusive flock (released when it closes) within
    ``CACHE_LOCK_WAIT_S``; True where the filesystem has no locks (merged unlocked)."""
    deadline = time.monotonic() + CACHE_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError:
            return True
