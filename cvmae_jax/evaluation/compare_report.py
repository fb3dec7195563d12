"""report.md of ``eval.py --compare``: the summary as Markdown tables and notes."""

from __future__ import annotations

from cvmae_jax.data.code_names import markdown_cell
from cvmae_jax.evaluation.compared_runs import REFERENCE
from cvmae_jax.evaluation.downstream import FEW_LABELS, few_labels
from cvmae_jax.evaluation.formatting import number


def _ci(ci) -> str:
    return f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def report_lines(summary: dict, figures: list[str]) -> list[str]:
    """report.md's lines: the table of every strategy against ``random``, the conventions, the
    seed noise floor and simple methods, the detail sections, notes and ``figures``."""
    strategies = summary["strategies"]
    tasks = list(summary["tasks"])
    seeds = sorted({s for e in strategies.values() for s in e["seeds"]})
    mask = summary.get("eval_mask") or {}
    lines = [f"# Masking strategies vs `{REFERENCE}`", "",
             f"{len(summary['runs'])} runs, seeds {', '.join(map(str, seeds))}. Reconstruction "
             f"on `{summary['split']}` under one uniform evaluation mask (rate "
             f"{number(mask.get('rate'), '.0%')}, seed {mask.get('seed')}), so every run hides "
             f"the same values.", ""]
    finetuned_tasks = _finetuned_tasks(strategies)
    lines += _strategy_table(summary, tasks, finetuned_tasks)
    lines += ["", "Conventions:", *(f"- {k}: {v}." for k, v in summary["conventions"].items())]
    lines += ["- AUROC rows (held_out): " + "; ".join(
        _auroc_rows(t, i) for t, i in summary["tasks"].items())] if tasks else []
    lines += ["- masked MSE: mean over seeds of each run's held_out masked MSE over every lab "
              "(normalized units); convergence: from the validation lines of each run's "
              "metrics.jsonl."]
    lines += _withheld_labs_line(summary)
    lines += [_noise_floor_line(summary.get("seed_noise_floor"))]
    lines += _simple_methods_lines(summary.get("simple_methods"), tasks)
    lines += (_single_code_lines(strategies) + _label_efficiency_lines(strategies, tasks)
              + _per_seed_lines(strategies, tasks, finetuned_tasks)
              + _per_lab_lines(strategies))
    notes = [f"- {s} {t}{suffix}: {d['note']}" for s, e in strategies.items()
             for key, suffix in (("auroc_delta", ""), ("finetuned_auroc_delta", " fine-tuned"))
             for t, d in e.get("vs_random", {}).get(key, {}).items() if d["note"]]
    notes += [f"- {s}: {lab['note']}" for s, e in strategies.items() if s != REFERENCE
              for lab in [e["vs_random"]["reconstruction"]["uniform"]] if "note" in lab]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Figures", "", *(f"![{f}]({f})" for f in figures)]
    return lines


