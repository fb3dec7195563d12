"""Data-layer fixtures: a tiny hand-made MEDS root (the shared sample is in ../conftest.py)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

A, B, C, D, E, HR = ("LAB//A//mg/dL", "LAB//B//mmol/L", "LAB//C//UNK", "LAB//D// ",
                     "LAB//E//x", "VITAL//HR")
SPLITS = {1: "train", 2: "train", 3: "train", 4: "train", 7: "train", 5: "tuning", 6: "held_out"}
T0 = datetime.datetime(2100, 1, 1)


@dataclasses.dataclass
class TinyMeds:
    """A MEDS root and its rows (subject_id, time | None, code, numeric_value | None)."""
    root: Path
    rows: list[tuple]
    A, B, C, D, E, HR = A, B, C, D, E, HR
    splits = SPLITS

    def config(self, **overrides) -> ml_collections.ConfigDict:
        """A `config.data` for this root: lab codes with >= 3 train rows (of its 5 train
        subjects, so min_subjects=1), windows of 8."""
        cfg = dict(meds_dir=str(self.root), max_len=8, lab_code_pattern=r"^LAB//", lab_codes=(),
                   top_k=100, min_code_count=3, clip_quantiles=(0.001, 0.999), window="chunks",
                   min_window_len=2, min_subjects=1)
        cfg.update(overrides)
        return ml_collections.ConfigDict(cfg)

    def numeric_rows(self, split: str = "train") -> list[tuple]:
        """The rows of `split` with a time and a finite value, sorted."""
        return sorted(r for r in self.rows if SPLITS.get(r[0]) == split and r[1] is not None
                      and r[3] is not None and np.isfinite(r[3]))

    def values(self, code: str, split: str = "train") -> np.ndarray:
        """Finite values of `code` in `split`, float64 [n]."""
        return np.array([r[3] for r in self.numeric_rows(split) if r[2] == code], np.float64)


def _f32(x) -> float:
    return float(np.float32(x))


def _subject_rows(subject: int, rng: np.random.Generator) -> list[tuple]:
    """Rows of one subject: a static row, labs every 30 min, non-numeric and non-lab rows."""
    big = SPLITS.get(subject) in ("tuning", "held_out")  # extreme values outside train
    n_a = 20 if subject == 1 else 5
    labs = [(A, _f32(rng.normal(1e6 if big else 10.0, 2.0))) for _ in range(n_a)]
    labs += [(B, _f32(rng.lognormal(0.0, 0.5) * (1e3 if big else 1.0))) for _ in range(4)]
    labs += [(D, 5.0)] + [(HR, _f32(rng.normal(80, 10))) for _ in range(8)]
    if subject in (1, 2):
        labs.append((C, _f32(rng.normal(3.0, 1.0))))
    if subject == 5:
        labs.append((E, 1.0))
    rng.shuffle(labs)
    t = T0 + datetime.timedelta(days=subject)
    rows = [(subject, None, "GENDER//F", None), (subject, t, "DIAGNOSIS//X", None)]
    rows += [(subject, t + datetime.timedelta(minutes=30 * i), c, v)
             for i, (c, v) in enumerate(labs)]
    return rows


def make_tiny_meds(root: Path) -> TinyMeds:
    """Writes the tiny MEDS root. Quirks: subject 7 (train) sits in data/tuning/, subject 8 has no
    split, subject 3 has a NaN, subject 4 an inf and a duplicate row, subject 2 dies before its
    last lab, subject 1's rows are not time-sorted, subject 5 has an extra code E."""
    rng = np.random.default_rng(0)
    rows = {s: _subject_rows(s, rng) for s in (1, 2, 3, 4, 5, 6, 7, 8)}
    rows[1] = rows[1][:2] + rows[1][2:][::-1]
    last = max(r[1] for r in rows[2] if r[1] is not None)
    rows[2] += [(2, last - datetime.timedelta(minutes=10), "MEDS_DEATH", None),
                (2, last + datetime.timedelta(minutes=5), A, 11.0)]
    rows[3].append((3, T0 + datetime.timedelta(days=3, hours=1), A, float("nan")))
    rows[4] += [(4, T0 + datetime.timedelta(days=4, hours=2), B, float("inf")),
                rows[4][3]]
    shards = {"data/train/0.parquet": (1, 2), "data/train/nested/1.parquet": (3, 4),
              "data/tuning/0.parquet": (5, 7, 8), "data/held_out/0.parquet": (6,)}
    for rel, subjects in shards.items():
        shard = [r for s in subjects for r in rows[s]]
        wide = rel.endswith("1.parquet") and "nested" in rel  # other types + extra columns
        table = pa.table({
            "subject_id": pa.array([r[0] for r in shard], pa.int64()),
            "time": pa.array([r[1] for r in shard], pa.timestamp("us")),
            "code": pa.array([r[2] for r in shard], pa.large_string() if wide else pa.string()),
            "numeric_value": pa.array([r[3] for r in shard],
                                      pa.float64() if wide else pa.float32()),
            **({"text_value": pa.array([None] * len(shard), pa.string()),
                "hospital": pa.array(["x"] * len(shard))} if wide else {}),
        })
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / rel)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"subject_id": pa.array(list(SPLITS), pa.int64()),
                             "split": list(SPLITS.values())}),
                   root / "metadata/subject_splits.parquet")
    return TinyMeds(root=root, rows=[r for s in sorted(rows) for r in rows[s]])


@pytest.fixture
def tiny_meds(tmp_path) -> TinyMeds:
    return make_tiny_meds(tmp_path / "meds")


@pytest.fixture(scope="session")
def tiny_meds_shared(tmp_path_factory) -> TinyMeds:
    """One tiny MEDS dataset for every test that only reads it (written once per test run)."""
    return make_tiny_meds(tmp_path_factory.mktemp("meds_shared"))
