"""The shipped ACES task configs on the synthetic data, and the labels command."""

import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytest.importorskip("aces")
meds_schema = pytest.importorskip("meds")

from cvmae_jax.data import meds  # noqa: E402
from cvmae_jax.data.labels import read_labels  # noqa: E402
from cvmae_jax.data.synthetic import generate_synthetic_meds  # noqa: E402
from cvmae_jax.labels import make_labels  # noqa: E402
from cvmae_jax.tasks.aces_extract import extract_labels  # noqa: E402
from cvmae_jax.tasks.task_configs import TASKS_DIR, shipped_tasks  # noqa: E402

US_PER_DAY = 86_400_000_000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("aces") / "meds"
    generate_synthetic_meds(root, num_subjects=80, seed=3)
    return root


def _generator_labels(root, task):
    table = pa.concat_tables(pq.read_table(root / "labels" / task / f"{s}.parquet")
                             for s in meds.SPLITS)
    order = pc.sort_indices(table, [("subject_id", "ascending"),
                                    ("prediction_time", "ascending")])
    return table.take(order).select(["subject_id", "prediction_time", "boolean_value"])


def _keys(table):
    return list(zip(table["subject_id"].to_pylist(),
                    table["prediction_time"].cast(pa.int64()).to_pylist()))


def test_the_shipped_tasks():
    assert shipped_tasks() == ["in_hospital_mortality_24h", "in_icu_mortality_24h",
                               "readmission_30d"]


def test_aces_in_hospital_mortality_equals_the_generators_labels(synthetic):
    expected = _generator_labels(synthetic, "in_hospital_mortality_24h")
    got = extract_labels(TASKS_DIR / "in_hospital_mortality_24h.yaml", synthetic)
    assert got.num_rows == expected.num_rows > 0
    assert got.equals(expected)
    assert pc.sum(got["boolean_value"]).as_py() > 0


def test_aces_readmission_equals_the_generators_labels_less_the_censored_rows(synthetic):
    """The generator labels every living discharge; the config also leaves out those whose
    subject has no event more than 30 days later (censored), and only those."""
    expected = _generator_labels(synthetic, "readmission_30d")
    got = extract_labels(TASKS_DIR / "readmission_30d.yaml", synthetic)
    events = pa.concat_tables(pq.read_table(f, columns=["subject_id", "time"])
                              for f in meds.data_files(synthetic))
    last = {}
    for s, t in zip(events["subject_id"].to_pylist(),
                    events["time"].cast(pa.int64()).to_pylist()):
        if t is not None:
            last[s] = max(last.get(s, t), t)
    followed = [last[s] > t + 30 * US_PER_DAY for s, t in _keys(expected)]
    kept = expected.filter(pa.array(followed))
    assert 0 < got.num_rows < expected.num_rows
    assert got.equals(kept)
    assert pc.sum(got["boolean_value"]).as_py() > 0


def test_labels_command_writes_meds_label_files_split_by_subject(synthetic, tmp_path):
    out = tmp_path / "labels" / "icu"
    counts = make_labels(str(synthetic), "in_icu_mortality_24h", output_dir=str(out))
    splits = meds.read_subject_splits(synthetic)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.parquet" for s in meds.SPLITS)
    total = 0
    for split in meds.SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.equals(meds_schema.LabelSchema.schema()), table.schema
        assert {splits[s] for s in table["subject_id"].to_pylist()} <= {split}
        assert table.num_rows == counts[split]["rows"]
        assert (pc.sum(table["boolean_value"]).as_py() or 0) == counts[split]["positives"]
        assert counts[split]["subjects"] == len(set(table["subject_id"].to_pylist()))
        read_labels(out / f"{split}.parquet", splits)  # what eval.py reads
        total += table.num_rows
    assert counts["train"]["positives"] > 0
    assert counts["train"]["rows"] > counts["train"]["subjects"]  # several stays per subject
    assert total == extract_labels(TASKS_DIR / "in_icu_mortality_24h.yaml", synthetic).num_rows


def test_labels_command_refuses_a_task_without_positives_in_train(synthetic, tmp_path):
    config = (TASKS_DIR / "in_icu_mortality_24h.yaml").read_text()
    never = tmp_path / "never.yaml"
    never.write_text(config.replace("code: MEDS_DEATH", "code: NO_SUCH_CODE").replace(
        "code: HOSPITAL_DISCHARGE//DIED", "code: NO_SUCH_CODE_EITHER"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="task never: no positive label in train"):
        make_labels(str(synthetic), str(never), output_dir=str(out))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["never.yaml"]


def test_labels_command_replaces_earlier_labels_only_when_asked(synthetic, tmp_path):
    out = tmp_path / "task"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"earlier")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_labels(str(synthetic), "in_hospital_mortality_24h", output_dir=str(out))
    assert (out / "train.parquet").read_bytes() == b"earlier"
    make_labels(str(synthetic), "in_hospital_mortality_24h", output_dir=str(out),
                overwrite=True)
    assert pq.read_table(out / "train.parquet").num_rows > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temporary folder left


