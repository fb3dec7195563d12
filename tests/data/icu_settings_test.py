"""configs/icu.py, the selection of every numeric code, and the padding warning of short
unpacked windows."""

import datetime
import logging
import os

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq

from cvmae_jax import run_setup
from cvmae_jax.config import default_config
from cvmae_jax.config_checks import check_config, config_warnings, padding_warnings
from cvmae_jax.data import meds
from cvmae_jax.data.report import selection_summary

from meds_reference import event_counts, read_numeric_events, train_code_counts

ALL_NUMERIC = r"^(LAB|VITAL|STATIC)//"


def test_icu_config_validates_without_warnings_and_packs_all_numeric_codes(shipped_config):
    config = shipped_config("icu")
    check_config(config)
    assert config_warnings(config) == []
    assert config.data.packing and config.data.top_k == 0
    assert config.data.lab_code_pattern == ALL_NUMERIC
    assert config.train.warmup_steps * 10 <= config.train.num_steps


def _data(packing: bool, max_len: int = 256) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(packing=packing, max_len=max_len))


def test_padding_warning_fires_for_unpacked_short_windows_only():
    short = dict(num_tokens=27 * 100, num_windows=100)  # 27 of 100 slots real
    (warning,) = padding_warnings(_data(False, max_len=100), **short)
    assert "fill 27% of their config.data.max_len=100 slots" in warning
    assert "--config.data.packing=True" in warning
    assert padding_warnings(_data(True, max_len=100), **short) == []
    assert padding_warnings(_data(False, max_len=50), **short) == []  # 54%: mostly real


def _add_static_values(tiny):
    """Adds to the tiny MEDS root a shard of static numeric values of the train subjects:
    STATIC//Age with a time, STATIC//Height without one (MEDS's static rows); returns the
    number of train subjects."""
    train = [s for s, split in tiny.splits.items() if split == "train"]
    admission = datetime.datetime(2100, 1, 1)
    pq.write_table(pa.table({
        "subject_id": pa.array(train * 2, pa.int64()),
        "time": pa.array([admission] * len(train) + [None] * len(train), pa.timestamp("us")),
        "code": ["STATIC//Age"] * len(train) + ["STATIC//Height"] * len(train),
        "numeric_value": pa.array([60.0 + s for s in train] * 2, pa.float32())}),
        tiny.root / "data/train/static.parquet")
    return len(train)


def test_selection_of_all_numeric_codes_or_labs_only(tiny_meds):
    tiny, train_subjects = tiny_meds, _add_static_values(tiny_meds)
    train = read_numeric_events(tiny.root, "train")
    counts = train_code_counts(train)
    report = {}
    codes = meds.select_lab_codes(counts, tiny.config(lab_code_pattern=ALL_NUMERIC), report)
    # every timed numeric code with >= 3 train rows; STATIC//Height has no time, so no rows
    assert sorted(codes) == sorted([tiny.A, tiny.B, tiny.D, tiny.HR, "STATIC//Age"])
    assert report["by_prefix"] == {"LAB": 3, "STATIC": 1, "VITAL": 1}
    # per train subject: STATIC//Height here and the tiny root's GENDER//F
    assert event_counts(train)["null_time"] == 2 * train_subjects
    settings = dict(lab_code_pattern=ALL_NUMERIC)
    assert selection_summary(dict(selection=report, settings=settings)) == (
        f"pattern '{ALL_NUMERIC}', 5 codes (LAB 3, STATIC 1, VITAL 1)")
    labs = {}
    assert meds.select_lab_codes(counts, tiny.config(), labs) == [tiny.A, tiny.B, tiny.D]
    assert selection_summary(dict(selection=labs, settings=dict(lab_code_pattern="^LAB//"))) \
        == "pattern '^LAB//', 3 codes (LAB 3)"
    hospital = dict(lab_code_pattern=r"^LAB//(RESULT//)?\d{5}//")  # shown as typed, one \
    assert selection_summary(dict(selection=labs, settings=hospital)).startswith(
        "pattern '^LAB//(RESULT//)?\\d{5}//', 3 codes")


def test_training_start_warns_of_padding_and_prepare_report_names_selection(
        tiny_meds, tmp_path, caplog):
    tiny = tiny_meds
    config = default_config()
    config.data.update(tiny.config(max_len=64, lab_code_pattern=ALL_NUMERIC))
    config.data.data_dir = str(tmp_path / "prepared")
    with caplog.at_level(logging.INFO):
        dataset = run_setup.prepare_run_data(config, str(tmp_path / "run"))
    assert [r for r in caplog.messages if "config.data.packing=False: the train windows fill"
            in r], caplog.messages
    assert dataset.report_path == os.path.join(dataset.path, "prepare_report.md")
    assert f"codes, counts and warnings in {dataset.report_path}" in caplog.text
    windows = dataset.num_examples["train"]
    config.train.update(num_steps=30, batch_size=4)
    assert run_setup.schedule_words(config, dataset) == (
        f"30 steps of 4 windows, {120 / windows:.1f} passes over the {windows} train windows")
    report = open(dataset.report_path).read()
    assert f"- Code selection: pattern {ALL_NUMERIC!r}, 4 codes (LAB 3, VITAL 1)" in report
    caplog.clear()
    config.data.packing = True
    with caplog.at_level(logging.WARNING):
        run_setup.prepare_run_data(config, str(tmp_path / "run"))
    assert not [r for r in caplog.messages if "packing" in r], caplog.messages
