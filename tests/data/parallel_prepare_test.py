"""Preparation on several processes (config.data.prepare_workers) writes the same files."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pytest

from cvmae_jax.config import default_config
from cvmae_jax.data import meds, tfds_builder
from cvmae_jax.data.plan import plan_dataset
from cvmae_jax.data.prepare import prepare_dataset
from cvmae_jax.data.shard_pool import ShardPool
from cvmae_jax.data.stats import CodeMoments, Reservoirs
from cvmae_jax.data.tfds_builder import MedsLabConfig
from cvmae_jax.data.example_proto import renumbered, serialize


def _files(path) -> dict[str, bytes]:
    """The version folder's files (records, data_stats.json, reports) by name."""
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def test_prepare_writes_the_same_bytes_for_any_number_of_workers(tiny_meds, tmp_path):
    written = {}
    for workers in (1, 2, 3):
        cfg = tiny_meds.config(prepare_workers=workers)
        prepared = prepare_dataset(cfg, None, tmp_path / f"w{workers}", log=lambda line: None)
        written[workers] = _files(Path(prepared.path))
    assert any(name.endswith("-of-00001") for name in written[1])
    assert {"data_stats.json", "prepare_report.json"} <= set(written[1])
    assert written[2] == written[1]
    assert written[3] == written[1]


class _LastFirstPool(ShardPool):
    """This process, computing each map's items last to first (so every shard finishes before
    its split's earlier ones, as a fast worker's can), handing the results back in order."""

    unwritten = 0  # results that came back with their records

    def map(self, fn, items):
        results = [fn(item) for item in reversed(list(items))]
        self.unwritten += sum(bool(getattr(r, "records", None)) for r in results)
        yield from reversed(results)


def test_shards_finished_before_earlier_ones_are_written_in_order_by_the_caller(
        tiny_meds, tmp_path):
    in_order = prepare_dataset(tiny_meds.config(), None, tmp_path / "a", log=lambda line: None)
    with _LastFirstPool() as pool:
        last_first = prepare_dataset(tiny_meds.config(), None, tmp_path / "b",
                                     log=lambda line: None, pool=pool)
    assert pool.unwritten >= 1  # train's second shard, finished before its first
    assert _files(Path(last_first.path)) == _files(Path(in_order.path))


def _process_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def test_the_main_process_computes_shards_beside_the_workers():
    """The worker is still starting when the first items are handed out, so this process takes
    the next ones; the results come back in item order whoever computed them."""
    with ShardPool(2) as pool:
        results = list(pool.map(_process_and_square, range(12)))
    assert [square for _, square in results] == [x * x for x in range(12)]
    processes = {pid for pid, _ in results}
    assert os.getpid() in processes and len(processes) == 2


def test_record_offsets_answer_once_every_earlier_shard_is_counted():
    offsets = ShardPool(1).offsets()
    assert offsets.first_id("train", 2, 5) is None  # shards 0 and 1 not counted yet
    assert offsets.first_id("train", 0, 3) == 0
    assert offsets.first_id("tuning", 1, 4) is None  # each split counts its own shards
    assert offsets.first_id("train", 1, 7) == 3
    assert offsets.first_id("train", 3, 1) == 3 + 7 + 5


def test_prepare_is_reproducible_byte_for_byte(tiny_meds, tmp_path):
    """Protobuf orders a map's entries differently in each process unless asked not to; the
    records are serialized in key order, so a second run writes the same bytes."""
    paths = [prepare_dataset(tiny_meds.config(), None, tmp_path / name,
                             log=lambda line: None).path for name in ("a", "b")]
    assert _files(Path(paths[0])) == _files(Path(paths[1]))


