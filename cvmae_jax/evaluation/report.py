"""``eval/report.md`` and the PNG plots of ``eval.py`` from the metrics dict."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cvmae_jax.data.code_names import markdown_cell, short_name  # noqa: E402
from cvmae_jax.evaluation.downstream import TEST, report_lines  # noqa: E402
from cvmae_jax.evaluation.figures import rotated_labels_height, save_figure  # noqa: E402
from cvmae_jax.evaluation.finetune_report import finetune_lines, kshot_points  # noqa: E402
from cvmae_jax.evaluation.formatting import number  # noqa: E402
from cvmae_jax.evaluation.yardstick import yardstick_lines  # noqa: E402
from cvmae_jax.jsonio import write_text_atomic  # noqa: E402
from cvmae_jax.reconstruction import vs_baseline  # noqa: E402


def write_report(path: str, result: dict) -> None:
    overall = result["overall"]
    lines = [
        f"# Reconstruction on `{result['split']}` (step {result['step']}, "
        f"strategy `{result['strategy']}`)", "",
        f"Evaluation mask: uniform {result['eval_mask']['rate']:.0%} of values, seed "
        f"{result['eval_mask']['seed']}, identical for every model. n = "
        f"{overall['num_masked']} masked values.", "",
        f"Codes: {result.get('code_selection', 'not recorded')}.", "",
        f"- masked MSE (normalized units): {overall['masked_mse']:.4f}",
        f"- per-code-mean baseline MSE: {overall['baseline_masked_mse']:.4f}",
        f"- ratio model / baseline: {overall['mse_vs_baseline']:.3f}", "",
        *yardstick_lines(result), "## Reconstruction by CV tier and by lab", "",
        *_tier_table(result["by_cv_tier"]), "",
        "| lab | code | train CV | train mask p | n masked | MSE | baseline MSE | LOCF MSE | "
        "LOCF fallback | RMSE (raw units) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in evaluated_rows(result):
        lines.append(f"| {_lab_cells(r)} | {r['cv']:.3f} | {r['train_mask_prob']:.2f} | "
                     f"{r['num_masked']} | {r['mse']:.4f} | {r['baseline_mse']:.4f} | "
                     f"{r['locf_mse']:.4f} | {r['locf_fallback_share']:.0%} | "
                     f"{r['raw_rmse']:.4g} |")
    lines += suppressed_lines(result)
    if "single_code" in result:
        lines += _single_code_lines(result)
    if "downstream" in result:
        lines += report_lines(result["downstream"])
        lines += _label_efficiency_lines(result["downstream"])
        lines += finetune_lines(result["downstream"])
    if "perturbation" in result:
        lines += _perturbation_lines(result["perturbation"])
    if "exports" in result:
        lines += _export_lines(result["exports"])
    lines += _scored_lines(result.get("meds_evaluation") or {},
                           result.get("meds_evaluation_models") or {})
    write_text_atomic(path, "\n".join(lines) + "\n")


def _tier_table(tiers: dict) -> list[str]:
    return ["| CV tier | codes | n masked | masked MSE | baseline MSE | ratio |",
            "|---|---:|---:|---:|---:|---:|",
            *(f"| {name} | {t['num_codes']} | suppressed | | | |" if t.get("suppressed") else
              f"| {name} | {t['num_codes']} | {t['num_masked']} | {t['masked_mse']:.4f} | "
              f"{t['baseline_masked_mse']:.4f} | {t['mse_vs_baseline']:.3f} |"
              for name, t in tiers.items())]


def _lab_cells(row: dict) -> str:
    """The lab's name and its code: two cells of a per-lab table."""
    return f"{markdown_cell(row['name'])} | `{row['code']}`"


def evaluated_rows(result: dict) -> list[dict]:
    """Per-code rows with at least one masked value and not suppressed, sorted by train CV."""
    return sorted((r for r in result["per_code"] if r.get("num_masked")), key=lambda r: r["cv"])


def suppressed_lines(result: dict) -> list[str]:
    """The note under a per-code table on its suppressed rows (``disclosure.suppress_rows``)."""
    s = result.get("suppressed")
    if not s or not s["rows"]:
        return []
    return ["", f"{s['rows']} code(s) not shown (config.data.min_subjects = "
            f"{s['min_subjects']}): their values on this split come from fewer than "
            f"{s['min_subjects']} subjects or fewer than {s['min_subjects']} were hidden, or "
            "hiding them keeps the others from being worked out from a pooled row; they still "
            "count in the pooled rows above."]


