"""Reconstruction error per lab code: under the fixed evaluation mask (training's validation and
eval.py), or one code hidden at a time (single-code mode, eval.py)."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from cvmae_jax.data.disclosure import suppress_rows
from cvmae_jax.data.pipeline import eval_batches
from cvmae_jax.data.prepare import PreparedDataset
from cvmae_jax.metrics import Countdown


def evaluate_split(eval_step: Callable, params, dataset: PreparedDataset, config, launcher,
                   probs: np.ndarray) -> dict:
    """``summarize``'s metrics of ``config.eval.split`` under the fixed evaluation mask, this
    process's share of its batches run through ``eval_step`` (``launcher``: placement, fetch);
    ``probs`` [V]: the training mask probabilities, reported per code."""
    batches = eval_batches(dataset, config.eval.split, config.eval.batch_size,
                           config.data.max_len, shard_index=jax.process_index(),
                           shard_count=jax.process_count())
    sums = accumulate_sums(eval_step, params, batches, launcher.put_batch, launcher.fetch)
    return summarize(sums, dataset.stats.codes, dataset.stats.norm_std, probs)


def accumulate_sums(eval_step: Callable, params, batches: Iterable[dict],
                    to_device: Callable[[dict], dict],
                    fetch: Callable = jax.device_get) -> dict[str, np.ndarray]:
    """Sums the per-code outputs of ``eval_step`` over all batches (float64 on the host).

    ``to_device`` places a host batch; ``fetch`` brings outputs back. Returns dict of [V]
    arrays: the step's sums (``steps.make_eval_step``): count, sse, sae, baseline_sse and, in
    uniform mode, locf_sse and locf_fallbacks of carry-forward.
    """
    totals: dict[str, np.ndarray] = {}
    pending = None
    for batch in batches:
        outputs = eval_step(params, to_device(batch))
        if pending is not None:  # fetch one batch late so the device never waits for the host
            _add(totals, fetch(pending))
        pending = outputs
    if pending is not None:
        _add(totals, fetch(pending))
    if not totals:
        raise ValueError("evaluation split has no examples")
    return totals


def single_code_sums(eval_step: Callable, params, batches: Sequence[dict], num_codes: int,
                     to_device: Callable[[dict], dict],
                     fetch: Callable = jax.device_get) -> dict[str, np.ndarray]:
    """Per-code sums with one code hidden at a time (``make_eval_step(mode='single_code')``).

    Each batch is placed once and run with code = 0..num_codes-1; a pass hiding code c only
    adds to entry c, so summing every (batch, code) output gives each code's sums. The code
    goes in as an int32 array, so the step compiles once for all codes. A long run logs its
    progress (``Countdown``).
    """
    codes = [np.int32(c) for c in range(num_codes)]
    progress = Countdown("eval single-code", len(batches) * num_codes, "passes")

    def calls():
        for batch in batches:
            placed = to_device(batch)
            for code in codes:
                yield placed, code
                progress.advance()

    return accumulate_sums(lambda p, call: eval_step(p, *call), params, calls(), lambda x: x,
                           fetch)


def _add(totals: dict, outputs: dict) -> None:
    for name, value in outputs.items():
        totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)


NO_VARIATION_MSE = 1e-8  # a code's per-code-mean baseline MSE below this: its values on the
# split all equal its train mean (in practice a code constant on train, normalized to 0), so
# there is nothing to reconstruct and no ratio to it


def vs_baseline(row: dict) -> float | None:
    """A per-code row's MSE / its per-code-mean baseline MSE; None for a code whose values on
    the split all equal its train mean (the ratio would divide by ~0)."""
    return row["mse"] / row["baseline_mse"] if row["baseline_mse"] > NO_VARIATION_MSE else None


def summarize(sums: dict[str, np.ndarray], codes: tuple[str, ...], norm_std: np.ndarray,
              mask_prob: np.ndarray | None = None) -> dict:
    """Overall and per-code errors from per-code sums.

    Overall ``masked_mse`` pools all hidden tokens; ``baseline_masked_mse`` is the error of
    predicting each code's (clipped) train mean, 0 in normalized units. Raw-unit errors rescale
    by the code's ``norm_std`` (normalization is affine after clipping). With the carry-forward
    sums (``locf_sse``, ``locf_fallbacks``: uniform eval step) also ``locf_masked_mse``,
    ``mse_vs_locf`` and ``locf_fallback_share`` (the hidden values with no visible value of
    their code earlier in the window, predicted by the mean), overall and per code.
    """
    count, sse, sae, baseline = sums["count"], sums["sse"], sums["sae"], sums["baseline_sse"]
    total = max(count.sum(), 1.0)
    overall = dict(num_masked=int(count.sum()), masked_mse=float(sse.sum() / total),
                   masked_mae=float(sae.sum() / total),
                   baseline_masked_mse=float(baseline.sum() / total))
    overall["mse_vs_baseline"] = overall["masked_mse"] / max(overall["baseline_masked_mse"], 1e-12)
    locf = "locf_sse" in sums
    if locf:
        overall.update(_carry_forward(sums["locf_sse"].sum(), sums["locf_fallbacks"].sum(),
                                      total),
                       mse_vs_locf=overall["masked_mse"] / max(sums["locf_sse"].sum() / total,
                                                               1e-12))
    per_code = []
    for i, code in enumerate(codes):
        n = count[i]
        row = dict(code=code, num_masked=int(n))
        if n > 0:
            mse, mae = sse[i] / n, sae[i] / n
            row.update(mse=float(mse), rmse=float(np.sqrt(mse)), mae=float(mae),
                       baseline_mse=float(baseline[i] / n),
                       raw_rmse=float(np.sqrt(mse) * norm_std[i]),
                       raw_mae=float(mae * norm_std[i]))
            if locf:
                row.update(_carry_forward(sums["locf_sse"][i], sums["locf_fallbacks"][i], n,
                                          "locf_mse"))
        if mask_prob is not None:
            row["train_mask_prob"] = float(mask_prob[i])
        per_code.append(row)
    return dict(overall=overall, per_code=per_code)


def against_baselines(overall: dict) -> str:
    """One log line's words for ``summarize``'s overall row: the masked MSE beside the
    per-code mean's and carry-forward's (when measured), each with the model's ratio to it."""
    words = (f"masked_mse {overall['masked_mse']:.4f} (per-code mean "
             f"{overall['baseline_masked_mse']:.4f}, ratio {overall['mse_vs_baseline']:.3f}")
    if overall.get("locf_masked_mse") is not None:
        words += (f"; carry-forward {overall['locf_masked_mse']:.4f}, ratio "
                  f"{overall['mse_vs_locf']:.3f}")
    return words + ")"


