"""summary.json of ``eval.py --compare``: every strategy against the ``random`` reference.

Pairing: the run of strategy S with seed s is paired with the random run of seed s. Per-lab
statistics pool seeds by averaging each lab's MSE over the paired seeds first, then one test
across labs; AUROC deltas pool seeds by averaging the per-seed deltas, resampled jointly.
"""

from __future__ import annotations

import math

import numpy as np

from cvmae_jax.evaluation import paired_stats
from cvmae_jax.evaluation.compare_yardstick import simple_methods
from cvmae_jax.evaluation.compared_runs import REFERENCE, Run, over_seeds
from cvmae_jax.evaluation.paired_predictions import BOOTSTRAP_SEED, TaskPredictions, task_result
from cvmae_jax.reconstruction import vs_baseline

SUMMARY_FILE = "summary.json"  # written to the workdir of eval.py --compare and the study
LAB_KINDS = ("uniform", "single_code")  # eval/metrics.json: per_code, single_code.per_code
CONVENTIONS = dict(
    lab_difference="per lab code: MSE(random) - MSE(strategy) in normalized units on held_out; "
                   "positive = strategy better; with several seeds each lab's MSE is averaged "
                   "over the paired seeds first, then one test across labs; codes whose held_out "
                   "values all equal their train mean (codes constant on train: nothing to "
                   "reconstruct) are left out",
    win_rate="share of labs (evaluated in both runs) with a positive difference; ties count half",
    wilcoxon="two-sided paired signed-rank test across labs (scipy.stats.wilcoxon, zero "
             "differences dropped); the labs are its samples, so training-seed variance is not "
             "in its p: read it against the seed noise floor below",
    cohens_d="mean / sd (ddof 1) of the per-lab differences; positive = strategy better",
    auroc_delta=f"AUROC(strategy) - AUROC(random) on the same held_out label rows, aligned by "
                f"(subject_id, prediction_time); 95% CI from {paired_stats.NUM_BOOTSTRAP} paired "
                f"bootstrap resamples of subjects, each with all its rows (seed "
                f"{BOOTSTRAP_SEED}); with several seeds the mean delta over seed pairs, each "
                f"resample shared by all of them",
    convergence="steps to reach the paired random run's final validation masked MSE: the "
                "strategy's first validation step at or below it over the random run's own "
                "first step at or below it (eval points only, no interpolation; random vs "
                "itself = 1); < 1 = reaches it sooner; pooled as the median over seeds, a seed "
                "that never reaches it counted as slower than any that does ('not reached' "
                "when that is the median)",
    perturbation="masked MSE with corrupted inputs / clean masked MSE (eval/metrics.json "
                 "perturbation.<kind>.reconstruction.ratio)",
)



def summarize_runs(groups: dict[str, dict[int, Run]]) -> dict:
    """The content of summary.json (docs/evaluation.md, *Reading the report*)."""
    runs = [r for by_seed in groups.values() for r in by_seed.values()]
    reference = groups[REFERENCE]
    tasks = _tasks(runs)
    predictions = {task: TaskPredictions.load(runs, task) for task in tasks}
    finetuned = {task: TaskPredictions.load(runs, task, "finetuned") for task in tasks
                 if any(task_result(r, task, "finetuned") for r in runs)}
    out = dict(_header(runs), strategies={})
    for strategy, by_seed in groups.items():
        entry = _strategy_entry(by_seed, tasks)
        if strategy != REFERENCE:
            pairs = {s: (r, reference[s]) for s, r in by_seed.items()}
            entry["vs_random"] = _vs_random(pairs, predictions, finetuned)
        out["strategies"][strategy] = entry
    out["tasks"] = {t: predictions[t].info() for t in tasks}
    out["seed_noise_floor"] = seed_noise_floor(reference)
    out["simple_methods"] = simple_methods(groups, tasks)
    return out


def _header(runs: list[Run]) -> dict:
    """summary.json's description of what was compared: the reference, the evaluated split and
    mask, the validation split, the bootstrap, the labs evaluated and those withheld from the
    per-lab rows (the same in every run: one split, one evaluation mask), the conventions and
    the runs."""
    first = runs[0].metrics
    return dict(reference=REFERENCE, split=first.get("split"), eval_mask=first.get("eval_mask"),
                validation_split=", ".join(sorted({r.validation_split for r in runs
                                                   if r.validation_split})) or None,
                bootstrap=dict(num=paired_stats.NUM_BOOTSTRAP, seed=BOOTSTRAP_SEED),
                labs=len(first.get("per_code", [])), suppressed=first.get("suppressed"),
                conventions=CONVENTIONS,
                runs=[dict(name=r.name, path=r.path, strategy=r.strategy, seed=r.seed,
                           step=r.metrics.get("step")) for r in runs])


