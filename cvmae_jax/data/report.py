"""The preparation report: selected codes, oddities, warnings, and its readable summary.

Counts and aggregates only: never subject ids or raw rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from cvmae_jax.data import code_names, meds
from cvmae_jax.data.stats import STD_EPS, DataStats, Reservoirs, json_float

# Selected codes whose train mean and std look like z-scores (already normalized upstream).
NORMALIZED_MEAN, NORMALIZED_STD = 0.05, (0.9, 1.1)
# A CV above this (|mean| below a tenth of the std) comes from a mean near 0 or extreme values
# rather than from volatility; the report warns about such codes.
EXTREME_CV = 10.0
# A train CV at least this many times the CV of the clipped values is set by the few values
# outside the clipping quantiles (another unit, an entry error) rather than by volatility
# (set-a: pH 118x from values up to 735; every other code at most 1.9x).
CV_OUTSIDE_CLIPPING = 3.0
# A selected code is "mirrored" when at least this share of its train values equal a value of
# another selected code at the same (subject, time).
MIRRORED_SHARE = 0.9
# A train value is "far" beyond this many interquartile ranges (IQR) outside the quartiles; a
# code is "squeezed" when its clipping keeps far values and its IQR spans less than
# SQUEEZED_IQR normalized units (a normal distribution's spans 1.35).
FAR_IQR, SQUEEZED_IQR = 10.0, 0.1
# A selected code whose clipping bounds, moved inward by the min_subjects rule, leave more than
# this share of its train values beyond them is warned about.
CLIPPED_SHARE = 0.05


def code_rows(stats: DataStats, descriptions, clipped: np.ndarray) -> list[dict]:
    """Per selected code: code, name (``code_names.lab_name`` of its description [V]), unit
    (last `//` part), count, subjects, mean, std, cv, within_subject_cv, clipped_share
    (``clipped`` [V]: ``clipped_shares``)."""
    names = code_names.lab_names(stats.codes, descriptions)
    return [dict(code=c, name=names[i], unit=meds.code_unit(c), count=int(stats.count[i]),
                 subjects=int(stats.num_subjects[i]), mean=json_float(stats.mean[i]),
                 std=json_float(stats.std[i]), cv=json_float(stats.cv[i]),
                 within_subject_cv=json_float(stats.within_subject_cv[i]),
                 clipped_share=float(clipped[i]))
            for i, c in enumerate(stats.codes)]


def clipped_shares(stats: DataStats, reservoirs: Reservoirs, clip_quantiles
                   ) -> tuple[np.ndarray, np.ndarray]:
    """float64 [V] each: every code's share of train values beyond its clipping bounds, and
    beyond its ``clip_quantiles`` alone (the bounds before the min_subjects rule moved them),
    from the reservoir samples (exact for codes with fewer values than a sample holds)."""
    clipped, by_quantiles = np.zeros(stats.vocab_size), np.zeros(stats.vocab_size)
    for i, x in enumerate(reservoirs.samples):
        low, high = np.quantile(x, clip_quantiles)
        clipped[i] = np.mean((x < stats.clip_low[i]) | (x > stats.clip_high[i]))
        by_quantiles[i] = np.mean((x < low) | (x > high))
    return clipped, by_quantiles


def clipped_warning(stats: DataStats, clipped: np.ndarray, by_quantiles: np.ndarray,
                    min_subjects: int) -> list[str]:
    """A warning naming the codes whose bounds the min_subjects rule moved so far that they
    clip more than CLIPPED_SHARE of the train values (none when there are none)."""
    heavy = np.flatnonzero((clipped > CLIPPED_SHARE) & (clipped > by_quantiles))
    if not len(heavy):
        return []
    heavy = heavy[np.argsort(-clipped[heavy], kind="stable")]
    shown = "; ".join(f"{stats.codes[i]} {clipped[i]:.1%} (the quantiles alone: "
                      f"{by_quantiles[i]:.1%}) to [{stats.clip_low[i]:.4g}, "
                      f"{stats.clip_high[i]:.4g}], {int(stats.num_subjects[i]):,} subjects"
                      for i in heavy[:4])
    return [f"{len(heavy)} of {stats.vocab_size} selected codes have more than "
            f"{CLIPPED_SHARE:.0%} of their train values clipped ({shown}"
            f"{'; ...' if len(heavy) > 4 else ''}; every code's share in prepare_report.md): "
            "each clipping bound moves inward from its quantile until config.data.min_subjects="
            f"{min_subjects} subjects have a value at or beyond it (half the code's subjects "
            "when it has fewer than twice that), so on few subjects the model sees a narrow "
            "range of such a lab. Lower min_subjects where your data's disclosure rules allow "
            "(docs/data_problems.md, Aggregates that could reveal one patient), or leave the "
            "codes out with config.data.lab_codes."]


def warnings_for(stats: DataStats) -> list[str]:
    """Warnings about the selected codes' train statistics."""
    warnings = []
    zscore = (np.abs(stats.mean) < NORMALIZED_MEAN) & (stats.std >= NORMALIZED_STD[0]) & (
        stats.std <= NORMALIZED_STD[1])
    normalized = zscore.sum() * 2 > stats.vocab_size
    if normalized:
        warnings.append(
            f"{int(zscore.sum())} of {stats.vocab_size} selected codes have train |mean| < "
            f"{NORMALIZED_MEAN} and std in [{NORMALIZED_STD[0]}, {NORMALIZED_STD[1]}]: the "
            "values look already normalized (e.g. by MEDS_transforms). CV = std/|mean| is "
            "meaningless on normalized values; prepare from the unnormalized MEDS data.")
    extreme = [f"{code} ({cv:.3g})" for code, cv in zip(stats.codes, stats.cv) if cv > EXTREME_CV]
    if extreme and not normalized:  # normalized values: said above, every mean is near 0
        warnings.append(
            f"{len(extreme)} of {stats.vocab_size} selected codes have a train CV above "
            f"{EXTREME_CV:g} ({', '.join(extreme[:5])}{', ...' if len(extreme) > 5 else ''}): "
            "their |mean| is below a tenth of their std, from a mean near 0 (signed or flag-like "
            "values) or a few extreme raw values (CV is computed before clipping, as in the "
            "paper), so their high masking tier says little about volatility; check their "
            "values or leave them out with config.data.lab_codes.")
    warnings += outlier_cv_warning(stats)
    constant = [code for code, std in zip(stats.codes, stats.std) if std == 0]
    if constant:
        warnings.append(
            f"{len(constant)} of {stats.vocab_size} selected codes have one value on train "
            f"({', '.join(constant[:5])}{', ...' if len(constant) > 5 else ''}): their CV is 0 "
            "(always the low masking tier) and their normalized values are all 0, so they "
            "teach nothing about volatility; list the codes to keep with "
            "config.data.lab_codes to leave them out.")
    return warnings


