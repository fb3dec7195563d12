"""prepare_dataset on MEDS variants seen in the wild: same result, or a reported warning."""

import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import meds, report
from cvmae_jax.data.prepare import prepare_dataset

from meds_reference import compute_stats, read_numeric_events

FIELDS = ("count", "mean", "std", "cv", "clip_low", "clip_high", "norm_mean", "norm_std",
          "num_subjects")


@pytest.fixture(scope="module")
def reference(tiny_meds_shared, tmp_path_factory):
    return prepare_dataset(tiny_meds_shared.config(), None, tmp_path_factory.mktemp("ref"))


def _same(prepared, reference):
    assert prepared.stats.codes == reference.stats.codes
    for f in FIELDS:
        np.testing.assert_allclose(getattr(prepared.stats, f), getattr(reference.stats, f),
                                   rtol=1e-12, atol=1e-12, err_msg=f)
    assert prepared.num_examples == reference.num_examples
    assert prepared.num_tokens == reference.num_tokens


def _rewrite_shards(root, change):
    for f in (root / "data").rglob("*.parquet"):
        pq.write_table(change(pq.read_table(f)), f)


def test_meds_03_patient_id(tiny_meds, tmp_path, reference):
    _rewrite_shards(tiny_meds.root, lambda t: t.rename_columns(
        ["patient_id" if c == "subject_id" else c for c in t.column_names]))
    splits = tiny_meds.root / "metadata/subject_splits.parquet"
    t = pq.read_table(splits)
    pq.write_table(t.rename_columns(["patient_id", "split"]),
                   tiny_meds.root / "metadata/patient_splits.parquet")
    splits.unlink()
    _same(prepare_dataset(tiny_meds.config(), None, tmp_path), reference)


def test_dictionary_codes_float32_values_no_text_value(tiny_meds, tmp_path, reference):
    _rewrite_shards(tiny_meds.root, lambda t: pa.table({
        "subject_id": t["subject_id"], "time": t["time"],
        "code": pc.dictionary_encode(t["code"].cast(pa.string())),
        "numeric_value": t["numeric_value"].cast(pa.float32()), "extra": t["subject_id"]}))
    _same(prepare_dataset(tiny_meds.config(), None, tmp_path), reference)


def test_many_shards_in_nested_folders(tiny_meds, tmp_path, reference):
    path = tiny_meds.root / "data/train/0.parquet"  # subjects 1 and 2 -> two deeper shards
    t = pq.read_table(path)
    path.unlink()
    for i, s in enumerate((1, 2)):
        out = tiny_meds.root / f"data/train/a/b{i}/part.parquet"
        out.parent.mkdir(parents=True)
        pq.write_table(t.filter(pc.equal(t["subject_id"], s)), out, row_group_size=7)
    _same(prepare_dataset(tiny_meds.config(), None, tmp_path), reference)


def test_splits_from_folder_names(tiny_meds, tmp_path):
    (tiny_meds.root / "metadata/subject_splits.parquet").unlink()
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path)
    assert prepared.report["splits"]["tuning"]["subjects"] == 3  # 5, 7 and 8 (data/tuning/)
    assert prepared.report["rows_without_split"] == 0


def test_one_pattern_takes_both_mimic_lab_code_forms():
    counts = {"LAB//50983//mEq/L": 50, "LAB//RESULT//50912//mg/dL": 40,
              "LAB//220045//bpm": 60, "LAB//RESULT//220045//bpm": 70, "MEDS_DEATH": 90}
    config = dict(lab_code_pattern=r"^LAB//(RESULT//)?\d{5}//", min_code_count=1, top_k=0)
    assert meds.select_lab_codes(counts, config) == ["LAB//50983//mEq/L",
                                                    "LAB//RESULT//50912//mg/dL"]
    assert meds.code_unit("LAB//RESULT//50912//mg/dL") == "mg/dL"