def _single_code_lines(result: dict) -> list[str]:
    single = result["single_code"]
    overall = single["overall"]
    codes = sum(1 for r in single["per_code"] if r.get("num_masked") or r.get("suppressed"))
    lines = ["", f"## Single-code reconstruction on `{result['split']}`", "",
             "Each lab code in turn has every one of its values in the window hidden, all other "
             "values visible (a fixed mask, identical for every model; no seed). n = "
             f"{overall['num_masked']} hidden values over "
             f"{codes} codes.", "",
             f"- masked MSE: {overall['masked_mse']:.4f} vs per-code-mean baseline "
             f"{overall['baseline_masked_mse']:.4f} (ratio {overall['mse_vs_baseline']:.3f})",
             "", *_tier_table(single["by_cv_tier"]), "",
             "| lab | code | train CV | n hidden | MSE | baseline MSE | ratio | "
             "RMSE (raw units) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in evaluated_rows(single):
        lines.append(f"| {_lab_cells(r)} | {r['cv']:.3f} | {r['num_masked']} | {r['mse']:.4f} | "
                     f"{r['baseline_mse']:.4f} | {_ratio(r)} | {r['raw_rmse']:.4g} |")
    return lines + suppressed_lines(single)


def _label_efficiency_lines(downstream: dict) -> list[str]:
    curves = {t: r["label_efficiency"] for t, r in downstream["tasks"].items()
              if r.get("label_efficiency")}
    if not curves:
        return []
    le = downstream["label_efficiency"]
    lines = ["", f"## Label efficiency on `{le['split']}`", "",
             f"Probe fit on k stratified train label rows (both classes in every draw), "
             f"{le['c_policy']}; {le['draws']} draws per k, each seeded with [{le['seed']}, k, "
             "draw]; mean and sample std (ddof=1) of the held_out AUROC over the draws. `all` "
             f"is the full-data probe (seed {downstream['seed']}). Plot: "
             "`label_efficiency.png`.", "",
             "| task | k | n train | draws | n test | C | AUROC mean | AUROC std |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for task, curve in curves.items():
        too_many = [str(k) for k in le.get("ks", []) if str(k) not in curve]
        if too_many:
            skipped.append(f"- {task}: k = {', '.join(too_many)} left out (not fewer than its "
                           f"{curve['all']['n_train']} train label rows)")
        for k, e in curve.items():
            mean = "n/a" if e["auroc_mean"] is None else f"{e['auroc_mean']:.3f}"
            std = "n/a" if e["auroc_std"] is None else f"{e['auroc_std']:.3f}"
            c = "n/a" if e["C"] is None else f"{e['C']:g}"  # no probe: train has one class
            lines.append(f"| {task} | {k} | {e['n_train']} | {e['draws']} | {e['n_test']} | "
                         f"{c} | {mean} | {std} |")
    return lines + ([""] + skipped if skipped else []) + [""]


def _perturbation_lines(p: dict) -> list[str]:
    lines = ["", "## Perturbation sensitivity", "",
             f"Visible values corrupted, seed {p['seed']}: `shuffle_within_code` gives each "
             "event the value of another event of the same code drawn from the whole evaluated "
             "split (a random cycle per code: each code's values are kept, only moved); "
             "`code_mean` sets every value to the code's train mean (0 normalized). "
             f"Reconstruction on `{p['split']}` ({p['n']} events corrupted) under the uniform "
             "evaluation mask, targets = the true values; downstream on "
             f"`{p['downstream_split']}` label windows scored by the probe fit on clean train "
             "embeddings.", "",
             "| corruption | n masked | masked MSE clean | corrupted | ratio |",
             "|---|---:|---:|---:|---:|"]
    for kind in p["kinds"]:
        r = p[kind]["reconstruction"]
        lines.append(f"| {kind} | {r['num_masked']} | {number(r['masked_mse_clean'], '.4f')} | "
                     f"{number(r['masked_mse_corrupted'], '.4f')} | {number(r['ratio'])} |")
    rows = [(kind, task, d) for kind in p["kinds"] for task, d in p[kind]["downstream"].items()]
    if rows:
        lines += ["", "| corruption | task | n | AUROC clean | AUROC corrupted | ratio | "
                  "mean abs prob change |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {kind} | {task} | {d['n']} | {number(d['auroc_clean'])} | "
                  f"{number(d['auroc_corrupted'])} | {number(d['auroc_ratio'])} | "
                  f"{number(d['mean_abs_prob_change'], '.4f')} |" for kind, task, d in rows]
    return lines + [""]


def _export_lines(exports: dict) -> list[str]:
    if not exports:
        return []
    lines = ["", "## Exports", "",
             "`embeddings/<task>.parquet` (every label row with a non-empty window), the "
             "probe's `predictions/<task>/<split>.parquet` and the other models' "
             "`predictions_<model>/<task>/<split>.parquet` (MEDS-DEV format, label-file row "
             "order).", "",
             "| task | embedding rows | prediction rows | other models |", "|---|---:|---|---|"]
    for task, e in exports.items():
        preds = ", ".join(f"{s} {n}" for s, n in e["predictions"].items()) or "none (no probe)"
        models = ", ".join(f"`{m}`" for m in e.get("models", {})) or "none"
        lines.append(f"| {task} | {e['embeddings']} | {preds} | {models} |")
    return lines + [""]


def _scored_lines(probe: dict, models: dict) -> list[str]:
    """The held_out prediction files as meds-evaluation scores them (over rows), per task and
    model: ranking and calibration side by side."""
    rows = [(task, "probe", by_split) for task, by_split in probe.items()]
    rows += [(task, model, by_split) for model, tasks in models.items()
             for task, by_split in tasks.items()]
    rows = [(task, model, by_split[TEST]) for task, model, by_split in rows if TEST in by_split]
    if not rows:
        return []
    lines = ["", f"## The exported predictions scored by meds-evaluation ({TEST})", "",
             "Over rows (`samples_equally_weighted`); the probabilities of `probe_plus_aggregates`"
             ", `pretrained` and `scratch` are Platt-scaled on tuning where their `calibration` "
             "in metrics.json has no `reason` (`pretrained` and `scratch` keep their own "
             "otherwise).", "",
             "| task | model | AUROC | average precision | Brier score | calibration error |",
             "|---|---|---:|---:|---:|---:|"]
    for task, model, score in sorted(rows, key=lambda r: r[0]):
        metrics = score.get("samples_equally_weighted")
        cells = ([number(metrics.get(k)) for k in (
            "roc_auc_score", "average_precision_score", "brier_score", "calibration_error")]
            if metrics else ["undefined (one class)", "", "", ""])
        lines.append(f"| {task} | {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def _ratio(row: dict) -> str:
    ratio = vs_baseline(row)
    return "n/a (constant)" if ratio is None else f"{ratio:.3f}"


def plot_by_lab(path: str, result: dict) -> None:
    """MSE / baseline per lab, sorted by train CV; codes without a ratio (``vs_baseline``:
    values equal to the train mean, i.e. constant on train) are left out and counted in the
    title."""
    rows = [r for r in evaluated_rows(result) if vs_baseline(r) is not None]
    constant = len(evaluated_rows(result)) - len(rows)
    ratio = [vs_baseline(r) for r in rows]
    colors = ["tab:red" if r["cv"] > result["cv_threshold"] else "tab:blue" for r in rows]
    labels = [short_name(r["name"], r["code"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)),
                                    3 + rotated_labels_height(labels, 6)))
    ax.bar(range(len(rows)), ratio, color=colors)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("masked MSE / per-code-mean baseline")
    ax.set_title(f"{result['split']}: reconstruction by lab, sorted by train CV "
                 f"(red: CV above {result['cv_threshold']:.3g}, the high tier)"
                 + (f"\n{constant} constant code(s) without a ratio left out" if constant
                    else ""), fontsize=9)
    save_figure(fig, path)


def plot_label_efficiency(path: str, downstream: dict) -> None:
    """Held_out AUROC vs number of train labels (log x), one line per task, +-1 std bars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ticks = set()
    for task, r in downstream["tasks"].items():
        curve = [e for e in (r.get("label_efficiency") or {}).values()
                 if e["auroc_mean"] is not None]
        ticks.update(e["n_train"] for e in curve[:-1])  # the k values; "all" is the last
        if curve:
            mean = np.array([e["auroc_mean"] for e in curve])
            std = np.array([e["auroc_std"] or 0.0 for e in curve])  # one draw: no bar
            bars = ax.errorbar(
                [e["n_train"] for e in curve], mean, marker="o", capsize=3,
                yerr=[mean - np.maximum(mean - std, 0), np.minimum(mean + std, 1) - mean],
                label=f"{task} (all: n train {curve[-1]['n_train']}, "
                      f"n test {curve[-1]['n_test']})")
            tuned = kshot_points(r)
            if tuned:
                ax.plot(*zip(*tuned), marker="s", ls="--", color=bars.lines[0].get_color(),
                        label=f"{task}, fine-tuned")
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    if ax.get_legend_handles_labels()[0]:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)], fontsize=7)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.6, "no held_out AUROC (see report.md)", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("train label rows k (last point of each line: all train rows)")
    ax.set_ylabel(f"{downstream.get('split', 'held_out')} AUROC (mean +- std over draws)")
    le = downstream.get("label_efficiency", {})
    ax.set_title(f"Label efficiency: {le.get('draws')} draws per k, seeds "
                 f"[{le.get('seed')}, k, draw]")
    save_figure(fig, path)