def outlier_cv_warning(stats: DataStats) -> list[str]:
    """A warning naming the codes whose raw train CV is at least CV_OUTSIDE_CLIPPING times the
    CV of their clipped values (norm_std / |norm_mean|): their CV tier rests on the values
    outside the clipping quantiles. Codes above EXTREME_CV are warned about already."""
    with np.errstate(divide="ignore", invalid="ignore"):
        clipped_cv = stats.norm_std / np.abs(stats.norm_mean)
        ratio = stats.cv / clipped_cv
    found = np.flatnonzero((stats.std > 0) & (stats.cv <= EXTREME_CV) & np.isfinite(ratio)
                           & (ratio >= CV_OUTSIDE_CLIPPING))
    if not len(found):
        return []
    found = found[np.argsort(-ratio[found], kind="stable")]
    shown = "; ".join(f"{stats.codes[i]}: {stats.cv[i]:.3g} over every value, "
                      f"{clipped_cv[i]:.2g} within [{stats.clip_low[i]:.4g}, "
                      f"{stats.clip_high[i]:.4g}]" for i in found[:4])
    return [f"{len(found)} of {stats.vocab_size} selected codes have a train CV at least "
            f"{CV_OUTSIDE_CLIPPING:g}x the CV of their values within the clipping quantiles "
            f"({shown}{'; ...' if len(found) > 4 else ''}): a few values outside the quantiles "
            "(another unit, entry errors) set their CV, so their masking tier under cv, cv_rank "
            "and variance says little about volatility (the paper's rule: CV of the raw "
            "values). Check their units, or leave the codes out with config.data.lab_codes."]


