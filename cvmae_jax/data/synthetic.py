"""Synthetic MEDS 0.4 dataset with MIMIC-IV-like labs: the project's embedded default data.

Every subject carries latent physiology (``synthetic_labs.LATENTS``): a chronic baseline, an acute
episode per hospital admission (decaying in survivors, worsening until death otherwise) and an
Ornstein-Uhlenbeck process in continuous time. Labs read these states through loadings, the
subject's own set point and white noise: volatile labs (lactate, CRP, troponin) load on fast states
and noise, stable ones (sodium, MCV) on set points and slow states. Length of stay, ICU stays,
orders, death and readmission follow the same states, so labels can be predicted from the labs.

    python -m cvmae_jax.data.synthetic --out_dir=/tmp/meds --num_subjects=1000 --seed=0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvmae_jax.data import synthetic_labs as cat
from cvmae_jax.data.meds import SPLITS
from cvmae_jax.data.synthetic_labs import LAB_CATALOG, VITAL_CATALOG

__all__ = ["LAB_CATALOG", "SPLITS", "TASKS", "generate_synthetic_meds"]

TASKS = ("in_hospital_mortality_24h", "readmission_30d")
SHARD_ROWS = 500_000  # a split's shards: its subjects by the block of this many rows they start in
MAX_ADMISSIONS = 10
VITALS_EVERY_H = 2.0  # ICU charting interval of the vital signs
DAY, YEAR = 24.0, 365.25 * 24.0  # in hours, the generator's time unit
_US_PER_MIN, _US_PER_H = 60_000_000, 3_600_000_000
_EPOCH = np.datetime64("2110-01-01", "us").astype(np.int64)  # shifted dates, as in MIMIC-IV
_NO_TIME = np.iinfo(np.int64).min
_ICU_UNITS = sorted({u for x in cat.INSULTS for u in x.icu_units})
_ADMISSIONS = [c for c, _ in cat.EMERGENT_ADMISSIONS + cat.ELECTIVE_ADMISSIONS]  # "type//from"
_DISCHARGE_LOCATIONS = [d[0] for d in cat.DISCHARGES] + ["DIED"]
GENERATOR_VERSION = "1.1.0"  # bump when the generated data change
DATA_SCHEMA = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")),
                         ("code", pa.string()), ("numeric_value", pa.float32())])
LABEL_SCHEMA = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                          ("boolean_value", pa.bool_()), ("integer_value", pa.int64()),
                          ("float_value", pa.float32()), ("categorical_value", pa.string())])
_LAT = {name: k for k, name in enumerate(cat.LATENTS)}
_PANEL = {name: k for k, name in enumerate(cat.PANELS)}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _categorical(rng, probs, n):
    """n category indices; probs is one row [C] or one row per draw [n, C] (need not sum to 1)."""
    cum = np.cumsum(np.broadcast_to(probs, (n, np.shape(probs)[-1])), axis=-1)
    return (rng.random(n)[:, None] * cum[:, -1:] >= cum).sum(-1)


def _expand(counts):
    """For counts [n]: (owner, k) with owner repeated counts[i] times and k = 0..counts[i]-1."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


def _weights(pairs, names):
    """Dense weight vector over `names` from (name, weight) pairs."""
    w = np.zeros(len(names))
    for name, value in pairs:
        w[names.index(name)] = value
    return w


def _us(sub, subj, hours):
    """Event times in microseconds (rounded to the minute) from hours after the record start."""
    return sub.anchor[subj] + np.rint(hours * 60).astype(np.int64) * _US_PER_MIN