def test_merged_statistics_do_not_depend_on_the_workers(tiny_meds):
    """Reservoirs of 3 values, fewer than code A's and B's train values: the per-shard samples
    are merged (hypergeometric shares), the same for 1 and 2 workers."""
    settings = MedsLabConfig.create(tiny_meds.config()).settings()
    stats = []
    for workers in (1, 2):
        with ShardPool(workers) as pool:
            plan = plan_dataset(tiny_meds.root, settings, log=lambda line: None,
                                reservoir_size=3, pool=pool)
        stats.append(plan.stats.to_dict())
    assert stats[0] == stats[1]
    assert stats[0]["codes"][0]["count"] > 3


def test_code_moments_merge_as_if_added_together():
    rng = np.random.default_rng(0)
    codes = np.array(["a", "b", "c"])[rng.integers(0, 3, 200)]
    values = rng.normal(1e3, 5.0, 200) * np.where(codes == "c", 1e6, 1.0)
    subjects = np.arange(200) // 10
    whole, first, second = CodeMoments(), CodeMoments(), CodeMoments()
    whole.add(pa.array(codes), values, subjects)
    whole.end_shard()
    first.add(pa.array(codes[:120]), values[:120], subjects[:120])
    first.end_shard()
    second.add(pa.array(codes[120:]), values[120:], subjects[120:])
    second.end_shard()
    first.merge(second)
    order = [first.index[c] for c in whole.index]
    np.testing.assert_allclose(first.means()[order], whole.means(), rtol=1e-12)
    np.testing.assert_allclose(first.stds()[order], whole.stds(), rtol=1e-9)
    assert first.counts() == whole.counts()
    assert first.subject_counts() == whole.subject_counts()


def test_reservoir_merge_keeps_everything_that_fits_and_samples_the_rest():
    small, other = Reservoirs(2, size=5, seed=1), Reservoirs(2, size=5, seed=2)
    small.add(np.array([0, 0, 1]), np.array([1.0, 2.0, 10.0]), np.array([1, 1, 2]))
    other.add(np.array([0, 1, 1, 1, 1, 1]), np.array([3.0, 11, 12, 13, 14, 15]),
              np.array([3, 4, 4, 5, 5, 6]))
    small.merge(other, np.random.default_rng(0))
    assert sorted(small.samples[0]) == [1.0, 2.0, 3.0]  # 3 values <= 5: all kept
    assert len(small.samples[1]) == 5 and set(small.samples[1]) <= {10.0, 11, 12, 13, 14, 15}
    assert small.seen.tolist() == [3, 6]
    # who took value v: the subject it came with
    who = dict(zip([10.0, 11, 12, 13, 14, 15], [2, 4, 4, 5, 5, 6]))
    assert [who[v] for v in small.samples[1]] == small.subjects[1].tolist()


def test_reservoir_merge_is_uniform():
    """Two shards of 1,000 and 9,000 values (subjects 0 and 1), reservoirs of 100: about 10%
    from the first."""
    shares = []
    for seed in range(200):
        a, b = Reservoirs(1, 100, [seed, 0]), Reservoirs(1, 100, [seed, 1])
        a.add(np.zeros(1000, np.int64), np.zeros(1000), np.zeros(1000, np.int64))
        b.add(np.zeros(9000, np.int64), np.ones(9000), np.ones(9000, np.int64))
        a.merge(b, np.random.default_rng([seed, 2]))
        shares.append(np.mean(a.samples[0] == 0))
        assert a.subjects[0].tolist() == a.samples[0].tolist()  # each value with its subject
    assert abs(np.mean(shares) - 0.1) < 0.01


@pytest.mark.parametrize("example_id", [0, 1, 127, 128, 2**31, 2**40])
def test_renumbered_record_is_the_record_serialized_with_that_id(example_id):
    example = dict(example_id=np.int64(0), subject_id=np.int64(12345678901),
                   start_time_us=np.int64(-5), end_time_us=np.int64(10**15),
                   times=np.arange(5, dtype=np.float32), codes=np.arange(5, dtype=np.int32),
                   values=np.linspace(-1, 1, 5, dtype=np.float32))
    expected = serialize({**example, "example_id": np.int64(example_id)})
    assert renumbered(serialize(example), example_id) == expected


