"""Perturbation sensitivity: how much a model relies on the subject's own lab values.

Two corruptions of the values a model reads (codes and times stay intact), in normalized units:

- ``shuffle_within_code``: each event takes the value of another event of the same code drawn
  from the whole evaluated split (a seeded random cycle through the code's events, so each
  code's multiset of values is preserved and no event keeps its own value unless it is the
  code's only event);
- ``code_mean``: every value becomes the code's train mean, 0 in normalized units.

Reconstruction: under the fixed uniform evaluation mask, the targets stay the true values while
the visible context is corrupted (ratio = corrupted / clean masked MSE; > 1 when the model uses
the patient's own history). Downstream: held_out label windows are corrupted, embedded and
scored by the probe fit on clean train embeddings.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation.downstream import TEST, TaskData, embed_label_windows
from cvmae_jax.evaluation.paired_stats import one_class
from cvmae_jax.reconstruction import accumulate_sums

KINDS = ("shuffle_within_code", "code_mean")


def corrupt_values(codes: np.ndarray, values: np.ndarray, kind: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Corrupted copy of the 1-D ``values`` of real events with codes ``codes`` (see module)."""
    codes, values = np.asarray(codes), np.asarray(values)
    if kind == "code_mean":
        return np.zeros_like(values)
    if kind != "shuffle_within_code":
        raise ValueError(f"perturbation kind={kind!r}: expected one of {KINDS}")
    n = len(values)
    order = np.lexsort((rng.random(n), codes))  # grouped by code, random order inside
    sorted_codes = codes[order]
    last = np.r_[sorted_codes[1:] != sorted_codes[:-1], True] if n else np.zeros(0, bool)
    first = np.r_[True, last[:-1]] if n else np.zeros(0, bool)
    donor = np.arange(1, n + 1)
    donor[last] = np.flatnonzero(first)  # each group's last event takes its first's value
    out = np.empty_like(values)
    out[order] = values[order[donor]]
    return out


def corrupt_batches(batches: list[dict], kind: str, seed: int) -> list[dict]:
    """Copies of padded batches whose ``values`` (valid tokens) are corrupted over the pool of
    all their valid tokens, with the true values kept as ``targets``."""
    valid = [b["valid"] for b in batches]
    flat_codes = np.concatenate([b["codes"][v] for b, v in zip(batches, valid)])
    flat_values = np.concatenate([b["values"][v] for b, v in zip(batches, valid)])
    corrupted = corrupt_values(flat_codes, flat_values, kind, np.random.default_rng(seed))
    out, start = [], 0
    for b, v in zip(batches, valid):
        values = np.zeros_like(b["values"])
        n = int(v.sum())
        values[v] = corrupted[start:start + n]
        start += n
        out.append(dict(b, values=values, targets=b["values"]))
    return out


def corrupt_windows(windows: list[dict], kind: str, seed: int) -> list[dict]:
    """Copies of label windows with their values corrupted over the pool of all their events."""
    if not windows:
        return []
    flat_codes = np.concatenate([w["codes"] for w in windows])
    flat_values = np.concatenate([w["values"] for w in windows])
    corrupted = corrupt_values(flat_codes, flat_values, kind, np.random.default_rng(seed))
    bounds = np.cumsum([0] + [len(w["values"]) for w in windows])
    return [dict(w, values=corrupted[lo:hi].astype(np.float32))
            for w, lo, hi in zip(windows, bounds[:-1], bounds[1:])]


def reconstruction_sensitivity(eval_step: Callable, params, batches: list[dict], kind: str,
                               seed: int, clean_masked_mse: float,
                               to_device: Callable[[dict], dict],
                               fetch: Callable) -> dict:
    """Masked MSE under the uniform eval step with the context corrupted by ``kind``."""
    sums = accumulate_sums(eval_step, params, corrupt_batches(batches, kind, seed), to_device,
                           fetch)
    n = float(sums["count"].sum())
    corrupted = float(sums["sse"].sum() / max(n, 1.0))
    return dict(masked_mse_clean=float(clean_masked_mse), masked_mse_corrupted=corrupted,
                ratio=corrupted / clean_masked_mse if clean_masked_mse else None,
                num_masked=int(n))


def downstream_sensitivity(graphdef, params, task: TaskData, kind: str, seed: int,
                           max_len: int, batch_size: int, embed_fn) -> dict:
    """Held_out AUROC of the clean-train probe on clean vs corrupted label windows."""
    y, probe = task.y[TEST], task.probe
    out = dict(n=int(len(y)), auroc_clean=None, auroc_corrupted=None, auroc_ratio=None,
               mean_abs_prob_change=None)
    if probe is None or not len(y):
        out["reason"] = "no probe" if probe is None else f"no {TEST} label rows"
        return out
    x = embed_label_windows(graphdef, params, corrupt_windows(task.windows[TEST], kind, seed),
                            max_len, batch_size, embed_fn)
    change = probe.probability(x) - probe.probability(task.x[TEST])
    out["mean_abs_prob_change"] = float(np.mean(np.abs(change)))
    if one_class(y):
        out["reason"] = f"{TEST} split has a single class: AUROC undefined"
        return out
    out["auroc_clean"] = float(roc_auc_score(y, probe.decision(task.x[TEST])))
    out["auroc_corrupted"] = float(roc_auc_score(y, probe.decision(x)))
    out["auroc_ratio"] = (out["auroc_corrupted"] / out["auroc_clean"]
                          if out["auroc_clean"] else None)  # AUROC 0 on tiny data
    return out


def perturbation_metrics(kinds: Iterable[str], seed: int, split: str, n: int,
                         reconstruction: Callable, downstream: Callable,
                         tasks: Iterable[str]) -> dict:
    """{"seed", "split", "n" (real events corrupted on split), "downstream_split", "kinds",
    kind: {"reconstruction": reconstruction(kind), "downstream": {task: downstream(task,
    kind)}}}."""
    tasks = list(tasks)
    out = dict(seed=int(seed), split=split, n=int(n), downstream_split=TEST, kinds=list(kinds))
    for kind in out["kinds"]:
        out[kind] = dict(reconstruction=reconstruction(kind),
                         downstream={t: downstream(t, kind) for t in tasks})
    return out
