"""The TFDS dataset: build round trip, stats file, reuse vs rebuild, errors, sharding,
interruption, real sample."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from cvmae_jax.data import array_record_writer, meds, window_records
from cvmae_jax.data.array_record_writer import finish_split, part_path, write_part
from cvmae_jax.data.prepare import load_prepared, prepare_dataset
from cvmae_jax.data.sequences import build_examples
from cvmae_jax.data.tfds_builder import MedsLabConfig, MedsLabSequences

from meds_reference import compute_stats, read_numeric_events, train_code_counts

SPLITS = ("train", "tuning", "held_out")


def _files(folder):
    return [f for _, _, fs in os.walk(folder) for f in fs]


@pytest.fixture(scope="module")
def prepared(tiny_meds_shared, tmp_path_factory):
    return prepare_dataset(tiny_meds_shared.config(), None, tmp_path_factory.mktemp("tfds"))


def test_round_trip_through_tfds_data_source(prepared, tiny_meds_shared):
    root = tiny_meds_shared.root
    train = read_numeric_events(root, "train")
    codes = meds.select_lab_codes(train_code_counts(train), tiny_meds_shared.config())
    stats = compute_stats(train, codes, (0.001, 0.999))
    assert stats.codes == prepared.stats.codes  # streamed stats = in-memory stats
    for field in ("count", "mean", "std", "cv", "clip_low", "clip_high", "norm_mean", "norm_std",
                  "num_subjects"):
        np.testing.assert_allclose(getattr(prepared.stats, field), getattr(stats, field),
                                   rtol=1e-12, atol=1e-12)
    stats = prepared.stats
    sources = tfds.data_source(prepared.builder_name, data_dir=prepared.data_dir, download=False)
    for split in SPLITS:
        events = read_numeric_events(root, split)
        expected = list(build_examples(events, stats, 8, "chunks", 2))
        source = sources[split]
        assert len(source) == len(expected) == prepared.num_examples[split]
        assert prepared.num_tokens[split] == sum(len(e["codes"]) for e in expected)
        for i, want in enumerate(expected):
            got = source[i]
            assert set(got) == set(want)
            for key, value in want.items():
                np.testing.assert_array_equal(got[key], value)
                assert np.asarray(got[key]).dtype == value.dtype


def test_prepared_folder_holds_stats_and_report(prepared):
    files = set(os.listdir(prepared.path))
    assert {"data_stats.json", "prepare_report.json", "dataset_info.json"} <= files
    assert not any("incomplete" in f for f in os.listdir(os.path.dirname(prepared.path)))
    report = prepared.report
    assert report["splits"]["train"]["nonfinite_value"] == 2
    assert report["selection"]["below_min_count"] == 1
    assert set(report["splits"]) == set(SPLITS)
    reloaded = load_prepared(prepared.path)
    assert reloaded.builder_name == prepared.builder_name
    assert reloaded.num_examples == prepared.num_examples


def test_reuse_and_rebuild(tiny_meds, tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    first = prepare_dataset(tiny_meds.config(), None, data_dir)
    mtime = os.stat(first.path).st_mtime_ns
    again = prepare_dataset(tiny_meds.config(), tiny_meds.root, data_dir)
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == mtime
    assert "reusing" in capsys.readouterr().out
    assert first.built and not again.built
    other = prepare_dataset(tiny_meds.config(max_len=4), None, data_dir)
    assert other.path != first.path and other.max_len == 4 and other.built
    assert max(len(other.data_source("train")[i]["codes"]) for i in range(5)) == 4
    path = tiny_meds.root / "data/tuning/0.parquet"  # new MEDS content -> new dataset
    pq.write_table(pq.read_table(path).slice(1), path)
    assert prepare_dataset(tiny_meds.config(), None, data_dir).path != first.path


def test_a_build_another_job_finished_first_is_reused_not_counted_as_built(
        tiny_meds, tmp_path, monkeypatch):
    build = MedsLabSequences.download_and_prepare

    def finished_by_another_job(self, **kwargs):
        build(self, **kwargs)  # the other job's build lands first; this one's rename fails
        raise OSError(f"{self.data_path}: the folder exists")

    monkeypatch.setattr(MedsLabSequences, "download_and_prepare", finished_by_another_job)
    dataset = prepare_dataset(tiny_meds.config(), None, tmp_path / "tfds")
    assert not dataset.built and dataset.num_examples["train"] > 0


def test_an_interrupted_build_leaves_other_builds_in_the_same_data_dir(tiny_meds, tmp_path,
                                                                       monkeypatch):
    """Another job building in the same fresh data_dir while this build is interrupted (Ctrl-C,
    a SIGTERM): its folders stay, only this build's are removed."""
    data_dir = tmp_path / "tfds"
    others = []

    def interrupted(path, records):  # the other job's files appear while this one writes
        settings = os.path.dirname(os.path.dirname(path))  # .../<settings>/incomplete.*/
        others.extend([os.path.join(settings, "incomplete.OTHER1_1.1.0", "part"),
                       os.path.join(os.path.dirname(settings), "chunks4_other", "1.1.0", "x")])
        for other in others:
            os.makedirs(os.path.dirname(other), exist_ok=True)
            open(other, "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(window_records, "write_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tiny_meds.config(), None, data_dir)
    left = sorted(os.path.relpath(os.path.join(folder, name), data_dir)
                  for folder, _, names in os.walk(data_dir) for name in names)
    assert left == sorted(os.path.relpath(other, data_dir) for other in others)