def squeezed_codes(stats: DataStats, reservoirs: Reservoirs, min_subjects: int) -> list[dict]:
    """Codes whose clipping bounds keep train values more than FAR_IQR IQRs outside their
    quartiles, so that the middle half of their values spans under SQUEEZED_IQR normalized
    units: [{code, far_share, iqr_normalized, value, value_share}], from the reservoir samples.
    value is the far value most repeated when it makes at least half the far values and
    min_subjects subjects have it (a placeholder such as 99999), else None."""
    rows = []
    for i, (x, who) in enumerate(zip(reservoirs.samples, reservoirs.subjects)):
        q25, q75 = np.quantile(x, [0.25, 0.75])
        iqr = q75 - q25
        low, high = q25 - FAR_IQR * iqr, q75 + FAR_IQR * iqr
        squeezed = iqr / max(stats.norm_std[i], STD_EPS) < SQUEEZED_IQR
        kept = stats.clip_low[i] < low or stats.clip_high[i] > high
        if iqr <= 0 or not squeezed or not kept:
            continue
        far = (x < low) | (x > high)
        values, counts = np.unique(x[far], return_counts=True)
        top = int(np.argmax(counts))
        placeholder = counts[top] * 2 >= far.sum() and len(
            np.unique(who[far][x[far] == values[top]])) >= min_subjects
        rows.append(dict(code=stats.codes[i], far_share=float(far.mean()),
                         iqr_normalized=float(iqr / max(stats.norm_std[i], STD_EPS)),
                         value=float(values[top]) if placeholder else None,
                         value_share=float(counts[top] / len(x)) if placeholder else None))
    return rows


def squeezed_warning(rows: list[dict], vocab_size: int) -> list[str]:
    """The report's warning about ``squeezed_codes`` rows (none when there are none)."""
    if not rows:
        return []

    def describe(r):
        value = "" if r["value"] is None else f", {r['value']:g} in {r['value_share']:.2%}"
        return (f"{r['code']} ({r['far_share']:.2%} far{value}; middle half spans "
                f"{r['iqr_normalized']:.2g})")

    values = sorted({r["value"] for r in rows if r["value"] is not None})
    example = ", ".join(f"{v:g}" for v in values[:3]) if values else "99999.0"
    return [f"{len(rows)} of {vocab_size} selected codes have train values more than "
            f"{FAR_IQR:g} IQRs outside their quartiles that the clipping quantiles keep, so "
            f"the middle half of their values spans under {SQUEEZED_IQR:g} of a normalized "
            f"unit ({'; '.join(describe(r) for r in rows[:4])}{'; ...' if len(rows) > 4 else ''};"
            " all in prepare_report.json 'squeezed_codes'): placeholders such as 99999 or 1e30 "
            "squeeze every real value into a sliver of the normalized range. Leave such values "
            f"out with --config.data.drop_values='({example},)', or narrow "
            "config.data.clip_quantiles when they are real."]


def mirrored_codes(pairs: Mapping[tuple[str, str], int], stats: DataStats) -> list[dict]:
    """Selected codes with >= MIRRORED_SHARE of their train values equal to a value of another
    selected code at the same (subject, time) (``meds.mirrored_values`` over train), each
    with the code it mirrors most, most mirrored first: [{code, mirrors, values, share}]."""
    count = dict(zip(stats.codes, stats.count.tolist()))
    best: dict[str, tuple[int, str]] = {}
    for (code, other), n in pairs.items():
        if code in count and other in count and n > best.get(code, (0, ""))[0]:
            best[code] = (n, other)
    rows = [dict(code=code, mirrors=other, values=n, share=n / count[code])
            for code, (n, other) in best.items()
            if count[code] and n / count[code] >= MIRRORED_SHARE]
    return sorted(rows, key=lambda r: (-r["share"], r["code"]))