def _strategy_entry(by_seed: dict[int, Run], tasks: list[str]) -> dict:
    """One strategy's own results over its seeds."""
    return dict(seeds=list(by_seed),
                masked_mse=over_seeds({s: r.metrics["overall"]["masked_mse"]
                                       for s, r in by_seed.items()}),
                auroc={t: _auroc_over_seeds(by_seed, t) for t in tasks},
                label_efficiency={t: _label_efficiency(by_seed, t) for t in tasks},
                perturbation=_perturbation(by_seed))


def _vs_random(pairs: dict[int, tuple[Run, Run]], predictions: dict[str, TaskPredictions],
               finetuned: dict[str, TaskPredictions]) -> dict:
    """One strategy against the reference, run by run of the same seed (``pairs``)."""
    return dict(reconstruction={kind: _lab_stats(pairs, kind) for kind in LAB_KINDS},
                auroc_delta={t: predictions[t].delta(pairs) for t in predictions},
                finetuned_auroc_delta={t: finetuned[t].delta(pairs) for t in finetuned},
                convergence=_convergence(pairs))


def seed_noise_floor(reference: dict[int, Run]) -> dict | None:
    """The reference strategy against itself, second seed vs first: what win rate, Wilcoxon p,
    Cohen's d (pooled stats of ``_lab_stats``) and convergence ratio a change of training seed
    alone gives, plus "seeds"; None with fewer than two reference seeds."""
    if len(reference) < 2:
        return None
    first, second = sorted(reference)[:2]
    lab = _lab_stats({second: (reference[second], reference[first])}, "uniform")
    steps = convergence(reference[second].validation, reference[first].validation)
    return dict(lab.get("pooled", {}), seeds=[first, second], note=lab.get("note"),
                convergence_ratio=steps["ratio"], convergence_reason=steps["reason"])


# --- reconstruction per lab ---------------------------------------------------------------

def _per_code(run: Run, kind: str) -> dict[str, dict] | None:
    """code -> per_code row with at least one masked value and a baseline to compare with
    (``vs_baseline``: not a code constant on train, whose errors are ~0 for every model and
    whose sign is noise); None when the kind is absent."""
    block = run.metrics if kind == "uniform" else run.metrics.get(kind)
    if not block or "per_code" not in block:
        return None
    return {r["code"]: r for r in block["per_code"]
            if r.get("num_masked") and ("baseline_mse" not in r or vs_baseline(r) is not None)}


def _lab_stats(pairs: dict[int, tuple[Run, Run]], kind: str) -> dict:
    tables = {s: (_per_code(run, kind), _per_code(ref, kind)) for s, (run, ref) in pairs.items()}
    missing = [run.name for s, pair in pairs.items() for run, table in zip(pair, tables[s])
               if table is None]
    if missing:
        return dict(note=f"no {kind} per-lab results in {', '.join(missing)}")
    per_seed = {}
    for s, (run_t, ref_t) in tables.items():
        codes = sorted(set(run_t) & set(ref_t))
        per_seed[str(s)] = paired_stats.lab_comparison([ref_t[c]["mse"] - run_t[c]["mse"]
                                                 for c in codes])
    common = set.intersection(*(set(a) & set(b) for a, b in tables.values()))
    run_rows, ref_rows = next(iter(tables.values()))
    labs = []
    for code in sorted(common, key=lambda c: (ref_rows[c].get("cv", np.nan), c)):
        run_mse = float(np.mean([a[code]["mse"] for a, _ in tables.values()]))
        ref_mse = float(np.mean([b[code]["mse"] for _, b in tables.values()]))
        labs.append(dict(code=code, name=ref_rows[code]["name"], cv=ref_rows[code].get("cv"),
                         num_masked=ref_rows[code]["num_masked"], random_mse=ref_mse,
                         strategy_mse=run_mse, diff=ref_mse - run_mse,
                         train_mask_prob=run_rows[code].get("train_mask_prob")))
    pooled = paired_stats.lab_comparison([lab["diff"] for lab in labs])
    return dict(pooled=pooled, per_seed=per_seed, per_lab=labs)


# --- downstream ---------------------------------------------------------------------------