def test_report_counts_and_markdown(reference):
    report, path = reference.report, reference.path
    train = report["splits"]["train"]
    assert train["lab"]["unsorted_subjects"] == 2  # 1: reversed rows; 4: a duplicate appended
    assert train["lab"]["after_death_rows"] >= 1 and train["nonfinite_value"] == 2
    assert train["subjects"] == 5 and report["rows_without_split"] > 0
    assert report["splits"]["tuning"]["out_of_vocab"]["unseen_in_train_codes"] == 1  # LAB//E
    for field in ("cv", "within_subject_cv"):
        np.testing.assert_allclose([r[field] for r in report["codes"]],
                                   getattr(reference.stats, field), rtol=1e-12)
    assert [r["unit"] for r in report["codes"]] == ["mg/dL", "mmol/L", ""]
    assert [w.split(":")[0] for w in report["warnings"]] == [  # the fixture's D is always 5.0
        "1 of 3 selected codes have one value on train (LAB//D// )"]
    text = open(f"{path}/prepare_report.md").read()
    assert "| unsorted_subjects | 2 |" in text and "| LAB//A//mg/dL | `LAB//A//mg/dL` | mg/dL |" in text
    assert "subject_id" not in text.replace("subjects", "")  # counts only
    for split in ("tuning", "held_out"):
        o = report["splits"][split]["out_of_vocab"]
        assert (f"- {split}: {o['codes']} lab-like codes not selected ({o['events']:,} events), "
                f"{o['unseen_in_train_codes']} never seen in train") in text


def test_codes_not_selected_count_those_train_never_saw_apart():
    counts = {"LAB//x": 5, "LAB//y": 3, "LAB//z": 2, "HR": 7}  # x selected; HR not lab-like
    oov = report.out_of_vocab(counts, {"LAB//x": 10, "LAB//y": 1}, ["LAB//x"], r"^LAB//")
    assert oov == dict(codes=2, events=5, unseen_in_train_codes=1, unseen_in_train_events=2)


def test_a_code_mirrors_another_by_the_share_of_its_own_values():
    stats = SimpleNamespace(codes=("LAB//a", "LAB//b"), count=np.array([10, 100]))
    rows = report.mirrored_codes({("LAB//a", "LAB//b"): 9, ("LAB//b", "LAB//a"): 9}, stats)
    assert rows == [dict(code="LAB//a", mirrors="LAB//b", values=9, share=0.9)]


def test_events_in_no_window_are_counted_in_the_readable_report(tiny_meds, tmp_path):
    prepared = prepare_dataset(tiny_meds.config(window="last", max_len=3), None, tmp_path)
    counts = [prepared.report["splits"][s]["windows"]["events_not_in_window"]
              for s in meds.SPLITS]
    assert counts[0] > 0
    text = open(f"{prepared.path}/prepare_report.md").read()
    assert "| events_not_in_window | " + " | ".join(f"{n:,}" for n in counts) + " |" in text


def test_normalized_data_is_detected(tiny_meds, tmp_path, capsys):
    train = read_numeric_events(tiny_meds.root, "train")
    codes = [tiny_meds.A, tiny_meds.B, tiny_meds.D]
    stats = compute_stats(train, codes)

    def zscore(t):
        v = t["numeric_value"].cast(pa.float64()).to_numpy(zero_copy_only=False).copy()
        c = np.array(t["code"].cast(pa.string()).to_pylist())
        for i, code in enumerate(codes):
            v[c == code] = (v[c == code] - stats.mean[i]) / max(stats.std[i], 1e-9)
        return t.set_column(3, "numeric_value", pa.array(v, mask=np.isnan(v) & (
            t["numeric_value"].is_null().to_numpy(zero_copy_only=False))))
    _rewrite_shards(tiny_meds.root, zscore)
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path)
    warning, constant = prepared.report["warnings"]  # the fixture's D is constant
    assert "already normalized" in warning and "meaningless" in warning
    assert "one value on train" in constant
    assert "WARNING" in capsys.readouterr().out


def test_constant_codes_are_warned_about(tiny_meds, tmp_path):
    def constant_b(t):
        b = pc.equal(t["code"].cast(pa.string()), tiny_meds.B)
        value = pc.if_else(pc.and_(b, pc.is_valid(t["numeric_value"])), 2.0,
                           t["numeric_value"].cast(pa.float64()))
        return t.set_column(3, "numeric_value", value)

    _rewrite_shards(tiny_meds.root, constant_b)
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path)
    (warning,) = prepared.report["warnings"]
    assert warning.startswith(f"2 of 3 selected codes have one value on train ({tiny_meds.B}, "
                              f"{tiny_meds.D}): their CV is 0")
    assert prepared.stats.cv[list(prepared.stats.codes).index(tiny_meds.B)] == 0