def test_prepare_refuses_fewer_than_one_worker(tiny_meds, tmp_path):
    with pytest.raises(ValueError, match="prepare_workers must be >= 1"):
        prepare_dataset(tiny_meds.config(prepare_workers=0), None, tmp_path / "out",
                        log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_a_worker_error_names_the_file(tiny_meds, tmp_path):
    (tiny_meds.root / "data/train/0.parquet").write_bytes(b"not parquet")
    with pytest.raises(meds.MEDSFormatError, match="0.parquet: unreadable parquet"):
        prepare_dataset(tiny_meds.config(prepare_workers=2), None, tmp_path / "out",
                        log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_two_workers_write_the_shared_sample_as_one_does(shared_meds_dir, tmp_path):
    config = ml_collections.ConfigDict(default_config().data.to_dict())
    config.meds_dir, config.min_subjects = str(shared_meds_dir), 1
    written = []
    for workers in (1, 2):
        config.prepare_workers = workers
        prepared = prepare_dataset(config, None, tmp_path / f"w{workers}", log=lambda line: None)
        written.append(_files(Path(prepared.path)))
    assert written[0] == written[1]


def test_prepare_command_with_workers_and_beam_options(tiny_meds, tmp_path):
    """--config.data.prepare_workers=2 prepares as one process does; --beam_options without
    apache-beam installed is one error line, nothing written."""
    def prepare(*args):
        return subprocess.run(
            [sys.executable, "-m", "cvmae_jax.prepare", "--config=configs/meds.py",
             f"--config.data.meds_dir={tiny_meds.root}", "--config.data.min_code_count=3",
             "--config.data.min_subjects=1", "--config.data.max_len=8", *args],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"})

    ok = prepare(f"--config.data.data_dir={tmp_path / 'two'}", "--config.data.prepare_workers=2")
    assert ok.returncode == 0, ok.stderr
    assert "train: 5 subjects" in ok.stdout
    if importlib.util.find_spec("apache_beam") is None:
        beam = prepare(f"--config.data.data_dir={tmp_path / 'beam'}",
                       "--beam_options=--runner=DirectRunner")
        assert beam.returncode == 1
        assert beam.stderr.strip().splitlines()[-1].startswith(
            "error: --beam_options needs Apache Beam")
        assert not (tmp_path / "beam").exists()


def test_each_record_numbering_starts_empty_and_its_files_go_when_the_pool_closes():
    with ShardPool(2) as pool:
        assert pool.offsets().first_id("train", 0, 3) == 0
        assert pool.offsets().first_id("train", 1, 4) is None  # a new table: no shard 0
        folder = Path(pool._counts_dir)
        assert len(list(folder.iterdir())) == 2
    assert not folder.exists()


def test_record_counts_of_other_processes_are_read():
    with ShardPool(2) as pool:
        offsets = pool.offsets()
        elsewhere = pickle.loads(pickle.dumps(offsets))  # as a worker receives it
        assert elsewhere.first_id("train", 1, 4) is None
        assert offsets.first_id("train", 2, 5) is None
        assert offsets.first_id("train", 0, 3) == 0
        assert elsewhere.first_id("train", 3, 1) == 3 + 4 + 5


def test_an_interrupted_build_stops_its_workers_before_its_folder_is_removed(
        tiny_meds, tmp_path, monkeypatch):
    """Ctrl-C or a SIGTERM while this process writes a split: the workers, which may still be
    writing parts into tfds's temporary folder, stop before tfds removes it."""
    out = tmp_path / "out"
    seen_at_close, close = [], ShardPool.close

    def recording_close(self):
        seen_at_close.append(sorted(p.name for p in out.rglob("incomplete.*")))
        close(self)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardPool, "close", recording_close)
    monkeypatch.setattr(tfds_builder, "write_numbered", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tiny_meds.config(prepare_workers=2), None, out, log=lambda line: None)
    assert len(seen_at_close[0]) == 1  # the first close: the build's folder still there
    assert not out.exists()
