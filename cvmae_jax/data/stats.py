"""Per-code statistics of the RAW train values: counts, moments, CV, clipping bounds.

They drive normalization (clip, then z-score) and the CV/variance masking strategies, and
travel with the prepared dataset (`data_stats.json`) and every checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvmae_jax.data.disclosure import subject_safe_bounds
from cvmae_jax.data.meds import MEDSFormatError
from cvmae_jax.jsonio import json_float, write_json_atomic

STD_EPS = 1e-6  # floor of the std used to normalize (constant codes)
RESERVOIR_SIZE = 100_000  # values per code sampled for the clipping quantiles
_FLOAT_FIELDS = ("count", "mean", "std", "cv", "within_subject_cv", "variance", "clip_low",
                 "clip_high", "norm_mean", "norm_std")
_OPTIONAL_FIELDS = ("within_subject_cv",)  # NaN when read from statistics written without it


@dataclasses.dataclass(frozen=True, eq=False)
class DataStats:
    """Statistics of V lab codes; every array has shape [V], index i describes `codes[i]`.

    count, mean, std (population, ddof=0), variance = std**2 and cv = std / |mean| are of the
    raw, unclipped train values (float64). cv is inf when mean == 0 and std > 0, and 0 when the
    code is constant. within_subject_cv: the median, over the train subjects with at least two
    values of the code, of the CV of that subject's raw values (each subject's volatility,
    without the spread between subjects that cv also holds); 0 when no subject has two values.
    clip_low/clip_high are the train quantiles used to clip before z-scoring,
    and norm_mean/norm_std the moments of the CLIPPED train values that the z-score uses (so a
    few extreme outliers cannot squash every other value towards 0).
    num_subjects (int64) counts the train subjects with at least one value of the code.
    drop_values: the raw values left out as placeholders before any of this
    (config.data.drop_values); readers of raw events leave them out too.
    """
    codes: tuple[str, ...]
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    cv: np.ndarray
    within_subject_cv: np.ndarray
    variance: np.ndarray
    clip_low: np.ndarray
    clip_high: np.ndarray
    norm_mean: np.ndarray
    norm_std: np.ndarray
    num_subjects: np.ndarray
    drop_values: tuple[float, ...] = ()

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
        """JSON-ready {"codes": [{"code", "count", ..., "num_subjects", **extra}, ...],
        "drop_values": [...]}; non-finite floats are written as the strings "inf", "-inf",
        "nan"."""
        extra = extra or {}
        for name, arr in extra.items():
            if len(arr) != self.vocab_size:
                raise ValueError(
                    f"extra[{name!r}] has length {len(arr)}, expected {self.vocab_size}")
        rows = []
        for i, code in enumerate(self.codes):
            row = {"code": code, **{f: json_float(getattr(self, f)[i]) for f in _FLOAT_FIELDS}}
            row["count"] = int(self.count[i])
            row["num_subjects"] = int(self.num_subjects[i])
            row.update({k: _json_value(v[i]) for k, v in extra.items()})
            rows.append(row)
        return {"codes": rows, "drop_values": list(self.drop_values)}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        rows = d["codes"]
        arrays = {f: np.array([float(r[f] if f not in _OPTIONAL_FIELDS else r.get(f, "nan"))
                               for r in rows], np.float64) for f in _FLOAT_FIELDS}
        return cls(codes=tuple(r["code"] for r in rows),
                   num_subjects=np.array([int(r.get("num_subjects", 0)) for r in rows], np.int64),
                   drop_values=tuple(float(v) for v in d.get("drop_values", ())), **arrays)

    def save_json(self, path, extra: dict[str, np.ndarray] | None = None) -> None:
        """Writes `to_dict(extra)` atomically."""
        write_json_atomic(path, self.to_dict(extra))


def _json_value(x):
    x = np.asarray(x).item()
    return json_float(x) if isinstance(x, float) else x


class CodeMoments:
    """Streaming per-code count, mean and M2 (sum of squared deviations from the mean), merged
    batch by batch (Chan et al.), and the number of distinct subjects per code. Codes are added
    as they are seen; memory grows with the number of codes, not of rows.

    The moments are kept in units of a per-code power of two near the largest |value| seen
    (`power_of_two_scale`; rescaling is exact), so no sum or square overflows whatever the
    finite values: `means()` and `stds()` are finite. Subjects are counted, and each subject's
    own CV per code taken (`within_subject_cvs`), per shard (`end_shard`), so a subject must not
    span shards.
    """

    def __init__(self):
        self.index: dict[str, int] = {}
        self.n, self.mean, self.m2 = np.zeros(0), np.zeros(0), np.zeros(0)  # scaled units
        self.scale = np.full(0, 0.5)  # power_of_two_scale(0)
        self.subjects = np.zeros(0, np.int64)
        # each (code, subject) pair with >= 2 values: its code index and its CV (ended shards)
        self.subject_cv_codes, self.subject_cvs = np.zeros(0, np.int64), np.zeros(0)
        self._subject_parts: list[pa.Table] = []  # per-batch (code, subject) moments

    def _grow(self, grow: int) -> None:
        """Room for `grow` more codes (zero moments)."""
        if grow:
            self.n, self.mean, self.m2 = (np.r_[a, np.zeros(grow)]
                                          for a in (self.n, self.mean, self.m2))
            self.scale = np.r_[self.scale, np.full(grow, 0.5)]
            self.subjects = np.r_[self.subjects, np.zeros(grow, np.int64)]

    def add(self, codes: pa.Array, values: np.ndarray, subject_ids: np.ndarray) -> None:
        """codes string [n], values float64 [n] (finite), subject_ids int64 [n]."""
        enc = pc.dictionary_encode(codes)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        lookup = np.array([self.index.setdefault(c, len(self.index))
                           for c in enc.dictionary.to_pylist()], np.int64)
        idx = lookup[enc.indices.to_numpy(zero_copy_only=False)] if len(values) else \
            np.zeros(0, np.int64)
        self._grow(len(self.index) - len(self.n))
        self._subject_parts.append(subject_moments(idx, subject_ids, values))
        v = len(self.n)
        largest = np.zeros(v)
        np.maximum.at(largest, idx, np.abs(values))
        scale = np.maximum(self.scale, power_of_two_scale(largest))
        shrink = self.scale / scale  # a power of two: exact
        self.mean, self.m2, self.scale = self.mean * shrink, self.m2 * shrink ** 2, scale
        values = values / scale[idx]  # |values| < 2
        n_b = np.bincount(idx, minlength=v).astype(np.float64)
        mean_b = np.bincount(idx, values, v) / np.maximum(n_b, 1)
        m2_b = np.bincount(idx, (values - mean_b[idx]) ** 2, v)
        self.n, self.mean, self.m2 = _chan(self.n, self.mean, self.m2, n_b, mean_b, m2_b)

    def merge(self, other: CodeMoments) -> None:
        """Adds the moments and subject counts of `other` (its shards ended, their subjects
        none of these); codes new here are appended in `other`'s order. Merging per-shard
        moments in shard order gives the same bits whichever processes computed them."""
        rows = np.array([self.index.setdefault(c, len(self.index)) for c in other.index],
                        np.int64)
        self._grow(len(self.index) - len(self.n))
        scale = np.maximum(self.scale[rows], other.scale)
        mine, theirs = self.scale[rows] / scale, other.scale / scale  # powers of two: exact
        n, mean, m2 = _chan(self.n[rows], self.mean[rows] * mine, self.m2[rows] * mine ** 2,
                            other.n, other.mean * theirs, other.m2 * theirs ** 2)
        self.n[rows], self.mean[rows], self.m2[rows], self.scale[rows] = n, mean, m2, scale
        self.subjects[rows] += other.subjects
        self.subject_cv_codes = np.r_[self.subject_cv_codes, rows[other.subject_cv_codes]]
        self.subject_cvs = np.r_[self.subject_cvs, other.subject_cvs]

    def means(self) -> np.ndarray:
        """Per-code mean of the values added, float64 [codes seen]."""
        return self.mean * self.scale

    def stds(self) -> np.ndarray:
        """Per-code population standard deviation (ddof=0), float64 [codes seen]."""
        return np.sqrt(self.m2 / np.maximum(self.n, 1)) * self.scale

    def end_shard(self) -> None:
        """Adds the distinct (code, subject) pairs seen since the last call to `subjects`, and
        the CV of each pair with at least two values to `subject_cvs`."""
        if self._subject_parts:
            codes, n, mean, var = merge_subject_moments(pa.concat_tables(self._subject_parts))
            self.subjects += np.bincount(codes, minlength=len(self.n))
            several = n >= 2
            self.subject_cv_codes = np.r_[self.subject_cv_codes, codes[several]]
            self.subject_cvs = np.r_[self.subject_cvs, coefficient_of_variation(
                np.sqrt(var[several]), mean[several])]
        self._subject_parts = []

    def within_subject_cvs(self) -> np.ndarray:
        """Per code, the median of its subjects' CVs (`subject_cvs`; 0 for a code no subject has
        two values of), float64 [codes seen]."""
        out = np.zeros(len(self.n))
        order = np.argsort(self.subject_cv_codes, kind="stable")
        codes, cvs = self.subject_cv_codes[order], self.subject_cvs[order]
        bounds = np.searchsorted(codes, np.arange(len(self.n) + 1))
        for i in np.flatnonzero(np.diff(bounds)):
            out[i] = np.median(cvs[bounds[i]:bounds[i + 1]])
        return out

    def counts(self) -> dict[str, int]:
        return {c: int(self.n[i]) for c, i in self.index.items()}

    def subject_counts(self) -> dict[str, int]:
        """{code: distinct subjects} over the shards ended so far."""
        return {c: int(self.subjects[i]) for c, i in self.index.items()}


def subject_moments(idx: np.ndarray, subject_ids: np.ndarray, values: np.ndarray) -> pa.Table:
    """Count, mean and population variance of the raw values of each (code index, subject) pair
    in one batch: columns c, s, n, mean, var (one row per pair)."""
    table = pa.table({"c": idx, "s": subject_ids, "v": values})
    moments = table.group_by(["c", "s"]).aggregate(
        [("v", "count"), ("v", "mean"), ("v", "variance", pc.VarianceOptions(ddof=0))])
    return pa.table({"c": moments["c"], "s": moments["s"], "n": moments["v_count"],
                     "mean": moments["v_mean"], "var": moments["v_variance"]})


def merge_subject_moments(parts: pa.Table) -> tuple[np.ndarray, ...]:
    """The per-batch moments of `subject_moments` merged per (code, subject) pair: code index
    int64 [P], count, mean and population variance float64 [P], one entry per distinct pair.
    In raw units: values beyond about 1e154 give an inf or NaN variance, which `finish_stats`
    refuses with the code's other statistics."""
    c, s = parts["c"].to_numpy(), parts["s"].to_numpy()
    if not len(c):
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0)
    n, mean, var = (parts[k].to_numpy().astype(np.float64) for k in ("n", "mean", "var"))
    order = np.lexsort((s, c))
    c, s, n, mean, var = c[order], s[order], n[order], mean[order], var[order]
    start = np.flatnonzero(np.r_[True, (c[1:] != c[:-1]) | (s[1:] != s[:-1])])
    group = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(c)]))
    total = np.add.reduceat(n, start)
    with np.errstate(over="ignore", invalid="ignore"):
        pooled_mean = np.add.reduceat(n * mean, start) / total
        m2 = np.add.reduceat(n * var + n * (mean - pooled_mean[group]) ** 2, start)
    return c[start].astype(np.int64), total, pooled_mean, m2 / total


