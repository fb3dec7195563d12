"""Statistical disclosure control: no per-code aggregate the tool writes rests on fewer than k
subjects (``config.data.min_subjects``, default 10), so none gives away one patient's value.

- Selection: a code with values from fewer than k train subjects is not selected (listed in
  ``config.data.lab_codes``: refused), so its count, moments and CV are never written.
- Clipping bounds (``data_stats.json``, copied into every checkpoint): each bound is moved
  inward from its quantile until at least min(k, half the code's subjects) subjects have a
  train value at or beyond it, so a bound is never the one extreme value of a patient.
- Evaluation: a per-code row whose values on the evaluated split come from fewer than k
  subjects, or with fewer than k hidden values, is suppressed (``suppress_rows``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from cvmae_jax.data.meds import MEDSFormatError, config_get


def selectable_counts(counts: Mapping[str, int], subjects: Mapping[str, int], data_config,
                      report: dict) -> dict[str, int]:
    """``counts`` ({code: numeric train rows}) without the codes whose values come from fewer
    than k train ``subjects``; sets ``report["below_min_subjects"]`` to how many codes matching
    the lab pattern were left out. A code of ``lab_codes`` below k raises MEDSFormatError."""
    k = int(config_get(data_config, "min_subjects"))
    few = {c for c, n in subjects.items() if n < k}
    explicit = [c for c in config_get(data_config, "lab_codes") or () if c in few]
    if explicit:
        raise MEDSFormatError(
            f"data/ (train split), column code: {len(explicit)} requested lab_codes have values "
            f"from fewer than config.data.min_subjects={k} train subjects ({explicit[:10]}): "
            "their statistics could reveal one patient's values; leave them out (or lower "
            "min_subjects)")
    pattern = config_get(data_config, "lab_code_pattern")
    min_count = int(config_get(data_config, "min_code_count"))
    regex = re.compile(pattern)
    report["below_min_subjects"] = sum(1 for c in few if regex.search(c))
    kept = {c: n for c, n in counts.items() if c not in few}
    frequent = [c for c, n in counts.items() if n >= min_count and regex.search(c)]
    if frequent and not config_get(data_config, "lab_codes") and all(c in few for c in frequent):
        raise MEDSFormatError(
            f"data/ (train split), column code: each of the {len(frequent)} codes matching "
            f"{pattern!r} with >= {min_count} rows has values from fewer than "
            f"config.data.min_subjects={k} train subjects: their statistics could reveal one "
            "patient's values (lower min_subjects only for data you may publish per patient)")
    return kept


def subject_safe_bounds(values: np.ndarray, subjects: np.ndarray, quantiles, k: int
                        ) -> tuple[float, float]:
    """The ``quantiles`` (low, high) of ``values`` [n] (numpy's linear method), each moved
    inward until at least min(k, half the distinct ``subjects`` [n]) subjects have a value at
    or beyond it (at least one subject)."""
    low, high = np.quantile(values, quantiles)
    return (float(max(low, _value_reaching_subjects(values, subjects, k))),
            float(min(high, -_value_reaching_subjects(-values, subjects, k))))


def _value_reaching_subjects(values: np.ndarray, subjects: np.ndarray, k: int) -> float:
    """The smallest value v such that m subjects have a value <= v, m = max(1, min(k, half
    the distinct subjects)). Sorts only the smallest values, enough of them to hold 2k
    distinct subjects (then m is k); all of them when there are fewer."""
    n, take = len(values), max(64, 8 * k)
    while True:
        if take >= n:
            smallest = np.arange(n)
        else:  # every value up to the take-th smallest, ties included: a prefix of the order
            smallest = np.flatnonzero(values <= np.partition(values, take - 1)[take - 1])
        ordered = smallest[np.argsort(values[smallest], kind="stable")]
        first = np.sort(np.unique(subjects[ordered], return_index=True)[1])
        if len(first) >= 2 * k or len(smallest) == n:
            break
        take *= 4
    m = max(1, min(k, len(first) // 2))  # k whenever the prefix holds 2k subjects
    return values[ordered[first[m - 1]]]


SHOWN_WHEN_SUPPRESSED = ("code", "name", "cv", "train_mask_prob")  # none measured on the split


def suppress_rows(rows: list[dict], code_subjects: np.ndarray, k: int,
                  groups: tuple[np.ndarray, ...] = ()) -> tuple[int, list[int]]:
    """Suppresses, in place, the per-code evaluation rows ([V], one per code, with
    ``num_masked``) with values from fewer than k subjects (``code_subjects`` [V]: the evaluated
    split's subjects with a value of the code) or fewer than k hidden values: each keeps only
    SHOWN_WHEN_SUPPRESSED and gets ``suppressed: True``.

    ``groups`` (bool [V] each) are the codes of pooled rows published beside them (the CV
    tiers). A pooled row minus its shown rows gives the sum of its suppressed ones, so where
    that sum could rest on fewer than k subjects (fewer than k hidden values, or no suppressed
    code of k subjects) one more row of the group is suppressed (secondary suppression): the
    shown one with the fewest hidden values. Returns how many rows were suppressed and the
    groups all of whose rows are suppressed and that still rest on fewer than k subjects (their
    pooled row must go too)."""
    masked = np.array([row.get("num_masked") or 0 for row in rows])
    hide = (masked > 0) & ((np.asarray(code_subjects) < k) | (masked < k))

    def safe(members: np.ndarray) -> bool:
        return masked[members].sum() >= k and code_subjects[members].max(initial=0) >= k

    unsafe = []
    for g, group in enumerate(groups):
        hidden, shown = np.flatnonzero(group & hide), np.flatnonzero(group & ~hide & (masked > 0))
        if len(hidden) and not safe(hidden):
            if len(shown):
                hide[shown[np.argmin(masked[shown])]] = True  # >= k subjects and values
            else:
                unsafe.append(g)
    for i in np.flatnonzero(hide):
        kept = {key: rows[i][key] for key in SHOWN_WHEN_SUPPRESSED if key in rows[i]}
        rows[i].clear()  # every measured field goes, including any added later
        rows[i].update(kept, suppressed=True)
    return int(hide.sum()), unsafe
