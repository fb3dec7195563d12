"""Synthetic MEDS generator: layout and schema, sorting, splits, determinism, realism, labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import synthetic
from cvmae_jax.data.synthetic import LAB_CATALOG, SPLITS, TASKS, generate_synthetic_meds

N = 300  # subjects of the shared dataset (~170k events, well under a second to generate)
SODIUM, LACTATE, CRP = "LAB//50983//mEq/L", "LAB//50813//mmol/L", "LAB//50889//mg/L"
CREATININE, BUN, MCV = "LAB//50912//mg/dL", "LAB//51006//mg/dL", "LAB//51250//fL"
HOUR = np.int64(3_600_000_000)
LAB_CODE = r"LAB//\d{5,6}//\S(.*\S)?"  # LAB//<itemid>//<unit>, unit without outer spaces


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "meds"
    return root, generate_synthetic_meds(root, num_subjects=N, seed=0)


@pytest.fixture(scope="module")
def events(dataset):
    """All events as numpy columns (time in us with _NO_TIME for null), plus the split per row."""
    root, _ = dataset
    cols = {k: [] for k in ("subject_id", "time", "code", "value", "split", "file")}
    for split in SPLITS:
        for f in sorted((root / "data" / split).glob("*.parquet")):
            t = pq.read_table(f)
            cols["subject_id"].append(t["subject_id"].to_numpy())
            cols["time"].append(t["time"].cast(pa.int64()).fill_null(synthetic._NO_TIME).to_numpy())
            cols["code"].append(np.array(t["code"].to_pylist(), dtype=object))
            cols["value"].append(t["numeric_value"].to_numpy(zero_copy_only=False).astype(float))
            cols["split"].append(np.full(t.num_rows, split, dtype=object))
            cols["file"].append(np.full(t.num_rows, str(f), dtype=object))
    return {k: np.concatenate(v) for k, v in cols.items()}


def _values(ev, code, split="train"):
    m = (ev["code"] == code) & (ev["split"] == split)
    return ev["value"][m]


def _cv(x):
    return x.std() / abs(x.mean())


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return np.corrcoef(ra, rb)[0, 1]


def _together(ev, *codes):
    """Values [n, len(codes)] of codes measured at the same (subject, time), train split."""
    keyed = []
    for code in codes:
        m = (ev["code"] == code) & (ev["split"] == "train")
        keyed.append(dict(zip(zip(ev["subject_id"][m], ev["time"][m]), ev["value"][m])))
    keys = sorted(set.intersection(*(set(k) for k in keyed)))
    return np.array([[k[key] for k in keyed] for key in keys]).reshape(len(keys), len(codes))


def _lag1(ev, code):
    """Correlation of consecutive values of code within subjects (train)."""
    m = (ev["code"] == code) & (ev["split"] == "train")
    s, v = ev["subject_id"][m], ev["value"][m]
    same = s[1:] == s[:-1]
    return np.corrcoef(v[1:][same], v[:-1][same])[0, 1]


def _labels(root, task, split):
    return pq.read_table(root / "labels" / task / f"{split}.parquet")


# Layout and schema.

def test_layout_schema_and_metadata(dataset):
    root, _ = dataset
    for split in SPLITS:
        for f in (root / "data" / split).glob("*.parquet"):
            assert pq.read_schema(f).equals(synthetic.DATA_SCHEMA), f
    assert pq.read_schema(root / "metadata/codes.parquet").equals(pa.schema(
        [("code", pa.string()), ("description", pa.string()),
         ("parent_codes", pa.list_(pa.string()))]))
    assert pq.read_schema(root / "metadata/subject_splits.parquet").equals(
        pa.schema([("subject_id", pa.int64()), ("split", pa.string())]))
    meta = json.loads((root / "metadata/dataset.json").read_text())
    assert meta["dataset_name"] == "cvmae-synthetic" and meta["meds_version"] == "0.4.1"
    assert set(meta) == {"dataset_name", "dataset_version", "etl_name", "etl_version",
                         "meds_version", "created_at", "license"}
    for task in TASKS:
        for split in SPLITS:
            t = _labels(root, task, split)
            assert t.schema.equals(synthetic.LABEL_SCHEMA)
            for col in ("integer_value", "float_value", "categorical_value"):
                assert t[col].null_count == t.num_rows
            assert t["boolean_value"].null_count == 0
    assert not list(root.parent.glob(".meds.tmp-*"))  # no temporary folder left


def test_codes_metadata_lists_every_code_with_a_description(dataset, events):
    root, _ = dataset
    codes = pq.read_table(root / "metadata/codes.parquet").to_pydict()
    assert codes["code"] == sorted(set(events["code"]))
    assert all(codes["description"]) and codes["parent_codes"] == [None] * len(codes["code"])
    described = dict(zip(codes["code"], codes["description"]))
    assert described["LAB//50912//mg/dL"] == "Creatinine [mg/dL]"
    assert described["LAB//51237//UNK"] == "INR(PT)"


def test_null_times_values_and_code_families(events):
    static = np.isin(events["code"], ["GENDER//F", "GENDER//M"])
    np.testing.assert_array_equal(events["time"] == synthetic._NO_TIME, static)
    is_lab = np.array([c.startswith("LAB//") for c in events["code"]])
    np.testing.assert_array_equal(~np.isnan(events["value"]), is_lab)
    families = {c.split("//")[0] for c in events["code"]}
    assert families == {"GENDER", "MEDS_BIRTH", "HOSPITAL_ADMISSION", "HOSPITAL_DISCHARGE",
                        "ICU_ADMISSION", "ICU_DISCHARGE", "MEDS_DEATH", "DIAGNOSIS", "LAB"}
    for code in {c for c in events["code"] if c.startswith("LAB//")}:
        assert re.fullmatch(LAB_CODE, code), code


def test_rows_contiguous_and_sorted(events):
    s, t, f = events["subject_id"], events["time"], events["file"]
    for name in np.unique(f):
        m = f == name
        assert np.all(s[m][1:] >= s[m][:-1])
        same = s[m][1:] == s[m][:-1]
        assert np.all((t[m][1:] >= t[m][:-1])[same])  # null time (int64 min) sorts first
    files_per_subject = {}
    for subj, name in zip(s, f):
        files_per_subject.setdefault(subj, set()).add(name)
    assert all(len(v) == 1 for v in files_per_subject.values())


def test_no_event_after_death(events):
    death = events["code"] == "MEDS_DEATH"
    when = dict(zip(events["subject_id"][death], events["time"][death]))
    assert when
    dead = np.isin(events["subject_id"], list(when))
    limit = np.array([when.get(s, 0) for s in events["subject_id"][dead]])
    assert np.all(events["time"][dead] <= limit)


# Splits and summary.

def test_splits_disjoint_and_consistent_with_metadata(dataset, events):
    root, summary = dataset
    table = pq.read_table(root / "metadata/subject_splits.parquet").to_pydict()
    split_of = dict(zip(table["subject_id"], table["split"]))
    assert len(split_of) == len(table["subject_id"]) == N
    assert [sum(v == s for v in split_of.values()) for s in SPLITS] == [240, 30, 30]
    assert all(split_of[s] == sp for s, sp in zip(events["subject_id"], events["split"]))
    for task in TASKS:
        for split in SPLITS:
            ids = _labels(root, task, split)["subject_id"].to_pylist()
            assert all(split_of[i] == split for i in ids)
    for split in SPLITS:
        m = events["split"] == split
        lab = np.isin(events["code"][m], [lab.code for lab in LAB_CATALOG])
        assert summary["splits"][split] == {
            "subjects": int(np.unique(events["subject_id"][m]).size), "events": int(m.sum()),
            "lab_events": int(lab.sum()), "shards": 1}


@pytest.mark.parametrize("shard_rows", [5_000, 100])  # 100: fewer than most subjects have
def test_large_splits_are_sharded_at_subject_boundaries(tmp_path, monkeypatch, shard_rows):
    monkeypatch.setattr(synthetic, "SHARD_ROWS", shard_rows)
    summary = generate_synthetic_meds(tmp_path / "m", num_subjects=60, seed=1)
    files = list((tmp_path / "m/data/train").glob("*.parquet"))
    shards = summary["splits"]["train"]["shards"]
    assert sorted(f.name for f in files) == sorted(f"{i}.parquet" for i in range(shards))
    assert shards > 2 and all(pq.read_metadata(f).num_rows for f in files)
    ids = [set(pq.read_table(f)["subject_id"].to_pylist()) for f in files]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert sum(pq.read_metadata(f).num_rows for f in files) == summary["splits"]["train"]["events"]


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="split_fractions"):
        generate_synthetic_meds(tmp_path / "a", num_subjects=10, split_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="num_subjects"):
        generate_synthetic_meds(tmp_path / "b", num_subjects=0)
    assert not any(tmp_path.iterdir())


# Determinism and atomic writes.

def _file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = generate_synthetic_meds(tmp_path / "a", num_subjects=40, seed=7)
    b = generate_synthetic_meds(tmp_path / "b", num_subjects=40, seed=7)
    c = generate_synthetic_meds(tmp_path / "c", num_subjects=40, seed=8)
    files_a, files_c = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "c")
    assert a == b and files_a == _file_bytes(tmp_path / "b")
    assert a != c
    assert files_a["data/train/0.parquet"] != files_c["data/train/0.parquet"]


def test_refuses_non_empty_out_dir_and_accepts_an_empty_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(out))):
        generate_synthetic_meds(out, num_subjects=5)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        generate_synthetic_meds(tmp_path / "file", num_subjects=5)
    (tmp_path / "empty").mkdir()
    generate_synthetic_meds(tmp_path / "empty", num_subjects=5)
    assert (tmp_path / "empty/metadata/dataset.json").exists()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_labels", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_meds(tmp_path / "out", num_subjects=5)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_summary(tmp_path, capsys):
    synthetic.main([f"--out_dir={tmp_path / 'cli'}", "--num_subjects=8", "--seed=3"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_subjects"] == 8 and set(summary["labels"]) == set(TASKS)
    assert (tmp_path / "cli/data/train/0.parquet").exists()


# Realism.

def test_lab_catalog_is_mimic_like(dataset, events):
    codes = [lab.code for lab in LAB_CATALOG]
    assert len(set(codes)) == len(codes) >= 30
    assert all(re.fullmatch(LAB_CODE, c) and len(c.split("//")[1]) == 5 for c in codes)
    assert {SODIUM, LACTATE, CRP, CREATININE, BUN, "LAB//51003//ng/mL", "LAB//50820//units"} \
        <= set(codes)
    train = set(events["code"][(events["split"] == "train") & ~np.isnan(events["value"])])
    assert set(codes) <= train


def test_marginal_cvs_span_stable_to_volatile(events):
    assert _cv(_values(events, SODIUM)) < 0.05
    assert _cv(_values(events, LACTATE)) > 1
    assert _cv(_values(events, CRP)) > 1
    sodium = _values(events, SODIUM)
    assert 125 < np.median(sodium) < 150 and 0.5 < np.median(_values(events, LACTATE)) < 4


def test_values_positive_where_real_labs_are(events):
    for lab in LAB_CATALOG:
        v = _values(events, lab.code)
        assert np.all(v >= np.float32(lab.lo)) and np.all(v <= np.float32(lab.hi)), lab.name
        if lab.name != "Base Excess":
            assert np.all(v > 0), lab.name


def test_labs_correlate_with_each_other_and_their_own_past(events):
    creat, bun = _together(events, CREATININE, BUN).T
    assert len(creat) > 1000 and _spearman(creat, bun) > 0.5
    assert _lag1(events, SODIUM) > 0.3
    assert _lag1(events, MCV) > 0.8
    assert _lag1(events, MCV) > _lag1(events, LACTATE)  # volatile labs forget faster


def test_derived_labs_follow_the_analyzer_formulas(events):
    na, k, cl, hco3, gap = _together(events, SODIUM, "LAB//50971//mEq/L", "LAB//50902//mEq/L",
                                     "LAB//50882//mEq/L", "LAB//50868//mEq/L").T
    assert len(gap) > 1000
    np.testing.assert_array_equal(gap, np.clip(np.round(na + k - cl - hco3), 1, 50))
    hgb, hct, mchc = _together(events, "LAB//51222//g/dL", "LAB//51221//%", "LAB//51249//g/dL").T
    np.testing.assert_allclose(hct, hgb / mchc * 100, atol=0.051)


# Labels.

def _admissions(events):
    """Per subject: [(admission time, discharge time)], and death times."""
    adm, out = {}, {}
    for s, t, c in zip(events["subject_id"], events["time"], events["code"]):
        if c.startswith("HOSPITAL_ADMISSION//"):
            adm.setdefault(s, []).append([t, None])
        elif c.startswith("HOSPITAL_DISCHARGE//"):
            adm[s][-1][1] = t
        elif c == "MEDS_DEATH":
            out[s] = t
    return adm, out


def test_labels_follow_the_task_definitions(dataset, events):
    root, _ = dataset
    adm, death = _admissions(events)
    mort, readm = [], []
    for s, stays in adm.items():
        for i, (start, end) in enumerate(stays):
            died = start <= death.get(s, -1) <= end
            if end - start > 24 * HOUR:
                mort.append((s, start + 24 * HOUR, died))
            if not died:
                nxt = stays[i + 1][0] if i + 1 < len(stays) else None
                readm.append((s, end, nxt is not None and nxt - end <= 24 * 30 * HOUR))
    for task, expected in (("in_hospital_mortality_24h", mort), ("readmission_30d", readm)):
        got = []
        for split in SPLITS:
            t = _labels(root, task, split)
            got += zip(t["subject_id"].to_pylist(),
                       t["prediction_time"].cast(pa.int64()).to_pylist(),
                       t["boolean_value"].to_pylist())
        assert sorted(got) == sorted(expected), task


def test_label_prevalences(dataset):
    _, summary = dataset
    for task, (lo, hi) in (("in_hospital_mortality_24h", (0.05, 0.2)),
                           ("readmission_30d", (0.1, 0.3))):
        rows = summary["labels"][task]["train"]
        assert rows["rows"] > 300 and lo < rows["positives"] / rows["rows"] < hi


def test_mortality_labels_follow_the_latent_severity(dataset, events):
    """Positives had higher max lactate in their first 24 h (only data before prediction_time)."""
    root, _ = dataset
    t = _labels(root, "in_hospital_mortality_24h", "train")
    m = (events["code"] == LACTATE) & (events["split"] == "train")
    by_subject = {}
    for s, when, v in zip(events["subject_id"][m], events["time"][m], events["value"][m]):
        by_subject.setdefault(s, []).append((when, v))
    peak = {True: [], False: []}
    for s, pt, y in zip(t["subject_id"].to_pylist(), t["prediction_time"].cast(pa.int64())
                        .to_pylist(), t["boolean_value"].to_pylist()):
        v = [v for when, v in by_subject.get(s, []) if pt - 24 * HOUR <= when <= pt]
        if v:
            peak[y].append(max(v))
    assert len(peak[True]) > 10 and len(peak[False]) > 100
    assert np.mean(peak[True]) > 1.5 * np.mean(peak[False])


def test_runs_sharing_a_data_dir_get_the_synthetic_data_they_ask_for(tmp_path):
    messages = []
    small = synthetic.synthetic_meds_root(tmp_path, 20, 0, log=messages.append)
    other_seed = synthetic.synthetic_meds_root(tmp_path, 20, 1, log=messages.append)
    larger = synthetic.synthetic_meds_root(tmp_path, 30, 0, log=messages.append)
    assert len({small, other_seed, larger}) == 3 and len(messages) == 3
    assert synthetic.synthetic_meds_root(tmp_path, 20, 0, log=messages.append) == small
    assert len(messages) == 3  # reused, not generated again
    subjects = [pq.read_table(Path(root) / "metadata" / "subject_splits.parquet").num_rows
                for root in (small, larger)]
    assert subjects == [20, 30]


def test_a_dataset_another_process_wrote_first_is_kept(tmp_path, monkeypatch):
    """Two processes of one run generate the same synthetic data at once: the one that
    finishes second drops its copy instead of failing on the other's folder."""
    out = tmp_path / "meds"
    write = synthetic._write_dataset

    def racing(root, *args):
        summary = write(root, *args)
        write(out.parent / "first", *args)
        (out.parent / "first").rename(out)  # the other process renames its copy first
        return summary

    monkeypatch.setattr(synthetic, "_write_dataset", racing)
    generate_synthetic_meds(out, num_subjects=12, seed=0)
    monkeypatch.undo()
    generate_synthetic_meds(tmp_path / "alone", num_subjects=12, seed=0)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "alone")
                           for p in (tmp_path / "alone").rglob("*") if p.is_file())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no tmp left