def coefficient_of_variation(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """std / |mean| [...]: 0 where std is 0 (a constant), inf where only the mean is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std == 0, 0.0, std / np.abs(mean))


def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Count, mean and M2 [k] of two groups of values [k] together (Chan et al.)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n > 0, n_b / n, 0.0)
    return n, mean_a + delta * share, m2_a + m2_b + delta ** 2 * n_a * share


def power_of_two_scale(x: np.ndarray) -> np.ndarray:
    """The power of two s with x / s in [1, 2) (0.5 where x is 0), float64 [...]: finite for
    every finite x >= 0, and dividing by it is exact."""
    return np.ldexp(1.0, np.frexp(np.asarray(x, np.float64))[1] - 1)


def scaled_mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and population std of finite values x [n] (n >= 1), computed in units of
    `power_of_two_scale(max |x|)` so neither overflows."""
    scale = float(power_of_two_scale(np.max(np.abs(x))))
    y = x / scale
    return float(y.mean() * scale), float(y.std() * scale)


class Reservoirs:
    """A uniform random sample of at most `size` values per code index, each with its subject
    (Algorithm R, vectorized, seeded): it holds every value of codes with <= size values, so
    quantiles are exact there and approximate beyond."""

    def __init__(self, num_codes: int, size: int = RESERVOIR_SIZE, seed: int = 0):
        self.size = int(size)
        self.rng = np.random.default_rng(seed)
        self.seen = np.zeros(num_codes, np.int64)
        self.samples = [np.zeros(0) for _ in range(num_codes)]
        self.subjects = [np.zeros(0, np.int64) for _ in range(num_codes)]

    def add(self, idx: np.ndarray, values: np.ndarray, subjects: np.ndarray) -> None:
        """idx int [n] in [0, num_codes), values float64 [n], subjects int64 [n]."""
        order = np.argsort(idx, kind="stable")
        idx, values, subjects = idx[order], values[order], subjects[order]
        bounds = np.searchsorted(idx, np.arange(len(self.samples) + 1))
        for i in np.flatnonzero(np.diff(bounds)):
            self._add_one(i, values[bounds[i]:bounds[i + 1]], subjects[bounds[i]:bounds[i + 1]])

    def _add_one(self, i: int, v: np.ndarray, s: np.ndarray) -> None:
        take = min(max(self.size - len(self.samples[i]), 0), len(v))
        sample, who = np.r_[self.samples[i], v[:take]], np.r_[self.subjects[i], s[:take]]
        seen, v, s = self.seen[i] + take, v[take:], s[take:]
        if len(v):  # item number j (0-based) replaces slot r ~ U{0..j} when r < size
            r = self.rng.integers(0, seen + np.arange(len(v)) + 1)
            keep = r < self.size
            sample[r[keep]], who[r[keep]] = v[keep], s[keep]  # later items win, as in the
            # sequential algorithm
        self.samples[i], self.subjects[i], self.seen[i] = sample, who, seen + len(v)

    def merge(self, other: Reservoirs, rng: np.random.Generator) -> None:
        """Makes each code's sample a uniform sample of <= size of the values seen here and in
        `other` (drawn with `rng`): all of them while they fit, else a hypergeometric share of
        each side (binomial beyond numpy's 1e9 limit), so merging per-shard samples in shard
        order with seeded generators gives the same sample whichever processes drew them."""
        for i, (n_a, n_b) in enumerate(zip(self.seen.tolist(), other.seen.tolist())):
            if n_b == 0:
                continue
            if n_a == 0 or n_a + n_b <= self.size:
                self.samples[i] = np.r_[self.samples[i], other.samples[i]]
                self.subjects[i] = np.r_[self.subjects[i], other.subjects[i]]
            else:
                k = self.size
                from_a = (rng.hypergeometric(n_a, n_b, k) if max(n_a, n_b) < 10 ** 9
                          else min(rng.binomial(k, n_a / (n_a + n_b)), n_a, k))
                from_a = max(from_a, k - len(other.samples[i]))
                b = rng.choice(len(other.samples[i]), k - from_a, replace=False)
                if len(self.samples[i]) == k:  # full: other's values take k - from_a slots
                    slots = rng.choice(k, k - from_a, replace=False)
                    self.samples[i][slots] = other.samples[i][b]
                    self.subjects[i][slots] = other.subjects[i][b]
                else:
                    a = rng.choice(len(self.samples[i]), from_a, replace=False)
                    self.samples[i] = np.r_[self.samples[i][a], other.samples[i][b]]
                    self.subjects[i] = np.r_[self.subjects[i][a], other.subjects[i][b]]
            self.seen[i] = n_a + n_b


def finish_stats(codes, moments: CodeMoments, reservoirs: Reservoirs,
                 clip_quantiles=(0.001, 0.999), drop_values=(), min_subjects: int = 1
                 ) -> DataStats:
    """DataStats of `codes` (reservoir i samples codes[i]): exact counts, moments and subject
    counts from `moments`; clip bounds (`subject_safe_bounds` with k = min_subjects) and the
    clipped moments from the reservoir samples."""
    codes = tuple(codes)
    rows = [moments.index.get(c) for c in codes]
    empty = [c for c, r in zip(codes, rows) if r is None or moments.n[r] == 0]
    if empty:
        raise MEDSFormatError(
            f"train split, column numeric_value: no values for codes {empty[:10]}")
    rows = np.array(rows, np.int64)
    out = {f: np.zeros(len(codes)) for f in _FLOAT_FIELDS}
    out["count"], out["mean"], out["std"] = (moments.n[rows], moments.means()[rows],
                                             moments.stds()[rows])
    with np.errstate(over="ignore", invalid="ignore"):
        for i, (sample, who) in enumerate(zip(reservoirs.samples, reservoirs.subjects)):
            out["clip_low"][i], out["clip_high"][i] = subject_safe_bounds(
                sample, who, clip_quantiles, min_subjects)
            out["norm_mean"][i], out["norm_std"][i] = scaled_mean_std(
                np.clip(sample, out["clip_low"][i], out["clip_high"][i]))
        out["variance"] = out["std"] ** 2
    out["cv"] = coefficient_of_variation(out["std"], out["mean"])
    out["within_subject_cv"] = moments.within_subject_cvs()[rows]
    _check_finite(codes, out)
    return DataStats(codes=codes, num_subjects=moments.subjects[rows],
                     drop_values=tuple(drop_values), **out)


def _check_finite(codes: tuple[str, ...], out: dict[str, np.ndarray]) -> None:
    """Raises MEDSFormatError naming the codes whose statistics or normalized values would not
    be finite (float64 moments, float32 normalized values): values so large (|value| beyond
    ~1e154, where the variance passes float64's 1.8e308) that they are placeholders, not
    results. The CVs may be inf: the CV of values whose mean is exactly 0."""
    with np.errstate(over="ignore", invalid="ignore"):
        span = out["clip_high"] - out["clip_low"]
        reach = np.maximum(np.abs(out["clip_high"] - out["norm_mean"]),
                           np.abs(out["clip_low"] - out["norm_mean"]))
        z_max = reach / np.maximum(out["norm_std"], STD_EPS)
    cvs = ("cv", "within_subject_cv")
    fields = [out[f] for f in _FLOAT_FIELDS if f not in cvs]
    ok = np.isfinite(span) & (z_max < np.finfo(np.float32).max)
    ok &= np.logical_and.reduce([~np.isnan(out[f]) for f in cvs])
    ok &= np.logical_and.reduce([np.isfinite(f) for f in fields])
    bad = [c for c, good in zip(codes, ok) if not good]
    if bad:
        raise MEDSFormatError(
            f"train split, column numeric_value: {len(bad)} code(s) have values too large for "
            f"float64 statistics ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; "
            "their variance or value range passes 1.8e308): such values are placeholders, not "
            "results; drop them with config.data.drop_values or leave the codes out with "
            "config.data.lab_codes")