def _subjects(rng, n):
    """Demographics, frailty, chronic conditions and chronic latent baselines of n subjects."""
    age = np.clip(rng.normal(60, 17, n), 18, 91).astype(np.int64)
    frail = rng.standard_normal(n) + 0.03 * (age - 60)
    flags = {name: rng.random(n) < _sigmoid(b + w * frail) for name, b, w in (
        ("ckd", -1.8, .8), ("diabetes", -1.1, .4), ("cirrhosis", -3.2, .4), ("copd", -2.2, .5),
        ("hypertension", -.1, .6))}
    dyn = cat.LATENT_DYNAMICS
    rho = np.array([d.frailty_rho for d in dyn])
    chronic = np.array([d.chronic_sd for d in dyn]) * (
        rho * frail[:, None] + np.sqrt(1 - rho**2) * rng.standard_normal((n, len(dyn))))
    chronic[:, _LAT["renal"]] += flags["ckd"] * rng.uniform(1.0, 2.8, n)
    chronic[:, _LAT["hep"]] += flags["cirrhosis"] * rng.uniform(1.5, 2.5, n)
    chronic[:, _LAT["resp"]] += flags["copd"] * 1.0
    chronic[:, _LAT["glyc"]] += flags["diabetes"] * 1.2
    flags["anemia"] = chronic[:, _LAT["heme"]] > 0.6
    flags["cad"] = chronic[:, _LAT["card"]] > 0.4
    anchor = _EPOCH + rng.integers(0, 70 * 365, n) * 24 * _US_PER_H  # midnight when records start
    year = anchor.astype("datetime64[us]").astype("datetime64[Y]").astype(np.int64) + 1970
    birth = (year - age - 1970).astype("datetime64[Y]").astype("datetime64[us]").astype(np.int64)
    first = rng.uniform(0, YEAR, n)  # first admission, hours after the record starts
    return SimpleNamespace(
        n=n, ids=10_000_000 + np.cumsum(rng.integers(1, 2000, n)), male=rng.random(n) < 0.5,
        age=age, frail=frail, flags=flags, chronic=chronic, anchor=anchor, birth=birth,
        first=first, horizon=first + rng.exponential(2 * YEAR, n))


def _admissions(rng, sub):
    """Hospital admissions sorted by (subject, start), with ICU stays, deaths and code choices."""
    insults = cat.INSULTS
    profile = np.array([_weights(x.acute, cat.LATENTS) for x in insults])
    elective_i = [x.name for x in insults].index("elective")
    t, active, rows = sub.first.copy(), np.ones(sub.n, bool), []
    for _ in range(MAX_ADMISSIONS):
        s = np.flatnonzero(active)
        if not s.size:
            break
        n, f, start = s.size, sub.frail[s], t[s]
        insult = _categorical(rng, [x.prob for x in insults], n)
        elective = insult == elective_i
        # Severity m scales the insult's acute profile; it drives stay, ICU, death, lab orders.
        m = np.minimum(np.exp(rng.normal(np.log(.8) + .2 * f, .4)), 3) * np.where(elective, .5, 1)
        los = np.clip(DAY * np.exp(np.log(2.5) + .5 * (m - .8) + .6 * rng.standard_normal(n)),
                      4.0, 45 * DAY)
        age = sub.age[s] + start / YEAR
        died = rng.random(n) < _sigmoid(-2.8 + 2.5 * (m - .8) + .4 * f + .03 * (age - 65))
        krec = rng.uniform(1.0, 3.0, n)  # recovery speed: acute state left at discharge exp(-krec)
        chronic = sub.chronic[s]  # readmission: frailty, acute state left, kidneys, anemia
        readmit = ~died & (rng.random(n) < _sigmoid(
            -2.6 + .4 * f + 6 * m * np.exp(-krec) + .4 * chronic[:, _LAT["renal"]]
            + .3 * chronic[:, _LAT["heme"]]))
        icu = (los > 12) & (rng.random(n) < _sigmoid(-1 + 2.2 * (m - 1)))
        icu_s = start + rng.uniform(0, np.minimum(12, .3 * los))
        icu_e = np.where(died, start + los,
                         np.minimum(icu_s + los * rng.uniform(.3, .8, n), start + los - 1))
        rows.append(dict(subj=s, start=start, los=los, insult=insult, m=m, died=died, krec=krec,
                         icu=icu, icu_s=icu_s, icu_e=icu_e, elective=elective))
        gap = np.where(readmit, rng.uniform(DAY, 29.5 * DAY, n),  # else the next one is later
                       30 * DAY + rng.exponential(300 * DAY * np.exp(-.3 * f)))
        t[s] = start + los + gap
        active[s] = ~died & (readmit | (t[s] <= sub.horizon[s]))
    cols = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    order = np.lexsort((cols["start"], cols["subj"]))
    adm = SimpleNamespace(**{k: v[order] for k, v in cols.items()})
    n = len(adm.start)
    adm.end = adm.start + adm.los
    adm.acute = adm.m[:, None] * profile[adm.insult]
    adm.kind = np.where(adm.elective,
                        len(cat.EMERGENT_ADMISSIONS) + _categorical(
                            rng, [p for _, p in cat.ELECTIVE_ADMISSIONS], n),
                        _categorical(rng, [p for _, p in cat.EMERGENT_ADMISSIONS], n))
    w = _sigmoid(sub.frail[adm.subj])[:, None]
    fit, frail = (np.array([d[i] for d in cat.DISCHARGES]) for i in (1, 2))
    adm.discharge = np.where(adm.died, len(cat.DISCHARGES),
                             _categorical(rng, (1 - w) * fit + w * frail, n))
    adm.unit = np.array([x.icu_units for x in insults])[adm.insult, rng.integers(0, 2, n)]
    return adm


