"""The PNG figures of ``eval.py --compare``: validation curves, per-lab differences by CV,
AUROCs per task."""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cvmae_jax.data.code_names import short_name  # noqa: E402
from cvmae_jax.evaluation.compared_runs import REFERENCE, Run  # noqa: E402
from cvmae_jax.evaluation.figures import rotated_labels_height, save_figure  # noqa: E402
from cvmae_jax.mask_probabilities import TWO_TIER_STRATEGIES  # noqa: E402


def plot_all(groups: dict[str, dict[int, Run]], summary: dict, workdir: str) -> list[str]:
    figures = []
    for name, plot in (("validation_curves.png", _plot_validation),
                       ("lab_difference_by_cv.png", _plot_lab_differences),
                       ("auroc_by_task.png", _plot_aurocs)):
        fig = plot(groups, summary)
        if fig is not None:
            save_figure(fig, os.path.join(workdir, name))
            figures.append(name)
    return figures


def _colors(groups) -> dict[str, str]:
    return {s: f"C{i}" for i, s in enumerate(groups)}


def _plot_validation(groups, summary):
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = _colors(groups)
    for strategy, by_seed in groups.items():
        curves = [dict(r.validation) for r in by_seed.values() if r.validation]
        for curve in curves:
            ax.plot(list(curve), list(curve.values()), color=colors[strategy], lw=0.6, alpha=0.5)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], color=colors[strategy],
                lw=2, marker="o", ms=3, label=f"{strategy} (seeds {list(by_seed)})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"masked MSE ({summary['validation_split']})")
    ax.set_title("validation masked MSE (thick: mean over seeds, thin: each seed)")
    ax.legend(fontsize=8)
    return fig


def _plot_lab_differences(groups, summary):
    rows = [(s, e["vs_random"]["reconstruction"]["uniform"])
            for s, e in summary["strategies"].items() if s != REFERENCE]
    rows = [(s, r["per_lab"]) for s, r in rows if r.get("per_lab")]
    if not rows:
        return None
    width = max(8, 0.25 * max(len(labs) for _, labs in rows))
    labels = {s: [short_name(lab["name"], lab["code"]) for lab in labs] for s, labs in rows}
    height = 2 + rotated_labels_height([t for ts in labels.values() for t in ts], 6)
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, height * len(rows) + 1),
                             squeeze=False)
    threshold = next(iter(groups[REFERENCE].values())).metrics["cv_threshold"]
    for ax, (strategy, labs) in zip(axes[:, 0], rows):
        diff = [lab["diff"] for lab in labs]
        bars = ax.bar(range(len(labs)), diff,
                      color=["tab:green" if d > 0 else "tab:red" for d in diff])
        ax.axhline(0, color="black", lw=0.8)
        low = sum(lab["cv"] is not None and lab["cv"] <= threshold for lab in labs)
        line = ax.axvline(low - 0.5, color="gray", ls="--", lw=0.8,
                          label=f"train CV {threshold:.3g}: right of it cv's high tier")
        ax.legend(handles=[line, *_hatch_high_tier(bars, strategy, labs)], fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)  # off the bars
        ax.set_xticks(range(len(labs)), labels[strategy], rotation=90, fontsize=6)
        ax.set_ylabel(f"MSE(random) - MSE({strategy})", fontsize=8)
        ax.set_title(f"{strategy} vs random per lab (held_out), labs sorted by train CV; "
                     f"green: {strategy} better", fontsize=9)
    return fig


def _hatch_high_tier(bars, strategy: str, labs: list[dict]) -> list[Patch]:
    """Hatches the bars of the labs a two-tier strategy (``variance``, ``cv``, ``cv_within``)
    masked at its higher probability in training: its own tier, which for ``variance`` and
    ``cv_within`` does not lie to the right of the train-CV line. Returns the legend entry for
    the hatching (none for other strategies)."""
    probs = [lab.get("train_mask_prob") for lab in labs]
    if strategy not in TWO_TIER_STRATEGIES or None in probs or len(set(probs)) < 2:
        return []
    high = max(probs)
    for bar, p in zip(bars, probs):
        if p == high:
            bar.set_hatch("///")
            bar.set_edgecolor("black")
    return [Patch(facecolor="none", edgecolor="black", hatch="///",
                  label=f"masked at {high:.2g} in training ({strategy}'s high tier)")]


def _plot_aurocs(groups, summary):
    tasks = [t for t in summary["tasks"]
             if any(e["auroc"][t]["n"] for e in summary["strategies"].values())]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for x, (strategy, by_seed) in enumerate(groups.items()):
            for k, run in enumerate(by_seed.values()):
                result = run.metrics["downstream"]["tasks"][task]
                if result.get("auroc") is None:
                    continue
                ci = result.get("auroc_ci") or [result["auroc"]] * 2
                offset = x + 0.15 * (k - (len(by_seed) - 1) / 2)
                ax.errorbar(offset, result["auroc"], fmt="o", color=_colors(groups)[strategy],
                            yerr=[[result["auroc"] - ci[0]], [ci[1] - result["auroc"]]])
        ax.axhline(0.5, color="gray", ls=":", lw=0.8)  # chance
        ax.set_xticks(range(len(groups)), list(groups))
        seeds = sorted({s for by_seed in groups.values() for s in by_seed})
        ax.set_xlabel(f"strategy (points left to right: seeds {seeds}; dotted: chance)",
                      fontsize=8)
        ax.set_title(f"{task}\nheld_out AUROC of the frozen probe, 95% CI per run", fontsize=9)
        ax.set_ylabel("AUROC")
    return fig