def mirrored_warning(rows: list[dict], vocab_size: int) -> list[str]:
    """The report's warning about ``mirrored_codes`` rows (none when there are none)."""
    if not rows:
        return []
    shown = "; ".join(f"{r['code']} = {r['mirrors']} ({r['share']:.0%})" for r in rows[:4])
    return [f"{len(rows)} of {vocab_size} selected codes have >= {MIRRORED_SHARE:.0%} of their "
            f"train values equal to another selected code's value at the same time ({shown}"
            f"{'; ...' if len(rows) > 4 else ''}; all in prepare_report.json "
            "'mirrored_codes'): when one of such a pair is masked the model can read its value "
            "off the other, so their reconstruction is easy and a masking strategy's effect on "
            "them says little. On MIMIC-IV `^LAB//` takes ICU chart items, some of which copy "
            "hospital lab results or each other; --config.data.lab_code_pattern="
            "'^LAB//(RESULT//)?\\d{5}//' keeps the hospital lab table only."]


def selection_summary(report: dict) -> str:
    """Which codes a prepared dataset models, from its report: "pattern '^LAB//', 24 codes
    (LAB 24)" or "explicit list, 3 codes (LAB 2, VITAL 1)"."""
    sel = report["selection"]
    how = (f"pattern '{report['settings']['lab_code_pattern']}'"
           if sel.get("selection") == "pattern" else "explicit list (config.data.lab_codes)")
    prefixes = ", ".join(f"{p} {n}" for p, n in sel.get("by_prefix", {}).items())
    return f"{how}, {sel.get('selected')} codes" + (f" ({prefixes})" if prefixes else "")


def selection_counts(report: dict) -> str:
    """How the selection came about, from its report: "873 codes match: 483 with values from
    fewer than 10 train subjects, 7 with fewer than 20 train values (min_code_count), 383
    eligible", or for an explicit list "each listed code has values from >= 10 train
    subjects"."""
    sel, settings = report["selection"], report["settings"]
    k = settings.get("min_subjects", 1)
    if sel.get("selection") != "pattern":
        return f"each listed code has values from >= {k} train subjects"
    few, enough = sel.get("below_min_subjects", 0), sel.get("matching", 0)
    rare = sel.get("below_min_count", 0)
    return (f"{few + enough} codes match: {few} with values from fewer than {k} train "
            f"subjects, {rare} with fewer than {settings.get('min_code_count')} train values "
            f"(min_code_count), {enough - rare} eligible")


def out_of_vocab(code_counts: dict[str, int], train_counts: dict[str, int], selected,
                 pattern: str) -> dict:
    """Lab-like codes (matching `pattern`) of a non-train split that are not selected:
    how many codes and events, and how many of them never appear in train."""
    regex, chosen = re.compile(pattern), set(selected)
    oov = {c: n for c, n in code_counts.items() if regex.search(c) and c not in chosen}
    unseen = {c: n for c, n in oov.items() if c not in train_counts}
    return dict(codes=len(oov), events=sum(oov.values()), unseen_in_train_codes=len(unseen),
                unseen_in_train_events=sum(unseen.values()))


