"""The "Does pretraining earn its keep?" section of ``eval/report.md``: the model beside the simple
methods a practitioner would use instead, on the same data: reconstruction (per-code mean,
carry-forward) and, per label task, the frozen probe beside the aggregates baseline, the two
together, and the same probe on the untrained network."""

from __future__ import annotations

from cvmae_jax.evaluation.aggregates import FEATURES, MODELS

MODEL_NAMES = dict(logistic_regression="aggregates LR", gradient_boosting="aggregates GBM")


def yardstick_lines(result: dict) -> list[str]:
    """Markdown lines of the section, from eval.py's metrics (counts and aggregates only)."""
    overall = result["overall"]
    wins, labs = labs_beating_locf(result)
    lines = ["## Does pretraining earn its keep?", "",
             f"Reconstruction of the {overall['num_masked']} values hidden by the evaluation "
             "mask (normalized units); carry-forward predicts each hidden value by the last "
             "visible value of its code earlier in the window, or by the code's mean where there "
             f"is none ({overall['locf_fallback_share']:.1%} of the hidden values).", "",
             "| method | masked MSE | model MSE / method MSE |", "|---|---:|---:|",
             f"| model | {overall['masked_mse']:.4f} | |",
             f"| per-code mean | {overall['baseline_masked_mse']:.4f} | "
             f"{overall['mse_vs_baseline']:.3f} |",
             f"| carry-forward (LOCF) | {overall['locf_masked_mse']:.4f} | "
             f"{overall['mse_vs_locf']:.3f} |", "",
             f"The model beats carry-forward on {wins} of the {labs} labs shown below "
             "(lower MSE).", ""]
    tasks = result.get("downstream", {}).get("tasks", {})
    if not tasks:
        return lines
    table, notes = [], []
    each_code_latest = result.get("eval_settings", {}).get("label_window") == "each_code_latest"
    for task, r in tasks.items():
        aggregates = r["aggregates"]
        if aggregates["reason"]:
            notes.append(f"- {task}: no comparison ({aggregates['reason']})")
            continue
        cells = [_auroc(r)]
        for m in MODELS:
            diff = aggregates[m]["probe_minus_model"]
            cells += [_auroc(aggregates[m]), _difference(diff)]
        table.append(f"| {task} | {r['n']} | " + " | ".join(cells) + " |")
        at_max = sum(aggregates["features"]["windows_at_max_len"].values())
        if at_max:
            notes.append(f"- {task}: {at_max} label windows are full; their older events "
                         + ("other than each code's latest " if each_code_latest else "")
                         + "are seen by neither the probe nor the aggregates "
                         "(config.eval.label_max_len reads longer windows"
                         + ("" if each_code_latest else "; config.eval.label_window="
                            "each_code_latest keeps every code's latest event") + ")")
    if table:
        lines += ["| task | n test | probe AUROC | " + " | ".join(
            f"{MODEL_NAMES[m]} AUROC | probe - {MODEL_NAMES[m]} [paired 95% CI]" for m in MODELS)
            + " |", "|---|---:|---|" + "---|---|" * len(MODELS), *table, ""]
    features = ", ".join(f.replace("_", " ") for f in FEATURES)
    lines += [f"Aggregates baseline: per selected code {features} (an indicator, values "
              "imputed by the code's mean) over the same events, label rows and splits as the "
              "probe; logistic regression as the probe's (standardized, C by tuning AUROC) and "
              "gradient boosting (settings by tuning AUROC). A difference above 0: the probe "
              "is better; CIs resample held_out subjects, the same resamples for both.", ""]
    return (lines + (notes + [""] if notes else []) + _together_lines(tasks)
            + _untrained_lines(tasks))


def _together_lines(tasks: dict) -> list[str]:
    """The probe and the aggregates model together, per task, beside each alone."""
    rows, unexported = [], []
    for task, r in tasks.items():
        together = r.get("aggregates", {}).get("probe_plus_aggregates")
        if together:
            model = MODEL_NAMES[together["aggregates_model"]]
            rows.append(f"| {task} | {_auroc(together)} | {model} | "
                        f"{_difference(together['minus_model'], model, 'together')} | "
                        f"{_difference(together['minus_probe'], 'probe', 'together')} |")
            reason = (together.get("calibration") or {}).get("reason")
            if reason:
                unexported.append(f"- {task}: probe + aggregates has no prediction export (its "
                                  f"sum of log-odds has no probabilities: {reason})")
    if not rows:
        return []
    return ["| task | probe + aggregates AUROC | aggregates model | together - that model "
            "[paired 95% CI] | together - probe [paired 95% CI] |", "|---|---|---|---|---|",
            *rows, "",
            "Probe + aggregates: the probe's log-odds plus those of the aggregates model with the "
            "higher tuning AUROC (logistic regression when tuning has one class), each scaled "
            "to unit spread on tuning, both fit on train. "
            "Above 0 against that model: the encoder's vector adds to what the hand-made "
            "features give it. Below 0: the equal weights cost more than the vector adds, as "
            "where the probe is far behind the model alone.", "",
            *([*unexported, ""] if unexported else [])]


def _untrained_lines(tasks: dict) -> list[str]:
    """The probe beside the same probe on the network's initial parameters, per task."""
    rows = [f"| {task} | {_auroc(r)} | {_auroc(r['untrained'])} | "
            f"{_difference(r['untrained']['probe_minus_untrained'], 'untrained network')} |"
            for task, r in tasks.items()
            if r.get("untrained") and not r["untrained"].get("reason")]
    if not rows:
        return []
    return ["| task | probe AUROC | untrained network's probe AUROC | probe - untrained "
            "[paired 95% CI] |", "|---|---|---|---|", *rows, "",
            "The untrained network: the parameters pretraining started from, its windows "
            "pooled and probed as above. The difference is what pretraining added to the "
            "frozen vectors; the rest comes from the architecture and the pooling.", ""]


def labs_beating_locf(result: dict) -> tuple[int, int]:
    """(labs whose masked MSE is below carry-forward's, labs with hidden values) among the
    per-lab rows eval.py shows (small-count rows suppressed)."""
    rows = [r for r in result["per_code"] if r.get("num_masked")]
    return sum(r["mse"] < r["locf_mse"] for r in rows), len(rows)


def _auroc(r: dict) -> str:
    ci = r.get("auroc_ci")
    return f"{r['auroc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _difference(diff: dict, other: str = "aggregates", first: str = "probe") -> str:
    ci = diff["ci"]
    if not ci:
        return f"{diff['delta']:+.3f}"
    reading = (f"{first} better" if ci[0] > 0 else f"{other} better" if ci[1] < 0
               else "no clear difference")
    return f"{diff['delta']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] {reading}"
