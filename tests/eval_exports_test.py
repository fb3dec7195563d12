"""Label embeddings never see an event after prediction_time (at the embedding level); the
exported files keep the label files' times, and exports of an earlier evaluation go."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from flax import nnx

from cvmae_jax.data import meds
from cvmae_jax.data.labels import label_windows
from cvmae_jax.data.synthetic import generate_synthetic_meds
from cvmae_jax.evaluation.downstream import embed_label_windows, make_embed_fn
from cvmae_jax.evaluation import exports
from cvmae_jax.evaluation.exports import remove_stale_exports
from cvmae_jax.model import ModelConfig, ValueOnlyMAE

from meds_reference import compute_stats, read_numeric_events, train_code_counts
from train_test import tiny_config

MAX_LEN = 16


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports") / "meds"
    generate_synthetic_meds(root, num_subjects=40, seed=5)
    train = read_numeric_events(root, "train")
    codes = meds.select_lab_codes(train_code_counts(train), dict(min_code_count=5, top_k=20))
    return root, compute_stats(train, codes)


def _lab_rows(table, subject, codes):
    return (pc.equal(table["subject_id"], subject).to_numpy(zero_copy_only=False)
            & pc.is_in(table["code"], pa.array(codes)).to_numpy(zero_copy_only=False)
            & pc.is_valid(table["numeric_value"]).to_numpy(zero_copy_only=False)
            & pc.is_valid(table["time"]).to_numpy(zero_copy_only=False))


def _change_values(root, subject, codes, pick):
    """Changes the numeric values of the subject's lab rows whose time pick(times_us [n]) ->
    bool [n] selects; returns how many rows changed."""
    changed = 0
    for path in meds.data_files(root):
        table = pq.read_table(path)
        rows = _lab_rows(table, subject, codes)
        if not rows.any():
            continue
        times = table["time"].cast(pa.int64()).to_numpy(zero_copy_only=False)
        chosen = rows & pick(times)
        values = table["numeric_value"].to_numpy(zero_copy_only=False).copy()
        values[chosen] = values[chosen] * 3 + 50
        changed += int(chosen.sum())
        table = table.set_column(table.schema.get_field_index("numeric_value"), "numeric_value",
                                 pa.array(values, table.schema.field("numeric_value").type))
        pq.write_table(table, path)
    return changed


def test_changing_an_event_after_prediction_time_leaves_the_embedding_unchanged(synthetic,
                                                                                tmp_path):
    source, stats = synthetic
    root = tmp_path / "meds"
    shutil.copytree(source, root)
    labels = pq.read_table(root / "labels/readmission_30d/train.parquet")
    events = read_numeric_events(root, "train", codes=stats.codes)
    ev_subject = events["subject_id"].to_numpy()
    ev_time = events["time"].cast(pa.int64()).to_numpy()
    t_pred = labels["prediction_time"].cast(pa.int64()).to_numpy()
    # A label whose subject has lab events both before and after its prediction time.
    row = next(i for i, s in enumerate(labels["subject_id"].to_numpy())
               if (ev_time[ev_subject == s] <= t_pred[i]).any()
               and (ev_time[ev_subject == s] > t_pred[i]).any())
    subject, t = int(labels["subject_id"][row].as_py()), int(t_pred[row])
    label_path = tmp_path / "label.parquet"
    pq.write_table(labels.slice(row, 1), label_path)

    config = tiny_config("unused")
    graphdef, params = nnx.split(ValueOnlyMAE(ModelConfig.from_config(
        config.model, stats.vocab_size), rngs=nnx.Rngs(params=0)), nnx.Param)
    embed_fn = make_embed_fn(graphdef)

    def embed():
        windows = list(label_windows(root, label_path, stats, MAX_LEN))
        return embed_label_windows(graphdef, params, windows, MAX_LEN, 2, embed_fn)[0]

    clean = embed()
    assert np.abs(clean).sum() > 0
    assert _change_values(root, subject, stats.codes, lambda times: times > t) > 0
    np.testing.assert_array_equal(embed(), clean)  # the future does not leak in
    assert _change_values(root, subject, stats.codes, lambda times: times <= t) > 0
    assert not np.allclose(embed(), clean)  # while the window's own events do matter


def test_exports_keep_the_label_files_prediction_times_and_zone(tmp_path):
    """Predictions and embeddings join back to a zone-aware label file on its own values."""
    from cvmae_jax.evaluation.downstream import TaskData, fit_probe
    from cvmae_jax.evaluation.exports import embeddings_table, predictions_table

    zone = pa.timestamp("us", tz="America/New_York")
    times = pa.array([1_700_000_000_000_000 + i * 3_600_000_000 for i in range(4)], zone)
    table = pa.table({"subject_id": pa.array([1, 1, 2, 3], pa.int64()), "prediction_time": times,
                      "boolean_value": [True, False, True, False]})
    (tmp_path / "task").mkdir()
    pq.write_table(table, tmp_path / "task" / "held_out.parquet")
    windows = [dict(example_id=np.int64(i), label_file=np.int64(0), subject_id=np.int64(s),
                    prediction_time_us=np.int64(t))
               for i, (s, t) in enumerate(zip([1, 1, 2, 3], times.cast(pa.int64()).to_pylist()))]
    x, y = np.arange(8, dtype=np.float32).reshape(4, 2), np.array([True, False, True, False])
    task = TaskData(tmp_path / "task", dict(held_out=windows), dict(held_out=x),
                    dict(held_out=y), fit_probe(x, y, 1.0))
    predictions = predictions_table(task, "held_out")
    assert predictions["prediction_time"].type == zone
    assert predictions.select(table.column_names).equals(table)
    assert embeddings_table(task)["prediction_time"].combine_chunks().equals(times)


MODELS = ("pretrained", "scratch", "probe_plus_aggregates")


def test_exports_this_evaluation_did_not_write_are_removed(tmp_path):
    files = ["predictions/death/held_out.parquet", "predictions/readmission/held_out.parquet",
             "predictions/icu/held_out.parquet",
             "predictions_pretrained/death/held_out.parquet",
             "predictions_scratch/death/held_out.parquet",
             "predictions_scratch/readmission/held_out.parquet",
             "predictions_probe_plus_aggregates/death/held_out.parquet",
             "predictions_backup/readmission/held_out.parquet",  # the user's: left alone
             "embeddings/death.parquet", "embeddings/icu.parquet",
             "embeddings/readmission.parquet", "report.md", "elsewhere/keep.parquet"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "predictions_scratch" / "old").symlink_to(tmp_path / "elsewhere")  # a link
    exports = dict(death=dict(embeddings=1, predictions=dict(held_out=1),  # readmission: gone
                              models=dict(pretrained={}, scratch={})),
                   ICU=dict(embeddings=1, predictions={}, models={}))  # no probe; other case
    removed = remove_stale_exports(str(tmp_path), exports, MODELS)
    assert removed == ["embeddings/readmission.parquet", "predictions/icu",
                       "predictions/readmission", "predictions_scratch/readmission",
                       "predictions_probe_plus_aggregates/death"]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*"))
    assert left == ["elsewhere/keep.parquet", "embeddings/death.parquet",
                    "embeddings/icu.parquet", "predictions/death/held_out.parquet",
                    "predictions_backup/readmission/held_out.parquet",
                    "predictions_pretrained/death/held_out.parquet",
                    "predictions_scratch/death/held_out.parquet", "report.md"]
    assert not (tmp_path / "predictions_probe_plus_aggregates").exists()  # emptied: removed
    assert (tmp_path / "predictions_scratch" / "old").is_symlink()  # links are left alone
    assert remove_stale_exports(str(tmp_path / "missing"), exports, MODELS) == []


def test_wide_embeddings_are_split_into_chunks_of_whole_rows(tmp_path, monkeypatch):
    """A list array addresses 2**31 values; wider tables go in chunks that read back whole."""
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    monkeypatch.setattr(exports, "LIST_VALUES_PER_CHUNK", 7)  # two rows per chunk
    column = exports.list_column(x)
    assert [len(chunk) for chunk in column.chunks] == [2, 2, 2, 1]
    pq.write_table(pa.table({"embedding": column}), tmp_path / "e.parquet")
    back = pq.read_table(tmp_path / "e.parquet")["embedding"].to_pylist()
    np.testing.assert_array_equal(np.array(back, np.float32), x)
    assert len(exports.list_column(np.zeros((0, 0), np.float32))) == 0


def test_meds_dev_predict_copies_the_split_asked_for(tmp_path):
    from cvmae_jax import meds_dev

    folder = tmp_path / "probe" / "run" / "eval" / "predictions" / meds_dev.TASK
    folder.mkdir(parents=True)
    tables = {split: pa.table({"subject_id": pa.array([i], pa.int64())})
              for i, split in enumerate(("tuning", "held_out"))}
    for split, table in tables.items():
        pq.write_table(table, folder / f"{split}.parquet")
    for split, table in tables.items():
        written = meds_dev.predict(str(tmp_path / "probe"), split, str(tmp_path / split))
        assert pq.read_table(written).equals(table)
