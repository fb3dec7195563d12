"""The MEDS content in a prepared dataset's name: copies name the same dataset, rewritten files
a new one; each file's digest is computed once while it stays unchanged."""

import errno
import os
import shutil
import subprocess
import sys


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


def test_an_unchanged_file_is_read_once_and_a_rewritten_one_again(tiny_meds, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    digests = []
    real_digest = identity_lib.content_digest
    monkeypatch.setattr(identity_lib, "content_digest",
                        lambda path: digests.append(path) or real_digest(path))
    first = identity_lib.meds_identity(tiny_meds.root)
    assert len(digests) == len(first) > 1
    assert identity_lib.digest_cache_path().is_file()
    assert identity_lib.digest_cache_path().parent == tmp_path / "cache" / "cvmae_jax"
    digests.clear()
    assert identity_lib.meds_identity(tiny_meds.root) == first and digests == []
    shard = tiny_meds.root / "data" / "tuning" / "0.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    changed = identity_lib.meds_identity(tiny_meds.root)
    assert digests == [shard]
    assert [row for row in changed if row[0] != "data/tuning/0.parquet"] == \
        [row for row in first if row[0] != "data/tuning/0.parquet"] and changed != first


def test_an_unreadable_or_unwritable_cache_only_costs_reading_again(tiny_meds, tmp_path,
                                                                  monkeypatch):
    cache_home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    expected = identity_lib.meds_identity(tiny_meds.root)
    identity_lib.digest_cache_path().write_text("{not json")
    assert identity_lib.meds_identity(tiny_meds.root) == expected
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file" / "cache"))
    (tmp_path / "a_file").write_text("")  # the cache's folder cannot be made
    assert identity_lib.meds_identity(tiny_meds.root) == expected


def test_a_process_hashing_another_root_meanwhile_keeps_its_entries(tiny_meds, tmp_path,
                                                                     monkeypatch):
    """Another job adds its root's digests between this one's reading of the cache and its
    writing: both roots' entries stay, so neither is read again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    other = tmp_path / "other"
    shutil.copytree(tiny_meds.root, other)
    real_digest = identity_lib.content_digest
    meanwhile = []

    def digest(path):
        if not meanwhile:  # the other job runs from start to end now
            meanwhile.append(other)
            identity_lib.meds_identity(other)
        return real_digest(path)

    monkeypatch.setattr(identity_lib, "content_digest", digest)
    identity_lib.meds_identity(tiny_meds.root)
    cached = identity_lib._read_cache()
    for root in (tiny_meds.root, other):
        files = [f for f in root.rglob("*") if f.is_file()]
        assert files and all(str(f.resolve()) in cached for f in files), root


def test_the_cache_is_not_written_while_another_process_holds_its_lock(tiny_meds, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(identity_lib, "CACHE_LOCK_WAIT_S", 0.2)
    path = identity_lib.digest_cache_path()
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # another process, stopped while it holds the lock
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        first = identity_lib.meds_identity(tiny_meds.root)
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()
    assert identity_lib.meds_identity(tiny_meds.root) == first
    assert len(identity_lib._read_cache()) == len(first)


def test_a_rewritten_files_new_digest_replaces_the_cached_one_and_nothing_new_writes_nothing(
        tiny_meds, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    identity_lib.meds_identity(tiny_meds.root)
    shard = tiny_meds.root / "data" / "tuning" / "0.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    changed = identity_lib.meds_identity(tiny_meds.root)  # the new digest, cached
    digests, writes = [], []
    real_digest = identity_lib.content_digest
    monkeypatch.setattr(identity_lib, "content_digest",
                        lambda path: digests.append(path) or real_digest(path))
    monkeypatch.setattr(identity_lib, "write_json_atomic", lambda *args: writes.append(args))
    assert identity_lib.meds_identity(tiny_meds.root) == changed
    assert digests == [] and writes == []  # read from the cache; the cache left as it is


def test_the_cache_is_written_on_a_filesystem_without_locks(tiny_meds, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(identity_lib.fcntl, "flock", no_locks)
    first = identity_lib.meds_identity(tiny_meds.root)
    assert len(identity_lib._read_cache()) == len(first)


def test_the_entries_of_deleted_files_leave_the_cache(tiny_meds, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gone = tmp_path / "gone"
    shutil.copytree(tiny_meds.root, gone)
    identity_lib.meds_identity(gone)
    shutil.rmtree(gone)
    identity_lib.meds_identity(tiny_meds.root)  # computes digests: the cache is written again
    cached = identity_lib._read_cache()
    assert cached and not [key for key in cached if key.startswith(str(gone.resolve()))]