def markdown(report: dict) -> str:
    """The readable summary written as prepare_report.md."""
    lines = ["# Preparation report", ""]
    lines += [f"- MEDS shards: {report['shards']}; rows of subjects without a split (left out): "
              f"{report['rows_without_split']:,}",
              f"- Code selection: {selection_summary(report)} ({selection_counts(report)})",
              f"- Clipping quantiles from a sample of <= {report['reservoir_size']:,} train values "
              "per code (exact for codes with fewer values), each bound moved inward until "
              f"{report['settings'].get('min_subjects', 1)} subjects (at most half the code's) "
              "have a value at or beyond it", ""]
    for w in report["warnings"]:
        lines.append(f"**Warning:** {w}\n")
    keys = ("subjects", "subjects_with_rows", "rows", "events", "numeric_events", "lab_events",
            "null_time", "null_value", "nonfinite_value", "dropped_value", "duplicate_rows",
            "after_death_rows",
            "unsorted_subjects", "examples", "tokens", "short_windows_dropped",
            "events_not_in_window")
    lines += ["| | " + " | ".join(meds.SPLITS) + " |", "|---" * (len(meds.SPLITS) + 1) + "|"]
    flat = {s: _flatten(report["splits"][s]) for s in meds.SPLITS}
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{flat[s].get(k, 0):,}" for s in meds.SPLITS)
                     + " |")
    lines += ["", "rows: every row of the split's subjects; events: those with a time; "
              "numeric_events: those with a finite numeric value too. "
              "Left out: rows without a time (null_time), without a numeric value "
              "(null_value), with NaN/inf (nonfinite_value) or with a value listed in "
              "config.data.drop_values (dropped_value). Kept and counted: exact duplicate "
              "lab rows, lab rows after the subject's MEDS_DEATH, and subjects whose rows were "
              "not time-sorted in the file (sorted here). Selected events in no window "
              "(events_not_in_window): those before a subject's last max_len with "
              "config.data.window='last', and those of windows shorter than "
              "config.data.min_window_len (short_windows_dropped counts the windows).", ""]
    for s in meds.SPLITS[1:]:
        o = report["splits"][s]["out_of_vocab"]
        lines.append(f"- {s}: {o['codes']} lab-like codes not selected ({o['events']:,} "
                     f"events), {o['unseen_in_train_codes']} never seen in train")
    lines += ["", "| lab | code | unit | count | subjects | mean | std | CV | within-subject CV "
              "| clipped |", "|---" * 10 + "|"]
    for r in report["codes"]:
        lines.append(f"| {code_names.markdown_cell(r['name'])} | `{r['code']}` | {r['unit']} | "
                     f"{r['count']:,} | {r['subjects']:,} | "
                     + " | ".join(_fmt(r[k]) for k in ("mean", "std", "cv", "within_subject_cv"))
                     + f" | {r['clipped_share']:.1%} |")
    if report.get("mirrored_codes"):
        lines += ["", f"Codes with >= {MIRRORED_SHARE:.0%} of their train values equal to "
                  "another code's value at the same (subject, time):", "",
                  "| lab | code | equals | values | share |", "|---" * 5 + "|"]
        names = {r["code"]: code_names.markdown_cell(r["name"]) for r in report["codes"]}
        lines += [f"| {names[r['code']]} | `{r['code']}` | {names[r['mirrors']]} "
                  f"(`{r['mirrors']}`) | {r['values']:,} | {r['share']:.1%} |"
                  for r in report["mirrored_codes"]]
    return "\n".join(lines + files_lines(report)) + "\n"


def files_lines(report: dict) -> list[str]:
    """The report's table of the files read under data/ (rows, time zone) and the symbolic
    links not read again."""
    lines = ["", "Files read (symbolic links to folders and files followed, each real file "
             "once):", "", "| file | rows | time zone |", "|---|---:|---|"]
    lines += [f"| {f['file']} | {f['rows']:,} | {f['time_zone'] or 'none (local wall time)'} |"
              for f in report.get("files", [])]
    repeated = report.get("repeated_links", [])
    if repeated:
        lines += ["", f"Not read again ({len(repeated)} links to a folder or file already "
                  f"read): {', '.join(repeated)}"]
    return lines


def _flatten(split: dict) -> dict:
    out = {k: v for k, v in split.items() if not isinstance(v, dict)}
    for key in ("lab", "windows"):
        out.update({k: v for k, v in split.get(key, {}).items() if k not in out})
    return out


def _fmt(x) -> str:
    return x if isinstance(x, str) else f"{x:.4g}"
