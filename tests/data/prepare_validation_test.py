"""prepare_dataset on bad input: one-line errors naming file and problem, nothing written."""

import os
import re
from unittest import mock

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import meds
from cvmae_jax.data import prepare as prepare_module
from cvmae_jax.data.prepare import prepare_dataset

SHARD = "data/held_out/0.parquet"
SPLITS_FILE = "metadata/subject_splits.parquet"


def _edit(rel, change):
    def apply(root):
        pq.write_table(change(pq.read_table(root / rel)), root / rel)
    return apply


def _set(column, array_fn):
    return _edit(SHARD, lambda t: t.set_column(t.column_names.index(column), column,
                                               array_fn(t)))


def _drop(column):
    return _edit(SHARD, lambda t: t.drop_columns([column]))


def _write_bytes(rel, data_fn):
    def apply(root):
        (root / rel).write_bytes(data_fn((root / rel).read_bytes()))
    return apply


def _remove_data(root):
    for f in (root / "data").rglob("*.parquet"):
        f.unlink()


def _empty_shards(root):
    for f in (root / "data").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).slice(0, 0), f)


def _splits(rows):
    def apply(root):
        pq.write_table(pa.table(rows), root / SPLITS_FILE)
    return apply


def _split_subject_across_shards(root):
    t = pq.read_table(root / "data/train/0.parquet")  # subjects 1 and 2
    pq.write_table(t.slice(0, 3), root / "data/train/0.parquet")
    pq.write_table(t.slice(3), root / "data/train/0b.parquet")


def _huge_a_values(t):
    """LAB//A's train values near 1e307: their sum and squares pass float64's range."""
    is_a = pc.equal(t["code"], "LAB//A//mg/dL")
    return t.set_column(3, "numeric_value", pc.if_else(
        is_a, pc.multiply(t["numeric_value"].cast(pa.float64()), 1e306),
        t["numeric_value"].cast(pa.float64())))