def test_a_killed_builds_folder_is_named_when_the_dataset_is_built_again(tiny_meds, tmp_path):
    data_dir = tmp_path / "tfds"
    first = prepare_dataset(tiny_meds.config(), None, data_dir)
    version = os.path.basename(first.path)
    killed = os.path.join(os.path.dirname(first.path), f"incomplete.AB12CD_{version}")
    os.makedirs(os.path.join(killed, "half"))  # a `kill -9` mid-build
    os.rename(first.path, first.path + ".moved")  # so the next call builds
    lines = []
    again = prepare_dataset(tiny_meds.config(), None, data_dir, log=lines.append)
    assert again.built and os.path.isdir(killed)  # named, not removed: it may be running
    [note] = [line for line in lines if "unfinished build" in line]
    assert f"1 unfinished build(s) of this dataset in {os.path.dirname(first.path)}" in note
    assert f"incomplete.AB12CD_{version}" in note and "delete them once none runs" in note


def test_preparing_leaves_no_temporary_folder_behind(tiny_meds, tmp_path, monkeypatch):
    scratch = tmp_path / "system_tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    prepare_dataset(tiny_meds.config(), None, tmp_path / "tfds")
    assert list(scratch.iterdir()) == []


def test_config_name_tracks_every_setting(tiny_meds):
    base = MedsLabConfig.create(tiny_meds.config()).name
    changes = dict(max_len=16, window="last", min_window_len=3, clip_quantiles=(0.01, 0.99),
                   top_k=2, min_code_count=2, lab_code_pattern="LAB", lab_codes=(tiny_meds.A,))
    names = {MedsLabConfig.create(tiny_meds.config(**{k: v})).name for k, v in changes.items()}
    assert base not in names and len(names) == len(changes)
    assert MedsLabConfig.create(tiny_meds.config()).name == base


def test_empty_split_fails_cleanly(tiny_meds, tmp_path):
    splits = {s: v for s, v in tiny_meds.splits.items() if v != "held_out"}
    pq.write_table(pa.table({"subject_id": pa.array(list(splits), pa.int64()),
                             "split": list(splits.values())}),
                   tiny_meds.root / "metadata/subject_splits.parquet")
    with pytest.raises(meds.MEDSFormatError, match="split 'held_out' has no subjects"):
        prepare_dataset(tiny_meds.config(), None, tmp_path / "tfds")
    assert not _files(tmp_path / "tfds")  # nothing half-written


def test_neither_tensorflow_nor_jax_is_imported(tiny_meds, tmp_path):
    """Preparing needs neither: JAX's import alone is a second of every worker's start."""
    code = ("import sys; import cvmae_jax.prepare; "
            "from cvmae_jax.data.prepare import prepare_dataset; "
            f"prepare_dataset({dict(tiny_meds.config())!r}, None, {str(tmp_path)!r}); "
            'assert "tensorflow" not in sys.modules, "TensorFlow was imported"; '
            'assert "jax" not in sys.modules, "JAX was imported"')
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def test_prepare_shared_mimic_demo(shared_meds_dir, tmp_path):
    config = dict(meds_dir=str(shared_meds_dir), lab_code_pattern="^LAB//", top_k=50)
    prepared = prepare_dataset(config, None, tmp_path)
    stats = prepared.stats
    assert stats.vocab_size == 50
    for field in ("count", "mean", "std", "cv", "variance", "clip_low", "clip_high"):
        assert np.isfinite(getattr(stats, field)).all(), field
    assert all(prepared.num_examples[s] > 0 and prepared.num_tokens[s] > 0 for s in SPLITS)
    assert np.all(np.diff(stats.count) <= 0)  # most frequent first