def _carry_forward(sse: float, fallbacks: float, n: float, name: str = "locf_masked_mse"
                   ) -> dict:
    """The carry-forward baseline's MSE (as ``name``) and fallback share of n hidden values."""
    return {name: float(sse / n), "locf_fallback_share": float(fallbacks / n)}


def subjects_per_code(dataset: PreparedDataset, split: str) -> np.ndarray:
    """int64 [V]: the subjects of ``split`` with a value of each code in their windows (records
    are in subject order: build order)."""
    records = dataset.data_source(split).records
    counts = np.zeros(dataset.stats.vocab_size, np.int64)
    seen = np.zeros(dataset.stats.vocab_size, bool)
    current = None
    for start in range(0, len(records), 1024):
        for raw in records.__getitems__(range(start, min(start + 1024, len(records)))):
            feature = tf_example_pb2.Example.FromString(raw).features.feature
            subject = feature["subject_id"].int64_list.value[0]
            if subject != current:
                counts += seen
                seen[:], current = False, subject
            seen[np.asarray(feature["codes"].int64_list.value, np.int64)] = True
    return counts + seen


def suppress_small_codes(result: dict, code_subjects: np.ndarray, min_subjects: int) -> None:
    """``disclosure.suppress_rows`` on ``result["per_code"]`` (summarize's format with each
    row's ``cv``), grouped by the CV tiers of ``result["by_cv_tier"]`` (codes above
    ``result["cv_threshold"]``, the others). When a tier rests on fewer than k subjects both
    tiers are suppressed (the overall row minus one tier gives the other). Records the number
    of suppressed rows and k in ``result["suppressed"]``."""
    above = np.array([row["cv"] for row in result["per_code"]]) > result["cv_threshold"]
    rows, unsafe = suppress_rows(result["per_code"], code_subjects, min_subjects,
                                 (above, ~above))
    if unsafe:
        result["by_cv_tier"] = {name: dict(num_codes=tier["num_codes"], suppressed=True)
                                for name, tier in result["by_cv_tier"].items()}
    result["suppressed"] = dict(rows=rows, min_subjects=min_subjects)