def _deaths(rng, sub, adm):
    """Sets sub.death (hours, NaN if alive; in-hospital deaths at discharge) and sub.end."""
    last = np.searchsorted(adm.subj, np.arange(sub.n), "right") - 1
    last_end = adm.end[last]
    outside = ~adm.died[last] & (rng.random(sub.n) < _sigmoid(-3.2 + .8 * sub.frail))
    sub.death = np.where(adm.died[last], last_end, np.where(
        outside, last_end + 2 * DAY + rng.exponential(200 * DAY, sub.n), np.nan))
    sub.end = np.where(np.isnan(sub.death), np.maximum(sub.horizon, last_end + 30 * DAY), sub.death)


def _lab_draws(rng, sub, adm):
    """Blood draws: subject, time, admission (-1 outpatient) and which panels are drawn."""
    same_next = np.r_[adm.subj[1:] == adm.subj[:-1], False]
    first = np.searchsorted(adm.subj, np.arange(sub.n))
    # Outpatient visits (daytime) in the gaps before, between and after admissions.
    w_subj = np.r_[np.arange(sub.n), adm.subj]
    w_s = np.r_[np.zeros(sub.n), adm.end]
    w_e = np.r_[adm.start[first], np.where(same_next, np.r_[adm.start[1:], 0], sub.end[adm.subj])]
    rate = np.exp(.3 * sub.frail[w_subj]) / (75 * DAY)
    o, _ = _expand(rng.poisson(np.maximum(w_e - w_s - 2 * DAY, 0) * rate))
    u = rng.uniform(w_s[o] + DAY, w_e[o] - DAY)
    t_out = np.floor(u / DAY) * DAY + rng.uniform(8, 17, o.size)
    # Inpatient: one draw at admission, morning draws (04:00-07:00), extra ICU draws (sicker: more).
    t_adm = adm.start + rng.uniform(.3, 1.5, len(adm.start))
    day0 = np.floor(adm.start / DAY) + 1
    o_m, k_m = _expand(np.maximum(np.floor((adm.end - 7.5) / DAY) - day0 + 1, 0).astype(int))
    t_morn = (day0[o_m] + k_m) * DAY + rng.uniform(4, 7, o_m.size)
    step = np.clip(10 / (1 + adm.m), 2, 12)
    o_i, k_i = _expand(np.where(adm.icu, (adm.icu_e - adm.icu_s - 1) // step, 0).astype(int))
    t_icu = adm.icu_s[o_i] + step[o_i] * (k_i + .25 + .5 * rng.random(o_i.size))
    n_adm = len(adm.start)
    kind = np.repeat([0, 1, 2, 3], [o.size, n_adm, o_m.size, o_i.size])
    a = np.r_[np.full(o.size, -1), np.arange(n_adm), o_m, o_i]
    subj = np.r_[w_subj[o], adm.subj, adm.subj[o_m], adm.subj[o_i]]
    t = np.r_[t_out, t_adm, t_morn, t_icu]
    p = np.array(cat.ORDER_PROBS)[kind]
    inp = a >= 0
    ai = a[inp]
    in_icu = adm.icu[ai] & (t[inp] >= adm.icu_s[ai]) & (t[inp] < adm.icu_e[ai])
    boosts = np.array([_weights(x.boosts, cat.PANELS) for x in cat.INSULTS])
    p[inp] += (boosts[adm.insult[ai]] + np.outer(adm.m[ai] - .8, cat.VOLATILE)
               + np.outer(in_icu, cat.ICU_BOOST))
    panels = rng.random(p.shape) < p
    panels[:, _PANEL["LACT"]] |= panels[:, _PANEL["ABG"]] & (rng.random(len(t)) < .9)
    keep = panels.any(1)
    return subj[keep], t[keep], panels[keep]


def _vital_draws(rng, adm):
    """ICU charting times of the vital signs: subject, time."""
    o, k = _expand(np.where(adm.icu, (adm.icu_e - adm.icu_s) // VITALS_EVERY_H, 0).astype(int))
    t = adm.icu_s[o] + VITALS_EVERY_H * k + rng.uniform(0, VITALS_EVERY_H / 2, o.size)
    return adm.subj[o], t


def _latents(rng, sub, adm, subj, t):
    """Latent states [n, K] at times t (hours) of subjects subj: chronic + acute + OU."""
    order = np.lexsort((t, subj))
    s, ts = subj[order], t[order]
    z = sub.chronic[s]
    # Acute episode of the latest admission started at or before t.
    j = np.searchsorted(adm.subj * 1e7 + adm.start, s * 1e7 + ts, "right") - 1
    ok = (j >= 0) & (adm.subj[np.maximum(j, 0)] == s)
    j, el = j[ok], ts[ok] - adm.start[j[ok]]
    g = np.where(adm.died[j], 1 + .6 * el / adm.los[j], np.exp(-el * adm.krec[j] / adm.los[j]))
    z[ok] += adm.acute[j] * g[:, None]
    # Ornstein-Uhlenbeck parts, exact on irregular times: x_i = a_i x_{i-1} + sqrt(1-a_i^2) sd e_i.
    dyn = cat.LATENT_DYNAMICS
    head = np.searchsorted(s, s)  # index of the subject's first draw
    gap = np.where(head == np.arange(len(s)), np.inf, np.diff(ts, prepend=0.0))
    a = np.exp(-gap[:, None] / np.array([d.tau_h for d in dyn]))
    x = np.array([d.ou_sd for d in dyn]) * np.sqrt(1 - a**2) * rng.standard_normal(a.shape)
    rank = np.arange(len(s)) - head
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(rank.max(initial=0) + 2))
    for r in range(1, len(bounds) - 1):
        i = by_rank[bounds[r]:bounds[r + 1]]
        x[i] += a[i] * x[i - 1]
    out = np.empty_like(z)
    out[order] = z + x
    return out


def _finish(v, catalog):
    """Clip to each lab's range and round to its reported precision."""
    scale = 10.0 ** np.array([lab.decimals for lab in catalog])
    v = np.clip(v, [lab.lo for lab in catalog], [lab.hi for lab in catalog])
    return np.round(v * scale) / scale


def _values(rng, catalog, z, subj, set_points, male):
    """Values [n, len(catalog)] of every catalog entry at every draw (reported or not)."""
    lw = np.array([_weights(lab.loads, cat.LATENTS) for lab in catalog])
    kind, center, scale, w_subj, w_noise, w_male = (
        np.array([getattr(lab, f) for lab in catalog])
        for f in ("kind", "center", "scale", "subj", "noise", "male"))
    zz = (z @ lw.T + w_subj * set_points[subj] + w_male * male[subj][:, None]
          + w_noise * rng.standard_normal((len(subj), len(catalog))))
    v = _finish(np.where(kind == "lognormal", center * np.exp(scale * zz), center + scale * zz),
                catalog)
    if any(lab.kind == "derived" for lab in catalog):
        _derive(rng, v, {lab.itemid: j for j, lab in enumerate(catalog)})
        v = _finish(v, catalog)
    return v


def _derive(rng, v, c):
    """Labs the analyzer computes from others (in place, from the rounded inputs)."""
    na, k, cl, hco3 = (v[:, c[i]] for i in (50983, 50971, 50902, 50882))
    hgb, mchc, mcv, pt, pco2 = (v[:, c[i]] for i in (51222, 51249, 51250, 51274, 50818))
    v[:, c[50868]] = na + k - cl - hco3  # anion gap
    v[:, c[51221]] = hgb / mchc * 100  # hematocrit
    v[:, c[51248]] = mcv * mchc / 100  # MCH
    v[:, c[51279]] = hgb * 10 / v[:, c[51248]]  # red blood cells
    v[:, c[51237]] = (pt / 12.0) ** 1.1  # INR with ISI 1.1
    ph = 6.1 + np.log10(hco3 / (.0307 * pco2)) + .012 * rng.standard_normal(len(v))
    v[:, c[50820]] = ph  # Henderson-Hasselbalch
    v[:, c[50802]] = .93 * (hco3 - 24.4 + 14.8 * (ph - 7.4))  # base excess


def _vocabulary():
    """(code, description) of every code the generator can write, in within-timestamp order."""
    adm = [c.split("//") for c in _ADMISSIONS]
    return ([("GENDER//F", "Gender F (static, null time)"),
             ("GENDER//M", "Gender M (static, null time)"),
             ("MEDS_BIRTH", "Birth (MEDS_BIRTH); synthetic date, always 1 January")]
            + [(f"HOSPITAL_ADMISSION//{a}//{b}",
                f"Hospital admission; admission type {a}; admitted from {b}") for a, b in adm]
            + [(f"ICU_ADMISSION//{u}", f"ICU admission; first care unit {u}") for u in _ICU_UNITS]
            + [(lab.code, lab.description) for lab in LAB_CATALOG + VITAL_CATALOG]
            + [(f"DIAGNOSIS//ICD//10//{c}", f"{d} (ICD-10 diagnosis {c})")
               for c, d in cat.DIAGNOSES.items()]
            + [(f"ICU_DISCHARGE//{u}", f"ICU discharge; last care unit {u}") for u in _ICU_UNITS]
            + [(f"HOSPITAL_DISCHARGE//{d}", f"Hospital discharge; discharge location {d}")
               for d in _DISCHARGE_LOCATIONS]
            + [("MEDS_DEATH", "Death (MEDS_DEATH)")])


def _events(rng, sub, adm):
    """All events as arrays (subject index, time us, code index, value), sorted MEDS-style."""
    ix = {code: i for i, (code, _) in enumerate(_vocabulary())}

    def lookup(fmt, names):
        return np.array([ix[fmt.format(x)] for x in names])

    unit_i = np.searchsorted(_ICU_UNITS, adm.unit)
    everyone, icu = np.arange(sub.n), np.flatnonzero(adm.icu)
    dead = np.flatnonzero(~np.isnan(sub.death))
    a_s, i_s = adm.subj, adm.subj[icu]
    parts = [(everyone, np.full(sub.n, _NO_TIME),
              np.where(sub.male, ix["GENDER//M"], ix["GENDER//F"])),
             (everyone, sub.birth, np.full(sub.n, ix["MEDS_BIRTH"])),
             (a_s, _us(sub, a_s, adm.start),
              lookup("HOSPITAL_ADMISSION//{}", _ADMISSIONS)[adm.kind]),
             (a_s, _us(sub, a_s, adm.end),
              lookup("HOSPITAL_DISCHARGE//{}", _DISCHARGE_LOCATIONS)[adm.discharge]),
             (i_s, _us(sub, i_s, adm.icu_s[icu]),
              lookup("ICU_ADMISSION//{}", _ICU_UNITS)[unit_i[icu]]),
             (i_s, _us(sub, i_s, adm.icu_e[icu]),
              lookup("ICU_DISCHARGE//{}", _ICU_UNITS)[unit_i[icu]]),
             (dead, _us(sub, dead, sub.death[dead]), np.full(dead.size, ix["MEDS_DEATH"])),
             (a_s, _us(sub, a_s, adm.end),
              lookup("DIAGNOSIS//ICD//10//{}", [x.icd for x in cat.INSULTS])[adm.insult])]
    for flag, icd in cat.CHRONIC_DIAGNOSES:  # coded at every discharge
        a = np.flatnonzero(sub.flags[flag][a_s])
        parts.append((a_s[a], _us(sub, a_s[a], adm.end[a]),
                      np.full(a.size, ix[f"DIAGNOSIS//ICD//10//{icd}"])))
    parts = [(s, t, c, np.full(s.size, np.nan)) for s, t, c in parts]
    # Labs and vitals: values at every draw, kept where ordered (panel drawn) and resulted.
    l_subj, l_t, panels = _lab_draws(rng, sub, adm)
    v_subj, v_t = _vital_draws(rng, adm)
    z = _latents(rng, sub, adm, np.r_[l_subj, v_subj], np.r_[l_t, v_t])
    lab_panels = panels[:, [_PANEL[lab.panel] for lab in LAB_CATALOG]]
    for catalog, s, t, zc, drawn in (
            (LAB_CATALOG, l_subj, l_t, z[:len(l_t)], lab_panels),
            (VITAL_CATALOG, v_subj, v_t, z[len(l_t):], np.ones((len(v_t), 1), bool))):
        v = _values(rng, catalog, zc, s, rng.standard_normal((sub.n, len(catalog))), sub.male)
        d, j = np.nonzero(drawn & (rng.random(v.shape) < [lab.p for lab in catalog]))
        parts.append((s[d], _us(sub, s[d], t[d]), lookup("{}", [lab.code for lab in catalog])[j],
                      v[d, j]))
    s, t, c, v = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((c, t, s))  # code index = within-timestamp order
    return s[order], t[order], c[order], v[order].astype(np.float32)


def _labels(sub, adm):
    """Label rows per task: (subject index, prediction time us, boolean value)."""
    start, end = _us(sub, adm.subj, adm.start), _us(sub, adm.subj, adm.end)
    death = np.where(np.isnan(sub.death), np.iinfo(np.int64).max,
                     _us(sub, np.arange(sub.n), np.nan_to_num(sub.death)))[adm.subj]
    died_inside = (death >= start) & (death <= end)
    same_next = np.r_[adm.subj[1:] == adm.subj[:-1], False]
    next_start = np.where(same_next, np.r_[start[1:], 0], np.iinfo(np.int64).max)
    long = end - start > 24 * _US_PER_H
    alive = ~died_inside
    return {"in_hospital_mortality_24h": (adm.subj[long], start[long] + 24 * _US_PER_H,
                                          died_inside[long]),
            "readmission_30d": (adm.subj[alive], end[alive],
                                next_start[alive] - end[alive] <= 30 * 24 * _US_PER_H)}


def _split_counts(n, fractions):
    """Subjects per split (largest-remainder rounding of n * fractions)."""
    f = np.asarray(fractions, np.float64)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got "
                         f"{fractions!r}")
    counts = np.floor(f * n).astype(int)
    counts[np.argsort(counts - f * n, kind="stable")[:n - counts.sum()]] += 1
    return counts


def _write(table, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def _write_dataset(root, seed, num_subjects, split_fractions):
    """Generates and writes the dataset under root; returns the summary."""
    rng = np.random.default_rng(seed)
    sub = _subjects(rng, num_subjects)
    adm = _admissions(rng, sub)
    _deaths(rng, sub, adm)
    s, t, c, v = _events(rng, sub, adm)
    split = np.repeat(np.arange(3), _split_counts(num_subjects, split_fractions))
    split = split[rng.permutation(num_subjects)]
    vocab = _vocabulary()
    codes = pa.array([code for code, _ in vocab], pa.string())
    lab_ix = np.array([i for i, (code, _) in enumerate(vocab)
                       if code in {lab.code for lab in LAB_CATALOG}])
    summary = {"num_subjects": num_subjects, "splits": {}, "labels": {}}
    for k, name in enumerate(SPLITS):
        rows = np.flatnonzero(split[s] == k)
        rs = s[rows]
        head = np.r_[True, rs[1:] != rs[:-1]] if rows.size else np.zeros(0, bool)
        block = np.maximum.accumulate(np.where(head, np.arange(rows.size), 0)) // SHARD_ROWS
        shard = np.unique(block, return_inverse=True)[1]  # blocks no subject starts in: none
        for i in range(int(shard.max(initial=0)) + 1):
            r = rows[shard == i]
            _write(pa.table([pa.array(sub.ids[s[r]], pa.int64()),
                             pa.array(t[r], pa.timestamp("us"), mask=t[r] == _NO_TIME),
                             codes.take(pa.array(c[r])),
                             pa.array(v[r], pa.float32(), mask=np.isnan(v[r]))],
                            schema=DATA_SCHEMA), root / "data" / name / f"{i}.parquet")
        summary["splits"][name] = {"subjects": int((split == k).sum()), "events": int(rows.size),
                                   "lab_events": int(np.isin(c[rows], lab_ix).sum()),
                                   "shards": int(shard.max(initial=0)) + 1}
    for task, (ls, lt, lv) in _labels(sub, adm).items():
        summary["labels"][task] = {}
        for k, name in enumerate(SPLITS):
            m = split[ls] == k
            n = int(m.sum())
            _write(pa.table([pa.array(sub.ids[ls[m]], pa.int64()),
                             pa.array(lt[m], pa.timestamp("us")), pa.array(lv[m], pa.bool_()),
                             pa.nulls(n, pa.int64()), pa.nulls(n, pa.float32()),
                             pa.nulls(n, pa.string())], schema=LABEL_SCHEMA),
                   root / "labels" / task / f"{name}.parquet")
            summary["labels"][task][name] = {"rows": n, "positives": int(lv[m].sum())}
    present = sorted(vocab[i] for i in np.unique(c))
    _write(pa.table({"code": pa.array([x[0] for x in present], pa.string()),
                     "description": pa.array([x[1] for x in present], pa.string()),
                     "parent_codes": pa.nulls(len(present), pa.list_(pa.string()))}),
           root / "metadata" / "codes.parquet")
    _write(pa.table({"subject_id": pa.array(sub.ids, pa.int64()),
                     "split": pa.array(np.array(SPLITS)[split], pa.string())}),
           root / "metadata" / "subject_splits.parquet")
    meta = {"dataset_name": "cvmae-synthetic",
            "dataset_version": f"{GENERATOR_VERSION}+seed{seed}.n{num_subjects}",
            "etl_name": "cvmae_jax.data.synthetic", "etl_version": GENERATOR_VERSION,
            "meds_version": "0.4.1", "license": "Apache-2.0",
            "created_at": "2025-01-01T00:00:00+00:00"}  # fixed, so files are reproducible
    (root / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return summary


def generate_synthetic_meds(out_dir: str | os.PathLike, *, num_subjects: int = 1000, seed: int = 0,
                            split_fractions=(0.8, 0.1, 0.1)) -> dict:
    """Writes a MEDS dataset to out_dir and returns a summary dict of counts only
    (subjects/events/lab events per split, label rows and positives per task).

    The dataset is built in a temporary folder beside out_dir and renamed into place, so an
    interrupted run leaves no partial dataset. Raises ValueError if out_dir is a non-empty folder
    (or a file). The same seed and sizes give byte-identical files.
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"refusing to write the synthetic MEDS dataset: {out} exists and is "
                         "not an empty directory")
    if int(num_subjects) < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    _split_counts(num_subjects, split_fractions)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        summary = _write_dataset(tmp, seed, int(num_subjects), split_fractions)
        try:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError:  # another process (of a multi-process run) wrote the same files first
            if not (out.is_dir() and any(out.iterdir())):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def synthetic_meds_root(data_dir: str | os.PathLike, num_subjects: int, seed: int,
                        log=print) -> str:
    """The synthetic MEDS root for these settings under data_dir
    (``synthetic_meds_n<subjects>_seed<seed>``), generated on first use; runs sharing a
    data_dir with other settings get their own."""
    data_dir = os.fspath(data_dir)
    root = os.path.join(data_dir, f"synthetic_meds_n{int(num_subjects)}_seed{seed}")
    if not os.path.exists(root):
        log(f"Generating synthetic MEDS ({num_subjects} subjects, seed {seed}) in {root}")
        generate_synthetic_meds(root, num_subjects=num_subjects, seed=seed)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True, help="new or empty output folder")
    parser.add_argument("--num_subjects", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = generate_synthetic_meds(args.out_dir, num_subjects=args.num_subjects, seed=args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