def _tasks(runs: list[Run]) -> list[str]:
    """Tasks evaluated in every run, in the reference's order."""
    names = [list(r.metrics.get("downstream", {}).get("tasks", {})) for r in runs]
    return [t for t in names[0] if all(t in n for n in names[1:])]


def _auroc_over_seeds(by_seed: dict[int, Run], task: str) -> dict:
    per_seed = {s: r.metrics["downstream"]["tasks"][task] for s, r in by_seed.items()}
    out = over_seeds({s: t.get("auroc") for s, t in per_seed.items()})
    out["ci_per_seed"] = {str(s): t.get("auroc_ci") for s, t in per_seed.items()}
    out["n_per_seed"] = {str(s): t.get("n") for s, t in per_seed.items()}
    return out


def _label_efficiency(by_seed: dict[int, Run], task: str) -> dict:
    """Training-set size -> the probe's held_out AUROC (mean over draws) over seeds; {} when
    eval.py wrote no label-efficiency curve."""
    curves = {s: r.metrics["downstream"]["tasks"][task].get("label_efficiency") or {}
              for s, r in by_seed.items()}
    sizes = list(dict.fromkeys(k for c in curves.values() for k in c))
    return {k: over_seeds({s: c.get(k, {}).get("auroc_mean") for s, c in curves.items()})
            for k in sizes}

# --- convergence and perturbation -----------------------------------------------------------

def _convergence(pairs: dict[int, tuple[Run, Run]]) -> dict:
    """Per seed pair `convergence`, pooled as the median ratio over the pairs with validation
    lines, a seed that never reaches the target counted as slower than any that does (so a
    strategy is not scored on its reaching seeds alone; None when the median is such a seed)."""
    per_seed = {str(s): convergence(run.validation, ref.validation)
                for s, (run, ref) in pairs.items()}
    measured = [v for v in per_seed.values() if v["reference_step"] is not None]
    ratios = [math.inf if v["ratio"] is None else v["ratio"] for v in measured]
    median = float(np.median(ratios)) if ratios else None
    return dict(median=median if median is not None and math.isfinite(median) else None,
                n_reached=sum(v["ratio"] is not None for v in measured), n=len(measured),
                details=per_seed)


def convergence(curve: list[tuple[int, float]], reference: list[tuple[int, float]]) -> dict:
    """Steps to reach the reference's final validation masked MSE (the target): the first eval
    step of ``curve`` at or below it, over the reference's own first eval step at or below it
    (eval points only, no interpolation). A run against itself gives 1; < 1 = sooner. Ratio
    None with a reason when ``curve`` never reaches the target (or a curve is empty).
    ``reference_final_step``: the reference's last eval step; a ``reference_step`` before it
    means the reference's error rose after reaching its final level."""
    out = dict(step=None, reference_step=None, reference_final_step=None,
               target_masked_mse=None, ratio=None, reason=None)
    if not reference or not curve:
        out["reason"] = "no validation lines in metrics.jsonl" + (
            " of the random run" if not reference else "")
        return out
    out["reference_final_step"], target = reference[-1]
    out["target_masked_mse"] = target
    out["reference_step"] = next((s for s, mse in reference if mse <= target), None)
    if out["reference_step"] is None:  # NaN
        out["reason"] = f"the random run's final validation masked MSE is {target}"
        return out
    step = next((s for s, mse in curve if mse <= target), None)
    if step is None:
        best_step, best = min(curve, key=lambda point: point[1])
        out["reason"] = (f"never reached {target:.4g} in {curve[-1][0]} steps "
                         f"(best {best:.4g}, at step {best_step})")
        return out
    out["step"], out["ratio"] = step, step / out["reference_step"]
    return out


def _perturbation(by_seed: dict[int, Run]) -> dict:
    """kind -> reconstruction ratio (and downstream AUROC ratio per task) over seeds."""
    blocks = {s: r.metrics.get("perturbation") or {} for s, r in by_seed.items()}
    kinds = sorted({k for b in blocks.values() for k, v in b.items() if isinstance(v, dict)})
    out = {}
    for kind in kinds:
        entry = over_seeds({s: b.get(kind, {}).get("reconstruction", {}).get("ratio")
                             for s, b in blocks.items()})
        tasks = sorted({t for b in blocks.values() for t in b.get(kind, {}).get("downstream",
                                                                                 {})})
        entry["auroc_ratio"] = {
            t: over_seeds({s: b.get(kind, {}).get("downstream", {}).get(t, {})
                            .get("auroc_ratio") for s, b in blocks.items()}) for t in tasks}
        out[kind] = entry
    return out