def test_codes_whose_cv_comes_from_a_mean_near_zero_are_warned_about():
    events = pa.table({"subject_id": [1] * 8, "code": ["FLAG"] * 4 + ["LAB"] * 4,
                       "numeric_value": [-1.0, 1.0, -1.0, 1.02, 4.0, 5.0, 6.0, 5.0]})
    stats = compute_stats(events, ["FLAG", "LAB"])
    (warning,) = report.warnings_for(stats)
    assert warning.startswith("1 of 2 selected codes have a train CV above 10 (FLAG (201)): "
                              "their |mean| is below a tenth of their std")


def test_codes_whose_cv_comes_from_values_outside_the_clipping_are_warned_about():
    """pH in another unit in 1 of 2,000 rows: a raw CV of about 2 that the clipped values
    (CV about 0.01) do not have; a lab with a wide but clean spread is not named."""
    rng = np.random.default_rng(0)
    ph = np.r_[rng.normal(7.4, 0.07, 1999), 700.0]
    lab = rng.lognormal(3.0, 1.0, 2000)
    events = pa.table({"subject_id": np.tile(np.arange(100), 40),
                       "code": ["LAB//pH"] * 2000 + ["LAB//ALT"] * 2000,
                       "numeric_value": np.r_[ph, lab]})
    stats = compute_stats(events, ["LAB//pH", "LAB//ALT"])
    (warning,) = report.warnings_for(stats)
    assert re.match(r"1 of 2 selected codes have a train CV at least 3x the CV of their values "
                    r"within the clipping quantiles \(LAB//pH: (2|1\.99\d*) over every value, "
                    r"0\.0\d+ within \[7\.1\d*, 7\.6\d*\]\): a few values outside", warning)


def test_counting_values_another_code_has_at_the_same_time():
    t = pa.table({"subject_id": [1, 1, 1, 1, 1, 2, 2, 2],
                  "time": pa.array([0, 0, 0, 5, 5, 0, 0, 9], pa.timestamp("us")),
                  "code": ["A", "B", "C", "A", "B", "A", "B", "A"],
                  "numeric_value": [1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0]})
    # (1, 0, 1.0): A, B and C; (1, 5): values differ; (2, 0, 4.0): A and B; (2, 9): A alone
    assert meds.mirrored_values(meds.value_groups(t)) == {
        ("A", "B"): 2, ("B", "A"): 2, ("A", "C"): 1, ("C", "A"): 1, ("B", "C"): 1, ("C", "B"): 1}


def test_duplicates_from_value_groups_equal_the_exact_row_count():
    rng = np.random.default_rng(0)
    n = 5000
    t = pa.table({"subject_id": rng.integers(0, 20, n),
                  "time": pa.array(rng.integers(0, 5, n), pa.timestamp("us")),
                  "code": rng.choice(["A", "B", "C"], n),
                  "numeric_value": rng.integers(0, 3, n).astype(float)})
    duplicates = meds.duplicates_in(meds.value_groups(t))
    exact = t.num_rows - t.group_by(["subject_id", "time", "code", "numeric_value"]).aggregate(
        []).num_rows  # rows repeating an earlier row on all four columns
    assert duplicates == exact > 0