def _strategy_table(summary: dict, tasks: list[str], finetuned_tasks: list[str]) -> list[str]:
    """One row per strategy: masked MSE, the per-lab statistics, AUROC deltas (frozen and
    fine-tuned), convergence and perturbation ratios; ``random`` is the reference row."""
    strategies = summary["strategies"]
    kinds = sorted({k for e in strategies.values() for k in e["perturbation"]})
    header = (["strategy", "seeds", f"masked MSE ({summary['split']})",
               "win rate vs random (n labs)", "Wilcoxon p", "Cohen's d"]
              + [f"AUROC {t}: Δ vs random [95% CI]" for t in tasks]
              + [f"fine-tuned AUROC {t}: Δ vs random [95% CI]" for t in finetuned_tasks]
              + [f"convergence ratio ({summary['validation_split'] or 'no validation'})"]
              + [f"perturbation ratio ({k})" for k in kinds])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for strategy, e in strategies.items():
        cells = [f"`{strategy}`", ",".join(map(str, e["seeds"])), number(e["masked_mse"]["mean"])]
        if strategy == REFERENCE:
            cells += ["reference", "", ""]
            cells += [number(e["auroc"][t]["mean"]) for t in tasks]
            cells += [number(_finetuned_auroc(summary, strategy, t)["mean"])
                      for t in finetuned_tasks]
            cells += ["1 (reference)"]
        else:
            vs = e["vs_random"]
            cells += _lab_cells(vs["reconstruction"]["uniform"])
            cells += [_auroc_cell(e["auroc"][t], vs["auroc_delta"][t]) for t in tasks]
            cells += [_auroc_cell(_finetuned_auroc(summary, strategy, t),
                                  vs["finetuned_auroc_delta"].get(t, _NO_DELTA))
                      for t in finetuned_tasks]
            cells += [_convergence_cell(vs["convergence"])]
        cells += [number(e["perturbation"].get(k, {}).get("mean")) for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _finetuned_tasks(strategies: dict) -> list[str]:
    """Tasks with a fine-tuned AUROC delta vs random for some strategy."""
    return list(dict.fromkeys(t for e in strategies.values()
                              for t in e.get("vs_random", {}).get("finetuned_auroc_delta", {})))


def _finetuned_auroc(summary: dict, strategy: str, task: str) -> dict:
    """The strategy's fine-tuned held_out AUROC over seeds ({"mean", "per_seed"})."""
    downstream = (summary.get("simple_methods") or {}).get("downstream", {}).get(task, {})
    return downstream.get("strategies", {}).get(strategy, {}).get("finetuned", _NONE)


def _seeds_cell(values: dict, fmt: str = ".3f") -> str:
    """Mean over seeds with the range of the seeds' values: "0.812 (0.801-0.820)"."""
    present = [v for v in values["per_seed"].values() if v is not None]
    if values["mean"] is None:
        return "n/a"
    if len(present) < 2:
        return format(values["mean"], fmt)
    return (f"{format(values['mean'], fmt)} ({format(min(present), fmt)} to "
            f"{format(max(present), fmt)})")


def _simple_methods_lines(block: dict | None, tasks: list[str]) -> list[str]:
    """"Beside the simple methods": carry-forward, aggregates, untrained-network and
    from-scratch rows."""
    if not block:
        return []
    lines = ["", "## Beside the simple methods", "",
             "Mean over seeds (range over seeds). Reconstruction on the same held_out values "
             "as above; carry-forward predicts each hidden value by the last visible value of "
             "its code earlier in the window (the code's mean where there is none).", "",
             "| strategy | masked MSE / per-code mean | masked MSE / carry-forward | share of "
             "labs beating carry-forward |", "|---|---:|---:|---:|"]
    for strategy, r in block["reconstruction"].items():
        lines.append(f"| `{strategy}` | {_seeds_cell(r['mse_vs_mean'])} | "
                     f"{_seeds_cell(r['mse_vs_locf'])} | "
                     f"{_seeds_cell(r['labs_beating_locf'], '.2f')} |")
    for task in tasks:
        d = block["downstream"][task]
        lines += ["", f"Held_out AUROC, {task}: the aggregates baseline (as-of per-code "
                  "features of the same events), the probe on the network before pretraining "
                  "and the same network trained from scratch on the label do not depend on the "
                  "masking strategy (the reference's seeds).", ""]
        lines += [f"- aggregates {m.replace('_', ' ')}: {_seeds_cell(v)}"
                  for m, v in d["aggregates"].items()]
        lines += [f"- frozen probe on the untrained network: "
                  f"{_seeds_cell(d.get('untrained', _NONE))}",
                  f"- from scratch (no pretraining): {_seeds_cell(d['scratch'])}", "",
                  "| strategy | frozen probe | probe - untrained | probe - aggregates LR | "
                  "probe - aggregates GBM | probe + aggregates | (probe + aggregates) - "
                  "aggregates | fine-tuned | fine-tuned - scratch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for strategy, r in d["strategies"].items():
            minus = r["probe_minus"]
            lines.append(
                f"| `{strategy}` | {_seeds_cell(r['probe'])} | "
                f"{_seeds_cell(r.get('probe_minus_untrained', _NONE), '+.3f')} | "
                f"{_seeds_cell(minus.get('logistic_regression', _NONE), '+.3f')} | "
                f"{_seeds_cell(minus.get('gradient_boosting', _NONE), '+.3f')} | "
                f"{_seeds_cell(r.get('together', _NONE))} | "
                f"{_seeds_cell(r.get('together_minus_model', _NONE), '+.3f')} | "
                f"{_seeds_cell(r['finetuned'])} | "
                f"{_seeds_cell(r['finetuned_minus_scratch'], '+.3f')} |")
    lines += ["", "Differences are taken per seed on the same rows, then averaged: probe - "
              "untrained and probe - aggregates within each run (its eval/report.md has the "
              "paired bootstrap CIs); probe + aggregates: the probe's and the aggregates "
              "model's log-odds together (that model: the one with the higher tuning AUROC in "
              "that run), minus that model alone; "
              "fine-tuned - scratch against the scratch model of the `random` run with the "
              "same seed (the scratch model does not depend on the strategy, so the study "
              "trains it there only). n/a: not evaluated (fine-tuning off: "
              "config.eval.finetune.enabled=False; the scratch model off: "
              "config.eval.finetune.scratch=False)."]
    return lines


_NONE = dict(mean=None, per_seed={})
_NO_DELTA = dict(delta=None, per_seed={})


def _auroc_rows(task: str, info: dict) -> str:
    if not info["n"]:
        return f"{task}: no predictions files"
    text = (f"{task}: n = {info['n']} shared rows of {info['subjects']} subjects, "
            f"{info['positives']} positive")
    if few_labels(info["n"], info["positives"]):
        text += (f" (fewer than {FEW_LABELS} of a class: a resample without both classes has "
                 "no AUROC and is left out, so its CIs are narrower than the uncertainty; "
                 "read them as anecdotal)")
    return text


def _withheld_labs_line(summary: dict) -> list[str]:
    suppressed = summary.get("suppressed") or {}
    if not suppressed.get("rows"):
        return []
    return [f"- labs in the per-lab statistics (win rate, Wilcoxon p, Cohen's d, the per-lab "
            f"table): {suppressed['rows']} of the {summary.get('labs')} labs are withheld, as "
            "in every run's eval/report.md, for values from fewer than config.data.min_subjects"
            f" = {suppressed['min_subjects']} subjects or fewer hidden values (and codes "
            "constant on train are left out); masked MSE pools every lab."]


def _noise_floor_line(floor: dict | None) -> str:
    if floor is None:
        return (f"- Seed noise floor: needs two `{REFERENCE}` seeds. With one seed a small "
                "Wilcoxon p may be a difference between two trainings, not between strategies; "
                "train several seeds (config.study.seeds) before reading it as an effect.")
    a, b = floor["seeds"]
    if floor.get("note"):
        return f"- Seed noise floor (`{REFERENCE}` seed {b} vs seed {a}): n/a, {floor['note']}."
    win, p, d = _lab_cells(dict(pooled=floor))
    steps = (number(floor["convergence_ratio"], ".2f") if floor.get("convergence_ratio")
             is not None else f"n/a ({floor.get('convergence_reason')})")
    return (f"- **Seed noise floor**: `{REFERENCE}` seed {b} vs `{REFERENCE}` seed {a} (the same "
            f"strategy, another training seed): win rate {win}, Wilcoxon p {p}, Cohen's d {d}, "
            f"convergence ratio {steps}. A strategy's p or ratio is evidence of an effect only "
            "well beyond this and with the same direction in every seed (per-seed table).")


def _convergence_cell(conv: dict) -> str:
    if not conv["n"]:
        return "n/a (no validation lines)"
    reached = f"{conv['n_reached']}/{conv['n']} seeds reach it"
    if conv["median"] is None:
        return f"not reached ({reached})"
    return f"{conv['median']:.2f} ({reached})"


def _lab_cells(lab: dict) -> list[str]:
    if "note" in lab:
        return ["n/a", "n/a", "n/a"]
    p = lab["pooled"]
    return [f"{number(p['win_rate'], '.2f')} ({p['n_labs']})", number(p["wilcoxon_p"], ".3g"),
            number(p["cohens_d"], "+.2f")]


def _auroc_cell(auroc: dict, delta: dict) -> str:
    if delta["delta"] is None:
        return f"{number(auroc['mean'])} (Δ n/a)"
    return (f"{number(auroc['mean'])} (Δ {delta['delta']:+.3f}{_ci(delta['ci'])}"
            f"{'' if delta['ci'] else ', no CI'}; n = {delta['n']})")


def _single_code_lines(strategies: dict) -> list[str]:
    rows = [(s, e["vs_random"]["reconstruction"]["single_code"]) for s, e in strategies.items()
            if s != REFERENCE]
    if not any("pooled" in r for _, r in rows):
        return ["", "Single-code masking (one lab hidden at a time): not in these runs' "
                "eval/metrics.json (off when config.eval.single_code=False, as in "
                "configs/study.py)."]
    lines = ["", "## Single-code masking (one lab hidden at a time, held_out)", "",
             "| strategy | win rate vs random (n labs) | Wilcoxon p | Cohen's d |",
             "|---|---:|---:|---:|"]
    return lines + [f"| `{s}` | " + " | ".join(_lab_cells(r)) + " |" for s, r in rows]


def _label_efficiency_lines(strategies: dict, tasks: list[str]) -> list[str]:
    rows = [(s, t, e["label_efficiency"][t]) for t in tasks for s, e in strategies.items()
            if e["label_efficiency"][t]]
    sizes = list(dict.fromkeys(k for _, _, curve in rows for k in curve))
    if not rows:
        return []
    lines = ["", "## Label efficiency (held_out AUROC of the probe trained on k labels)", "",
             "Mean over the label draws of each run, then over seeds.", "",
             "| task | strategy | " + " | ".join(f"k = {k}" for k in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    return lines + [f"| {t} | `{s}` | " + " | ".join(number(curve.get(k, {}).get("mean"))
                                                    for k in sizes) + " |"
                    for s, t, curve in rows]


def _per_seed_lines(strategies: dict, tasks: list[str], finetuned_tasks: list[str]
                    ) -> list[str]:
    columns = ([f"Δ AUROC {t} [95% CI]" for t in tasks]
               + [f"Δ fine-tuned AUROC {t} [95% CI]" for t in finetuned_tasks])
    lines = ["", "## Per seed (strategy seed s vs random seed s)", "",
             "| strategy | seed | win rate (n labs) | Wilcoxon p | Cohen's d | "
             + "".join(f"{c} | " for c in columns) + "convergence: step / random's step |",
             "|---|---:|---:|---:|---:|" + "---|" * len(columns) + "---|"]
    for s, e in strategies.items():
        if s == REFERENCE:
            continue
        vs = e["vs_random"]
        for seed in map(str, e["seeds"]):
            lab = vs["reconstruction"]["uniform"]
            cells = _lab_cells(dict(pooled=lab["per_seed"][seed]) if "pooled" in lab else lab)
            deltas = ([vs["auroc_delta"][t] for t in tasks]
                      + [vs["finetuned_auroc_delta"].get(t, _NO_DELTA) for t in finetuned_tasks])
            for delta in deltas:
                d = delta["per_seed"].get(seed, _NO_DELTA)
                cells.append("n/a" if d["delta"] is None else f"{d['delta']:+.3f}{_ci(d['ci'])}")
            c = vs["convergence"]["details"][seed]
            cells.append(f"{c['step']} / {c['reference_step']}" if c["ratio"] is not None
                         else f"n/a ({c['reason']})")
            lines.append(f"| `{s}` | {seed} | " + " | ".join(cells) + " |")
    return lines + _rising_reference_lines(strategies)


def _rising_reference_lines(strategies: dict) -> list[str]:
    """A note for the seeds whose random run reached its final validation error before its
    last check (its error rose after): their convergence ratios count steps to a level random
    had passed."""
    rose = {}
    for s, e in strategies.items():
        if s != REFERENCE:
            for seed, c in e["vs_random"]["convergence"]["details"].items():
                if c.get("reference_step") is not None and (
                        c["reference_step"] < (c.get("reference_final_step") or 0)):
                    rose[seed] = (c["reference_step"], c["reference_final_step"])
    if not rose:
        return []
    seeds = "; ".join(f"seed {seed}: step {first} of {last}"
                      for seed, (first, last) in sorted(rose.items()))
    return ["", f"Random's validation error rose after reaching its final level ({seeds}): "
            "there a convergence ratio counts the steps to a level random had passed earlier, "
            "and a strategy ending lower can read slower; compare the final masked MSE too."]


def _per_lab_lines(strategies: dict) -> list[str]:
    """One row per lab (by train CV): each strategy's per-lab difference to random."""
    diffs = {s: {lab["code"]: lab for lab in
                 e["vs_random"]["reconstruction"]["uniform"].get("per_lab", [])}
             for s, e in strategies.items() if s != REFERENCE}
    labs = {code: lab for by_code in diffs.values() for code, lab in by_code.items()}
    if not labs:
        return []
    lines = ["", "## Per lab (held_out, uniform mask)", "",
             "MSE(random) - MSE(strategy) in normalized units, each lab's MSE averaged over the "
             "paired seeds; positive = the strategy reconstructs the lab better.", "",
             "| lab | code | train CV | " + " | ".join(f"Δ `{s}`" for s in diffs) + " |",
             "|---|---|---:|" + "---:|" * len(diffs)]
    for lab in sorted(labs.values(), key=lambda lab: (lab["cv"] is None, lab["cv"] or 0,
                                                       lab["code"])):
        cells = [number(by_code[lab["code"]]["diff"], "+.4f") if lab["code"] in by_code else "n/a"
                 for by_code in diffs.values()]
        lines.append(f"| {markdown_cell(lab['name'])} | `{lab['code']}` | {number(lab['cv'])} | "
                     + " | ".join(cells) + " |")
    return lines
