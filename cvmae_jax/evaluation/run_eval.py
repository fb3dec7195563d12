"""``eval.py``: per-lab reconstruction of a pretrained run, written to ``RUN/eval/``."""

from __future__ import annotations

import json
import os

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cvmae_jax import parallel  # noqa: E402
from cvmae_jax.checkpoint import Checkpointer, abstract_like  # noqa: E402
from cvmae_jax.data.prepare import prepare_dataset  # noqa: E402
from cvmae_jax.evaluation.downstream import downstream_metrics, report_lines  # noqa: E402
from cvmae_jax.jsonio import write_json_atomic  # noqa: E402
from cvmae_jax.masking import percentile_threshold  # noqa: E402
from cvmae_jax.model import ModelConfig  # noqa: E402
from cvmae_jax.steps import init_state, make_eval_step, make_optimizer  # noqa: E402
from cvmae_jax.run_setup import data_dir, mask_probabilities, resolve_meds_dir  # noqa: E402
from cvmae_jax.train import evaluate  # noqa: E402


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_run(workdir: str, config=None, split: str = "held_out") -> dict:
    """Restores the newest checkpoint of ``workdir`` and writes ``eval/metrics.json``,
    ``eval/report.md`` and ``eval/reconstruction_by_lab.png``. Returns the metrics."""
    config = ml_collections.ConfigDict(config or load_run_config(workdir))
    config.eval.split = split
    meds_dir = resolve_meds_dir(config, workdir)
    dataset = prepare_dataset(config.data, meds_dir, data_dir(config, workdir))
    probs = mask_probabilities(config, dataset)
    launcher = parallel.JitLauncher(jax.devices())
    graphdef, state = init_state(ModelConfig.from_config(config.model, dataset.stats.vocab_size),
                                 make_optimizer(config.train), config.seed)
    state = launcher.put_state(state)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no complete checkpoint to evaluate")
    state = checkpointer.restore(step, abstract_like(state))
    checkpointer.close()
    eval_step = launcher.eval_step(make_eval_step(graphdef, dataset.stats.vocab_size,
                                                  config.eval.mask_rate, config.eval.mask_seed))
    result = evaluate(eval_step, state.params, dataset, config, launcher, probs)
    result.update(step=step, split=split, strategy=config.masking.strategy,
                  eval_mask=dict(rate=config.eval.mask_rate, seed=config.eval.mask_seed))
    for row, cv in zip(result["per_code"], dataset.stats.cv):
        row["cv"] = float(cv)
    result["by_cv_tier"] = _by_cv_tier(result["per_code"], dataset.stats.cv,
                                       config.masking.threshold_percentile)
    result["downstream"] = downstream_metrics(
        graphdef, state.params, meds_dir, dataset.stats, config.data.max_len,
        config.eval.batch_size, labels_dir=config.eval.get("labels_dir"), seed=config.seed)
    if jax.process_index() == 0:
        out = os.path.join(workdir, "eval")
        write_json_atomic(os.path.join(out, "metrics.json"), result)
        _write_report(os.path.join(out, "report.md"), result)
        _plot_by_lab(os.path.join(out, "reconstruction_by_lab.png"), result)
        logging.info("eval %s step %d: masked_mse %.4f vs baseline %.4f; wrote %s", split, step,
                     result["overall"]["masked_mse"], result["overall"]["baseline_masked_mse"],
                     out)
    return result


def _by_cv_tier(rows: list[dict], cv: np.ndarray, threshold_percentile: float) -> dict:
    """Pooled masked MSE of the codes above / at-or-below the train CV percentile."""
    above = cv > percentile_threshold(cv, threshold_percentile)
    tiers = {}
    for name, members in (("high_cv", above), ("low_cv", ~above)):
        chosen = [r for r, m in zip(rows, members) if m and r["num_masked"]]
        n = sum(r["num_masked"] for r in chosen)
        mse = sum(r["mse"] * r["num_masked"] for r in chosen) / max(n, 1)
        baseline = sum(r["baseline_mse"] * r["num_masked"] for r in chosen) / max(n, 1)
        tiers[name] = dict(num_codes=len(chosen), num_masked=n, masked_mse=mse,
                           baseline_masked_mse=baseline,
                           mse_vs_baseline=mse / baseline if baseline else float("nan"))
    return tiers


def _evaluated_rows(result: dict) -> list[dict]:
    """Per-code rows with at least one masked value, sorted by train CV."""
    return sorted((r for r in result["per_code"] if r["num_masked"]), key=lambda r: r["cv"])


def _write_report(path: str, result: dict) -> None:
    overall = result["overall"]
    lines = [
        f"# Reconstruction on `{result['split']}` (step {result['step']}, "
        f"strategy `{result['strategy']}`)", "",
        f"Evaluation mask: uniform {result['eval_mask']['rate']:.0%} of values, seed "
        f"{result['eval_mask']['seed']}, identical for every model. n = "
        f"{overall['num_masked']} masked values.", "",
        f"- masked MSE (normalized units): {overall['masked_mse']:.4f}",
        f"- per-code-mean baseline MSE: {overall['baseline_masked_mse']:.4f}",
        f"- ratio model / baseline: {overall['mse_vs_baseline']:.3f}", "",
        "| CV tier | codes | n masked | masked MSE | baseline MSE | ratio |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {t['num_codes']} | {t['num_masked']} | {t['masked_mse']:.4f} | "
          f"{t['baseline_masked_mse']:.4f} | {t['mse_vs_baseline']:.3f} |"
          for name, t in result["by_cv_tier"].items()), "",
        "| code | train CV | train mask p | n masked | MSE | baseline MSE | RMSE (raw units) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _evaluated_rows(result):
        lines.append(f"| `{r['code']}` | {r['cv']:.3f} | {r['train_mask_prob']:.2f} | "
                     f"{r['num_masked']} | {r['mse']:.4f} | {r['baseline_mse']:.4f} | "
                     f"{r['raw_rmse']:.4g} |")
    if "downstream" in result:
        lines += report_lines(result["downstream"])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot_by_lab(path: str, result: dict) -> None:
    rows = _evaluated_rows(result)
    ratio = [r["mse"] / max(r["baseline_mse"], 1e-12) for r in rows]
    high = max(r["train_mask_prob"] for r in rows)
    colors = ["tab:red" if r["train_mask_prob"] == high else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    ax.bar(range(len(rows)), ratio, color=colors)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["code"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("masked MSE / per-code-mean baseline")
    ax.set_title(f"{result['split']}: reconstruction by lab, sorted by train CV "
                 f"(red: highest train mask p)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