@pytest.mark.parametrize("task, message", [
    ("no_such_task", "error: --task=no_such_task: not a shipped task (configs/tasks/ has "
                     "in_hospital_mortality_24h, in_icu_mortality_24h, readmission_30d)"),
    ("{bad}", "bad.yaml: not a valid ACES task config: Something referenced predicate 'b'"),
])
def test_labels_cli_ends_bad_input_with_one_line(synthetic, tmp_path, task, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("predicates:\n  a:\n    code: X\ntrigger: b\nwindows: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "cvmae_jax.labels", "--config=configs/meds.py",
         f"--config.data.meds_dir={synthetic}", f"--task={task.format(bad=bad)}",
         f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=TASKS_DIR.parents[1])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith("error: "), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output, message", [
    ("gs://bucket/labels", "gs://bucket/labels: a URL, not a folder (the task's label files"),
    ("{tmp}/a_file/labels", "a_file is not a folder: it is a file); the task's label files"),
])
def test_an_output_dir_that_cannot_be_written_is_refused_before_extracting(
        synthetic, tmp_path, monkeypatch, output, message):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("cvmae_jax.tasks.aces_extract.extract_labels", None)  # never reached
    with pytest.raises(ValueError, match=re.escape(message)):
        make_labels(str(synthetic), "in_icu_mortality_24h",
                    output_dir=output.format(tmp=tmp_path))


def test_sigterm_while_extracting_is_one_line_exit_143_and_writes_nothing(synthetic, tmp_path):
    code = ("import os, signal, time; import cvmae_jax.tasks.aces_extract as aces_extract; "
            "aces_extract.extract_labels = lambda *args: (os.kill(os.getpid(), signal.SIGTERM), "
            "time.sleep(5)); from cvmae_jax.labels import main; main()")
    result = _labels_command_after(code, synthetic, tmp_path / "out")
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "terminated (SIGTERM) while extracting the labels: nothing is written; rerun the same "
        "command"), result.stderr
    assert not (tmp_path / "out").exists()


def test_label_prevalence_is_counted_per_split(synthetic, tmp_path):
    counts = make_labels(str(synthetic), "readmission_30d", output_dir=str(tmp_path / "r"))
    for c in counts.values():
        assert c["rows"] == 0 or np.isclose(c["prevalence"], c["positives"] / c["rows"])
        assert c["subjects"] <= c["rows"]


def test_labels_cli_without_aces_says_how_to_install_it(synthetic, tmp_path):
    code = ("import sys; sys.modules['aces'] = None; from cvmae_jax.labels import main; "
            "main()")
    result = _labels_command_after(code, synthetic, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: the labels command needs ACES: pip install -e '.[tasks]'"), result.stderr
    assert not (tmp_path / "out").exists()


def _labels_command_after(code, meds_dir, output_dir):
    """The labels command for readmission_30d, run by ``python -c code`` (which ends by
    calling ``cvmae_jax.labels.main``)."""
    return subprocess.run(
        [sys.executable, "-c", code, "--config=configs/meds.py",
         f"--config.data.meds_dir={meds_dir}", "--task=readmission_30d",
         f"--output_dir={output_dir}"],
        capture_output=True, text=True, cwd=TASKS_DIR.parents[1])


def test_a_split_without_label_rows_is_logged_without_a_prevalence(synthetic, tmp_path, caplog,
                                                                   monkeypatch):
    from cvmae_jax import labels as labels_command

    train = [s for s, split in meds.read_subject_splits(synthetic).items() if split == "train"]
    every = extract_labels(TASKS_DIR / "in_hospital_mortality_24h.yaml", synthetic)
    monkeypatch.setattr(labels_command.aces_extract, "extract_labels", lambda *args: every.filter(
        pc.is_in(every["subject_id"], pa.array(train, pa.int64()))))
    with caplog.at_level("INFO"):
        counts = make_labels(str(synthetic), "in_hospital_mortality_24h",
                             output_dir=str(tmp_path / "m"))
    assert counts["held_out"]["rows"] == 0
    (line,) = [m for m in caplog.messages if m.startswith("labels in_hospital_mortality_24h "
                                                          "held_out:")]
    assert line == "labels in_hospital_mortality_24h held_out: 0 rows, 0 subjects, 0 positive"