def test_codes_copying_another_codes_values_are_warned_about(tiny_meds, tmp_path):
    copy = "LAB//COPY//mg/dL"

    def add_copies_of_a(t):
        a = t.filter(pc.equal(t["code"].cast(pa.string()), tiny_meds.A))
        copies = a.set_column(2, "code", pa.array([copy] * a.num_rows, t.schema.field(2).type))
        return pa.concat_tables([t, copies]).sort_by([("subject_id", "ascending"),
                                                      ("time", "ascending")])

    _rewrite_shards(tiny_meds.root, add_copies_of_a)
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path)
    assert {r["code"]: r["mirrors"] for r in prepared.report["mirrored_codes"]} == {
        tiny_meds.A: copy, copy: tiny_meds.A}
    assert all(r["share"] == 1.0 for r in prepared.report["mirrored_codes"])
    (warning,) = [w for w in prepared.report["warnings"] if "same time" in w]
    assert warning.startswith(f"2 of {prepared.stats.vocab_size} selected codes have >= 90% of "
                              "their train values equal to another selected code's value")
    suggested = re.search(r"lab_code_pattern='([^']+)'", warning).group(1)
    mimic = {"LAB//50983//mEq/L": 50, "LAB//RESULT//50912//mg/dL": 40, "LAB//220045//bpm": 60}
    assert meds.select_lab_codes(mimic, dict(lab_code_pattern=suggested, min_code_count=1,
                                             top_k=0)) == list(mimic)[:2]
    assert f"| {copy} | `{copy}` | {tiny_meds.A} (`{tiny_meds.A}`) |" in open(
        f"{prepared.path}/prepare_report.md").read()


def test_reservoir_quantiles_are_seeded_and_close():
    rng = np.random.default_rng(1)
    n = 50_000
    events = pa.table({"subject_id": np.arange(n), "code": ["x"] * n,
                       "numeric_value": rng.lognormal(0, 1, n)})
    exact = compute_stats(events, ["x"], (0.01, 0.99))
    a = compute_stats(events, ["x"], (0.01, 0.99), reservoir_size=5_000)
    b = compute_stats(events, ["x"], (0.01, 0.99), reservoir_size=5_000)
    assert a.clip_high[0] == b.clip_high[0] and a.mean[0] == exact.mean[0]
    np.testing.assert_allclose([a.clip_low[0], a.clip_high[0]],
                               [exact.clip_low[0], exact.clip_high[0]], rtol=0.15)


def test_placeholder_values_are_warned_about_and_can_be_dropped(tiny_meds, tmp_path):
    def placeholder(t):  # the first LAB//A value of train subjects 3 and 4 becomes 99999
        df = t.to_pandas()
        is_a = (df.code == tiny_meds.A) & df.subject_id.isin([3, 4]) & np.isfinite(
            df.numeric_value.astype(float))
        df.loc[df[is_a].groupby("subject_id").head(1).index, "numeric_value"] = 99999.0
        return pa.Table.from_pandas(df, schema=t.schema, preserve_index=False)

    _rewrite_shards(tiny_meds.root, placeholder)
    a = 0  # LAB//A, the most frequent code
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path / "kept")
    assert prepared.stats.codes[a] == tiny_meds.A and prepared.stats.clip_high[a] == 99999.0
    (row,) = prepared.report["squeezed_codes"]
    assert row["code"] == tiny_meds.A and row["value"] == 99999.0
    assert row["far_share"] == row["value_share"] == 2 / prepared.stats.count[a]
    (warning,) = [w for w in prepared.report["warnings"] if "IQRs outside" in w]
    assert f"{tiny_meds.A} (4.88% far, 99999 in 4.88%;" in warning
    assert "--config.data.drop_values='(99999,)'" in warning
    dropped = prepare_dataset(tiny_meds.config(drop_values=(99999,)), None, tmp_path / "drop")
    assert dropped.report["splits"]["train"]["dropped_value"] == 2
    assert dropped.stats.count[a] == prepared.stats.count[a] - 2
    assert dropped.stats.clip_high[a] < 20 and not dropped.report["squeezed_codes"]
    assert dropped.stats.drop_values == (99999.0,)
    values = np.concatenate([r["values"][r["codes"] == a] for r in
                             map(dropped.data_source("train").__getitem__,
                                 range(dropped.num_examples["train"]))])
    assert len(values) == dropped.stats.count[a] and 0.8 < values.std() < 1.2


def test_the_report_counts_rows_and_timed_events_apart(tiny_meds, tmp_path):
    text = open(prepare_dataset(tiny_meds.config(), None, tmp_path).report_path).read()

    def row(key):
        (line,) = [line for line in text.splitlines() if line.startswith(f"| {key} |")]
        return [int(cell.replace(",", "")) for cell in line.split("|")[2:-1]]

    assert [r - n for r, n in zip(row("rows"), row("null_time"))] == row("events")
    assert row("null_time")[0] == 5  # one static row per train subject