_IDS = pa.array([1, 2, 3, 4, 5, 6, 7], pa.int64())
CASES = {
    "missing_code": (_drop("code"), {}, SHARD, "column 'code' is missing"),
    "missing_time": (_drop("time"), {}, SHARD, "column 'time' is missing"),
    "missing_value": (_drop("numeric_value"), {}, SHARD, "column 'numeric_value' is missing"),
    "missing_subject": (_drop("subject_id"), {}, SHARD, "column 'subject_id' is missing"),
    "code_int": (_set("code", lambda t: pa.array([1] * t.num_rows)), {}, SHARD,
                 "column 'code' has unsupported type int64"),
    "time_string": (_set("time", lambda t: pa.array(["x"] * t.num_rows)), {}, SHARD,
                    "column 'time' has unsupported type string"),
    "value_string": (_set("numeric_value", lambda t: pa.array(["1"] * t.num_rows)), {}, SHARD,
                     "column 'numeric_value' has unsupported type string"),
    "subject_id_overflow": (_set("subject_id", lambda t: pa.array([2**63 + 12345] * t.num_rows,
                                                                  pa.uint64())), {}, SHARD,
                            "column subject_id: a value of type uint64 does not fit int64"),
    "null_subject": (_set("subject_id", lambda t: pa.array([None] * t.num_rows, pa.int64())), {},
                     SHARD, "column subject_id contains nulls"),
    "null_code": (_set("code", lambda t: pa.array([None] * t.num_rows, pa.string())), {},
                  SHARD, "column code contains nulls"),
    "code_not_utf8": (_set("code", lambda t: pa.array([b"LAB//A//mg/\xb5L"] * t.num_rows,
                                                     pa.binary()).view(pa.string())), {},
                      SHARD, "column code: a value is not valid UTF-8 text"),
    "garbage_parquet": (_write_bytes(SHARD, lambda b: b"not a parquet file" * 10), {}, SHARD,
                        "unreadable parquet"),
    "truncated_parquet": (_write_bytes(SHARD, lambda b: b[: len(b) // 2]), {}, SHARD,
                          "unreadable parquet"),
    "no_parquet_files": (_remove_data, {}, "data", r"no \*.parquet files found"),
    "no_rows": (_empty_shards, {}, "data", "the data files hold no rows"),
    "no_matching_codes": (lambda root: None, {"lab_code_pattern": "^NOPE//"}, "train split",
                          r"no code with numeric values matches "
                          r"config.data.lab_code_pattern='\^NOPE//' with >= 3 rows "
                          r"\(config.data.min_code_count; 0 match with fewer rows\); the \d+ "
                          r"codes with numeric train values by prefix: LAB \d+"),
    "explicit_code_not_in_train": (lambda root: None, {"lab_codes": ("LAB//A//mg/dL",
                                                                     "LAB//E//x")},
                                   "train split", "column code: 1 requested lab_codes"),
    "explicit_code_of_few_subjects": (lambda root: None,
                                      {"lab_codes": ("LAB//A//mg/dL", "LAB//C//UNK"),
                                       "min_subjects": 3}, "train split",
                                      r"1 requested lab_codes have values from fewer than "
                                      r"config.data.min_subjects=3 train subjects "
                                      r"\(\['LAB//C//UNK'\]\)"),
    "every_code_of_few_subjects": (lambda root: None, {"min_subjects": 6}, "train split",
                                   "codes matching '\\^LAB//' with >= 3 rows has values from "
                                   "fewer than config.data.min_subjects=6"),
    "split_without_subjects": (_splits({"subject_id": _IDS, "split": ["train"] * 6 + ["tuning"]}),
                               {}, SPLITS_FILE, "split 'held_out' has no subjects"),
    "splits_wrong_columns": (_splits({"subject_id": _IDS, "fold": ["train"] * 7}), {},
                             SPLITS_FILE, "column 'split' is missing"),
    "unknown_split_name": (_splits({"subject_id": _IDS, "split": ["train", "test", "tuning",
                                                                   "held_out", "train", "train",
                                                                   "train"]}),
                           {}, SPLITS_FILE, r"unknown split names \['test'\]"),
    "splits_subject_id_overflow": (_splits({"subject_id": pa.array([2**63 + 5] * 7, pa.uint64()),
                                            "split": ["train"] * 7}), {}, SPLITS_FILE,
                                   "column subject_id: a value of type uint64 does not fit int64"),
    "subject_in_two_splits": (_splits({"subject_id": pa.array([1, 2, 3, 4, 5, 6, 7, 1],
                                                              pa.int64()),
                                       "split": ["train"] * 4 + ["tuning", "held_out", "train",
                                                                 "tuning"]}),
                              {}, SPLITS_FILE, "already listed subject into a different split"),
    "subject_spans_shards": (_split_subject_across_shards, {}, "data/train/0b.parquet",
                             "subjects also have rows in an earlier shard"),
    "values_overflow_statistics": (_edit("data/train/0.parquet", _huge_a_values), {},
                                   "train split", r"too large for float64 statistics "
                                   r"\(LAB//A//mg/dL;.*config.data.drop_values"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_and_nothing_is_written(tiny_meds, tmp_path, name):
    corrupt, overrides, where, problem = CASES[name]
    corrupt(tiny_meds.root)
    data_dir = tmp_path / "prepared"
    with pytest.raises(meds.MEDSFormatError) as info:
        prepare_dataset(tiny_meds.config(**overrides), None, data_dir)
    message = str(info.value)
    assert "\n" not in message and where in message, message
    assert str(2**63 + 12345) not in message  # no subject id in messages
    assert re.search(problem, message), message
    assert not data_dir.exists(), list(os.walk(data_dir))  # no dataset or incomplete.* folder


def test_a_meds_dir_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(meds.MEDSFormatError, match=f"^{tmp_path}/MEDS: no such folder "
                                                   r"\(config.data.meds_dir"):
        meds.data_files(tmp_path / "MEDS")


def test_a_data_dir_that_cannot_be_written_fails_before_reading(tiny_meds, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file/prepared: cannot write there .*a_file is not "
                                         "a folder"), mock.patch.object(prepare_module,
                                                                        "plan_dataset") as scan:
        prepare_dataset(tiny_meds.config(), None, tmp_path / "a_file" / "prepared")
    scan.assert_not_called()  # the MEDS files are not scanned


def test_existing_data_dir_is_left_empty(tiny_meds, tmp_path):
    data_dir = tmp_path / "prepared"
    data_dir.mkdir()
    with pytest.raises(meds.MEDSFormatError):
        prepare_dataset(tiny_meds.config(min_window_len=1000), None, data_dir)
    assert data_dir.is_dir() and not os.listdir(data_dir)  # no incomplete.* folder either
