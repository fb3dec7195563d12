"""Per-code statistics of the RAW train values: counts, moments, CV, clipping bounds.

They drive normalization (clip, then z-score) and the CV/variance masking strategies, and
travel with the prepared dataset (`data_stats.json`) and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvmae_jax.data.meds import MEDSFormatError
from cvmae_jax.jsonio import write_json_atomic

STD_EPS = 1e-6  # floor of the std used to normalize (constant codes)
_FLOAT_FIELDS = ("count", "mean", "std", "cv", "variance", "clip_low", "clip_high",
                 "norm_mean", "norm_std")


@dataclasses.dataclass(frozen=True, eq=False)
class DataStats:
    """Statistics of V lab codes; every array has shape [V], index i describes `codes[i]`.

    count, mean, std (population, ddof=0), variance = std**2 and cv = std / |mean| are of the
    raw, unclipped train values (float64). cv is inf when mean == 0 and std > 0, and 0 when the
    code is constant. clip_low/clip_high are the train quantiles used to clip before z-scoring,
    and norm_mean/norm_std the moments of the CLIPPED train values that the z-score uses (so a
    few extreme outliers cannot squash every other value towards 0).
    num_subjects (int64) counts the train subjects with at least one value of the code.
    """
    codes: tuple[str, ...]
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    cv: np.ndarray
    variance: np.ndarray
    clip_low: np.ndarray
    clip_high: np.ndarray
    norm_mean: np.ndarray
    norm_std: np.ndarray
    num_subjects: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.codes)

    def normalize(self, code_index, raw) -> np.ndarray:
        """Clips raw values to their code's [clip_low, clip_high], then z-scores them.

        code_index and raw share a shape [...]; returns float32 [...].
        """
        i = np.asarray(code_index)
        x = np.clip(np.asarray(raw, np.float64), self.clip_low[i], self.clip_high[i])
        return ((x - self.norm_mean[i]) / self._scale(i)).astype(np.float32)

    def denormalize(self, code_index, normalized) -> np.ndarray:
        """Inverse of the z-score (the clip is not undone). Same shape, float64."""
        i = np.asarray(code_index)
        return np.asarray(normalized, np.float64) * self._scale(i) + self.norm_mean[i]

    def _scale(self, i: np.ndarray) -> np.ndarray:
        return np.maximum(self.norm_std[i], STD_EPS)

    def to_dict(self, extra: dict[str, np.ndarray] | None = None) -> dict:
        """JSON-ready {"codes": [{"code", "count", ..., "num_subjects", **extra}, ...]};
        non-finite floats are written as the strings "inf", "-inf", "nan"."""
        extra = extra or {}
        for name, arr in extra.items():
            if len(arr) != self.vocab_size:
                raise ValueError(
                    f"extra[{name!r}] has length {len(arr)}, expected {self.vocab_size}")
        rows = []
        for i, code in enumerate(self.codes):
            row = {"code": code, **{f: _json_float(getattr(self, f)[i]) for f in _FLOAT_FIELDS}}
            row["count"] = int(self.count[i])
            row["num_subjects"] = int(self.num_subjects[i])
            row.update({k: _json_value(v[i]) for k, v in extra.items()})
            rows.append(row)
        return {"codes": rows}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        rows = d["codes"]
        arrays = {f: np.array([float(r[f]) for r in rows], np.float64) for f in _FLOAT_FIELDS}
        return cls(codes=tuple(r["code"] for r in rows),
                   num_subjects=np.array([int(r.get("num_subjects", 0)) for r in rows], np.int64),
                   **arrays)

    def save_json(self, path, extra: dict[str, np.ndarray] | None = None) -> None:
        """Writes `to_dict(extra)` atomically."""
        write_json_atomic(path, self.to_dict(extra))

    @classmethod
    def load_json(cls, path) -> DataStats:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _json_float(x) -> float | str:
    x = float(x)
    return x if np.isfinite(x) else str(x)


def _json_value(x):
    x = np.asarray(x).item()
    return _json_float(x) if isinstance(x, float) else x


def compute_stats(train_events: pa.Table, codes, clip_quantiles=(0.001, 0.999)) -> DataStats:
    """Stats of `codes` from TRAIN events (subject_id, code, numeric_value); other codes ignored.

    Every code needs at least one row. Quantiles use numpy's default (linear) method.
    """
    codes = tuple(codes)
    idx = pc.index_in(train_events["code"], value_set=pa.array(codes, pa.string()))
    known = pc.is_valid(idx)
    idx = idx.filter(known).to_numpy().astype(np.int64)
    values = train_events["numeric_value"].filter(known).to_numpy().astype(np.float64)
    subjects = train_events["subject_id"].filter(known).to_numpy()
    order = np.lexsort((values, idx))
    idx, values, subjects = idx[order], values[order], subjects[order]
    bounds = np.searchsorted(idx, np.arange(len(codes) + 1))
    empty = [c for c, lo, hi in zip(codes, bounds[:-1], bounds[1:]) if lo == hi]
    if empty:
        raise MEDSFormatError(
            f"train split, column numeric_value: no values for codes {empty[:10]}")
    q_low, q_high = clip_quantiles
    out = {f: np.zeros(len(codes)) for f in _FLOAT_FIELDS}
    num_subjects = np.zeros(len(codes), np.int64)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        v = values[lo:hi]
        out["count"][i] = len(v)
        out["mean"][i] = v.mean()
        out["std"][i] = v.std()
        out["clip_low"][i], out["clip_high"][i] = np.quantile(v, [q_low, q_high])
        clipped = np.clip(v, out["clip_low"][i], out["clip_high"][i])
        out["norm_mean"][i], out["norm_std"][i] = clipped.mean(), clipped.std()
        num_subjects[i] = len(np.unique(subjects[lo:hi]))
    out["variance"] = out["std"] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out["cv"] = np.where(out["std"] == 0, 0.0, out["std"] / np.abs(out["mean"]))
    return DataStats(codes=codes, num_subjects=num_subjects, **out)