def test_split_without_windows_fails_cleanly(tiny_meds, tmp_path):
    with pytest.raises(meds.MEDSFormatError, match="split 'train': no window with >= 1000"):
        prepare_dataset(tiny_meds.config(min_window_len=1000), None, tmp_path / "tfds")
    assert not _files(tmp_path / "tfds")


def test_one_file_per_meds_shard_read_back_in_example_id_order(tiny_meds, tmp_path):
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path / "tfds")
    info = tfds.builder_from_directory(prepared.path).info
    train = sorted(f for f in os.listdir(prepared.path) if "-train.array_record-" in f)
    n = info.splits["train"].num_shards  # train/0, train/nested/1 and tuning/0 (subject 7)
    assert n == len(train) == 3
    assert [f[-14:] for f in train] == [f"{i:05d}-of-{n:05d}" for i in range(n)]
    assert not [f for f in os.listdir(prepared.path) if f.endswith(".partial")]
    for split in SPLITS:
        source = prepared.data_source(split)
        assert sum(info.splits[split].shard_lengths) == len(source) == \
            prepared.num_examples[split]
        assert [source[i]["example_id"] for i in range(len(source))] == list(range(len(source)))


def test_shards_without_records_get_no_file(tmp_path):
    template = tfds.core.ShardedFileTemplate(
        data_dir=tmp_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="d", split="train", filetype_suffix="array_record")
    for index, n in ((0, 2), (2, 1)):
        write_part(part_path(template, index), [b"x" * (index + 1)] * n)
    info = finish_split(template, [2, 0, 1])
    assert info.shard_lengths == [2, 1]
    assert sorted(os.listdir(tmp_path)) == ["d-train.array_record-00000-of-00002",
                                            "d-train.array_record-00001-of-00002"]


def test_a_failed_record_write_names_the_file(tmp_path, monkeypatch):
    class FullDisk:  # array_record's writer on a full disk
        def __init__(self, path, options):
            pass

        def write(self, record):
            raise RuntimeError("write() failed: No space left on device\nmore detail")

        def close(self):
            pass

    monkeypatch.setattr(array_record_writer, "ArrayRecordWriter", FullDisk)
    path = str(tmp_path / "d-train.array_record-00000.partial")
    with pytest.raises(OSError) as error:
        write_part(path, [b"x"])
    assert str(error.value) == (f"{path}: could not write the prepared records (write() "
                                "failed: No space left on device)")


def test_interrupted_write_leaves_nothing(tiny_meds, tmp_path, monkeypatch):
    def interrupted(path, records):  # train and tuning are complete, held_out is not
        if "-held_out." in path:
            raise KeyboardInterrupt
        write_part(path, records)

    monkeypatch.setattr(window_records, "write_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tiny_meds.config(), None, tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists(), _files(tmp_path / "tfds")
    monkeypatch.setattr(window_records, "write_part", write_part)
    assert prepare_dataset(tiny_meds.config(), None, tmp_path / "tfds").num_examples["held_out"]


def test_only_unfinished_builds_of_this_version_are_named(tiny_meds, tmp_path):
    """No line where there are none; another version's incomplete.* folder beside the version
    folder is not this dataset's build."""
    data_dir = tmp_path / "tfds"
    lines = []
    first = prepare_dataset(tiny_meds.config(), None, data_dir, log=lines.append)
    assert not [line for line in lines if "unfinished build" in line]
    os.makedirs(os.path.join(os.path.dirname(first.path), "incomplete.EF34GH_0.9.0", "half"))
    os.rename(first.path, first.path + ".moved")  # so the next call builds
    lines.clear()
    assert prepare_dataset(tiny_meds.config(), None, data_dir, log=lines.append).built
    assert not [line for line in lines if "unfinished build" in line]
