"""``python eval.py --compare=RUN_A,RUN_B,... --workdir=OUT``: every masking strategy against
the ``random`` reference, from each run's ``eval/metrics.json``, ``metrics.jsonl`` and held-out
predictions. Writes ``OUT/summary.json``, ``OUT/report.md`` and three PNGs.

Pairing: the run of strategy S with seed s is paired with the random run of seed s. Per-lab
statistics pool seeds by averaging each lab's MSE over the paired seeds first, then one test
across labs; AUROC deltas pool seeds by averaging the per-seed deltas, resampled jointly.
Outputs hold aggregates only, never subject ids.
"""

from __future__ import annotations

import dataclasses
import json
import os

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging
from sklearn.metrics import roc_auc_score

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cvmae_jax.evaluation import stats  # noqa: E402
from cvmae_jax.jsonio import write_json_atomic  # noqa: E402
from cvmae_jax.masking import STRATEGIES  # noqa: E402

REFERENCE = "random"
BOOTSTRAP_SEED = 0
LAB_KINDS = ("uniform", "single_code")  # eval/metrics.json: per_code, single_code.per_code
CONVENTIONS = dict(
    lab_difference="per lab code: MSE(random) - MSE(strategy) in normalized units on held_out; "
                   "positive = strategy better; with several seeds each lab's MSE is averaged "
                   "over the paired seeds first, then one test across labs",
    win_rate="share of labs (evaluated in both runs) with a positive difference; ties count half",
    wilcoxon="two-sided paired signed-rank test across labs (scipy.stats.wilcoxon, zero "
             "differences dropped); the labs are its samples, so training-seed variance is not "
             "in its p: read it against the seed noise floor below",
    cohens_d="mean / sd (ddof 1) of the per-lab differences; positive = strategy better",
    auroc_delta=f"AUROC(strategy) - AUROC(random) on the same held_out label rows, aligned by "
                f"(subject_id, prediction_time); 95% CI from {stats.NUM_BOOTSTRAP} paired "
                f"bootstrap resamples of rows (seed {BOOTSTRAP_SEED}); with several seeds the "
                f"mean delta over seed pairs, each resample shared by all of them",
    convergence="first validation step (eval points only, no interpolation) whose masked MSE is "
                "<= the paired random run's final validation masked MSE, divided by that "
                "random run's final step; < 1 = reaches it sooner",
    perturbation="masked MSE with corrupted inputs / clean masked MSE (eval/metrics.json "
                 "perturbation.<kind>.reconstruction.ratio)",
)


@dataclasses.dataclass
class Run:
    path: str
    strategy: str
    seed: int
    metrics: dict  # eval/metrics.json
    validation: list[tuple[int, float]]  # (step, masked_mse) of metrics.jsonl, one per step
    validation_split: str | None  # the split of those lines (config.eval.split)

    @property
    def name(self) -> str:
        return f"{self.strategy}_s{self.seed}"


def compare_runs(paths, workdir: str) -> dict:
    """Compares the runs in ``paths`` (training workdirs already evaluated by ``eval.py``)
    and writes the summary, report and plots to ``workdir``. Returns the summary."""
    runs = [load_run(p) for p in paths]
    groups = group_runs(runs)
    summary = summarize(groups)
    os.makedirs(workdir, exist_ok=True)
    figures = _plot_all(groups, summary, workdir)
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(report_lines(summary, figures)) + "\n")
    logging.info("compared %d runs (%s); wrote %s", len(runs), ", ".join(groups), workdir)
    return summary


def load_run(path: str) -> Run:
    metrics_path = os.path.join(path, "eval", "metrics.json")
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"{path}: no eval/metrics.json; run `python eval.py "
                                f"--workdir={path}` first")
    metrics = _read_json(metrics_path)
    seed = int(_read_json(os.path.join(path, "config.json"))["seed"])
    return Run(path, metrics["strategy"], seed, metrics, *_validation_curve(path))


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; is {os.path.dirname(path)} an evaluated "
                                f"training workdir?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _validation_curve(path: str) -> tuple[list[tuple[int, float]], str | None]:
    """Validation (masked MSE by step) of metrics.jsonl and its split; a step logged twice
    (after a resume) keeps its last line."""
    by_step, split = {}, None
    jsonl = os.path.join(path, "metrics.jsonl")
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{jsonl}:{number}: not valid JSON ({e})") from None
                if "split" in record:
                    by_step[int(record["step"])] = float(record["masked_mse"])
                    split = record["split"]
    return sorted(by_step.items()), split


def group_runs(runs: list[Run]) -> dict[str, dict[int, Run]]:
    """strategy -> seed -> run, reference first; refuses what cannot be paired."""
    groups: dict[str, dict[int, Run]] = {}
    for run in runs:
        other = groups.setdefault(run.strategy, {}).get(run.seed)
        if other:
            raise ValueError(f"{other.path} and {run.path} are both strategy {run.strategy!r} "
                             f"seed {run.seed}; pass each (strategy, seed) once")
        groups[run.strategy][run.seed] = run
    if REFERENCE not in groups:
        raise ValueError(f"no {REFERENCE!r} run among --compare (strategies: "
                         f"{', '.join(sorted(groups))}); the comparison needs the random "
                         f"reference")
    for key in ("split", "eval_mask"):
        values = {json.dumps(r.metrics.get(key), sort_keys=True): r.path for r in runs}
        if len(values) > 1:
            raise ValueError(f"runs evaluated with different {key}: " + "; ".join(
                f"{path}: {value}" for value, path in values.items()))
    for strategy, by_seed in groups.items():
        for seed, run in by_seed.items():
            if seed not in groups[REFERENCE]:
                raise ValueError(f"{run.path} ({strategy}, seed {seed}) has no {REFERENCE} run "
                                 f"with seed {seed} to pair with (random seeds: "
                                 f"{sorted(groups[REFERENCE])})")
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return {s: dict(sorted(groups[s].items()))
            for s in sorted(groups, key=lambda s: (order.get(s, len(order)), s))}


def summarize(groups: dict[str, dict[int, Run]]) -> dict:
    """The content of summary.json (see the README's study section)."""
    runs = [r for by_seed in groups.values() for r in by_seed.values()]
    reference = groups[REFERENCE]
    tasks = _tasks(runs)
    predictions = {task: TaskPredictions.load(runs, task) for task in tasks}
    first = runs[0].metrics
    out = dict(reference=REFERENCE, split=first.get("split"), eval_mask=first.get("eval_mask"),
               validation_split=", ".join(sorted({r.validation_split for r in runs
                                                  if r.validation_split})) or None,
               bootstrap=dict(num=stats.NUM_BOOTSTRAP, seed=BOOTSTRAP_SEED),
               conventions=CONVENTIONS,
               runs=[dict(name=r.name, path=r.path, strategy=r.strategy, seed=r.seed,
                          step=r.metrics.get("step")) for r in runs],
               strategies={})
    for strategy, by_seed in groups.items():
        entry = dict(seeds=list(by_seed),
                     masked_mse=_over_seeds({s: r.metrics["overall"]["masked_mse"]
                                             for s, r in by_seed.items()}),
                     auroc={t: _auroc_over_seeds(by_seed, t) for t in tasks},
                     label_efficiency={t: _label_efficiency(by_seed, t) for t in tasks},
                     perturbation=_perturbation(by_seed))
        if strategy != REFERENCE:
            pairs = {s: (r, reference[s]) for s, r in by_seed.items()}
            entry["vs_random"] = dict(
                reconstruction={kind: _lab_stats(pairs, kind) for kind in LAB_KINDS},
                auroc_delta={t: predictions[t].delta(pairs) for t in tasks},
                convergence=_convergence(pairs))
        out["strategies"][strategy] = entry
    out["tasks"] = {t: predictions[t].info() for t in tasks}
    out["seed_noise_floor"] = seed_noise_floor(reference)
    return out


def seed_noise_floor(reference: dict[int, Run]) -> dict | None:
    """The across-lab comparison of the reference strategy with itself, first seed vs second:
    what win rate, Wilcoxon p and Cohen's d a change of training seed alone gives (pooled
    stats of ``_lab_stats`` plus "seeds"); None with fewer than two reference seeds."""
    if len(reference) < 2:
        return None
    first, second = sorted(reference)[:2]
    lab = _lab_stats({second: (reference[second], reference[first])}, "uniform")
    return dict(lab.get("pooled", {}), seeds=[first, second], note=lab.get("note"))


def _over_seeds(values: dict[int, float | None]) -> dict:
    """{"mean" over the seeds with a value, "n" of them, "per_seed"}."""
    present = [v for v in values.values() if v is not None]
    return dict(mean=float(np.mean(present)) if present else None, n=len(present),
                per_seed={str(s): v for s, v in values.items()})


# --- reconstruction per lab ---------------------------------------------------------------

def _per_code(run: Run, kind: str) -> dict[str, dict] | None:
    """code -> per_code row with at least one masked value; None when the kind is absent."""
    block = run.metrics if kind == "uniform" else run.metrics.get(kind)
    if not block or "per_code" not in block:
        return None
    return {r["code"]: r for r in block["per_code"] if r.get("num_masked")}


def _lab_stats(pairs: dict[int, tuple[Run, Run]], kind: str) -> dict:
    tables = {s: (_per_code(run, kind), _per_code(ref, kind)) for s, (run, ref) in pairs.items()}
    missing = [run.name for s, pair in pairs.items() for run, table in zip(pair, tables[s])
               if table is None]
    if missing:
        return dict(note=f"no {kind} per-lab results in {', '.join(missing)}")
    per_seed = {}
    for s, (run_t, ref_t) in tables.items():
        codes = sorted(set(run_t) & set(ref_t))
        per_seed[str(s)] = stats.lab_comparison([ref_t[c]["mse"] - run_t[c]["mse"]
                                                 for c in codes])
    common = set.intersection(*(set(a) & set(b) for a, b in tables.values()))
    ref_rows = next(iter(tables.values()))[1]
    labs = []
    for code in sorted(common, key=lambda c: (ref_rows[c].get("cv", np.nan), c)):
        run_mse = float(np.mean([a[code]["mse"] for a, _ in tables.values()]))
        ref_mse = float(np.mean([b[code]["mse"] for _, b in tables.values()]))
        labs.append(dict(code=code, cv=ref_rows[code].get("cv"),
                         num_masked=ref_rows[code]["num_masked"], random_mse=ref_mse,
                         strategy_mse=run_mse, diff=ref_mse - run_mse))
    pooled = stats.lab_comparison([lab["diff"] for lab in labs])
    return dict(pooled=pooled, per_seed=per_seed, per_lab=labs)


# --- downstream ---------------------------------------------------------------------------

def _tasks(runs: list[Run]) -> list[str]:
    """Tasks evaluated in every run, in the reference's order."""
    names = [list(r.metrics.get("downstream", {}).get("tasks", {})) for r in runs]
    return [t for t in names[0] if all(t in n for n in names[1:])]


def _auroc_over_seeds(by_seed: dict[int, Run], task: str) -> dict:
    per_seed = {s: r.metrics["downstream"]["tasks"][task] for s, r in by_seed.items()}
    out = _over_seeds({s: t.get("auroc") for s, t in per_seed.items()})
    out["ci_per_seed"] = {str(s): t.get("auroc_ci") for s, t in per_seed.items()}
    out["n_per_seed"] = {str(s): t.get("n") for s, t in per_seed.items()}
    return out


def _label_efficiency(by_seed: dict[int, Run], task: str) -> dict:
    """Training-set size -> the probe's held_out AUROC (mean over draws) over seeds; {} when
    eval.py wrote no label-efficiency curve."""
    curves = {s: r.metrics["downstream"]["tasks"][task].get("label_efficiency") or {}
              for s, r in by_seed.items()}
    sizes = list(dict.fromkeys(k for c in curves.values() for k in c))
    return {k: _over_seeds({s: c.get(k, {}).get("auroc_mean") for s, c in curves.items()})
            for k in sizes}


class TaskPredictions:
    """One task's held_out predictions of every run that has them, aligned on the rows all
    of those runs share, with each run's AUROC on every bootstrap resample of those rows."""

    def __init__(self, task: str, labels, scores: dict[str, np.ndarray], missing: list[str],
                 dropped: dict[str, int]):
        self.task, self.labels, self.scores = task, labels, scores
        self.missing, self.dropped = missing, dropped
        self.indices = stats.bootstrap_indices(len(labels), BOOTSTRAP_SEED)
        self._resampled: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, runs: list[Run], task: str) -> "TaskPredictions":
        tables, missing = {}, []
        for run in runs:
            path = os.path.join(run.path, "eval", "predictions", task, "held_out.parquet")
            if os.path.exists(path):
                tables[run.name] = _read_predictions(path)
            else:
                missing.append(run.name)
        keys = sorted(set.intersection(*(set(t) for t in tables.values()))) if tables else []
        labels, scores = None, {}
        for name, table in tables.items():
            rows = np.array([table[k] for k in keys]).reshape(-1, 2)
            if labels is None:
                labels = rows[:, 0].astype(bool)
            elif (rows[:, 0].astype(bool) != labels).any():
                raise ValueError(f"task {task}: the held_out labels of {name} differ from "
                                 f"another run's on {(rows[:, 0].astype(bool) != labels).sum()} "
                                 f"shared rows; were the runs evaluated on the same data?")
            scores[name] = rows[:, 1]
        dropped = {name: len(t) - len(keys) for name, t in tables.items()}
        return cls(task, labels if labels is not None else np.zeros(0, bool), scores, missing,
                   dropped)

    def info(self) -> dict:
        return dict(n=int(len(self.labels)), positives=int(self.labels.sum()),
                    runs_with_predictions=sorted(self.scores), runs_without=self.missing,
                    rows_not_shared=self.dropped)

    def _auroc(self, name: str) -> tuple[float, np.ndarray]:
        if name not in self._resampled:
            self._resampled[name] = stats.resampled_aurocs(self.labels, self.scores[name],
                                                           self.indices)
        return float(roc_auc_score(self.labels, self.scores[name])), self._resampled[name]

    def delta(self, pairs: dict[int, tuple[Run, Run]]) -> dict:
        """Mean AUROC delta over the seed pairs with a paired-bootstrap 95% CI, and per seed;
        from eval/metrics.json without a CI when a run lacks predictions."""
        names = [r.name for pair in pairs.values() for r in pair]
        if any(n not in self.scores for n in names) or np.unique(self.labels).size < 2:
            return self._delta_without_ci(pairs)
        per_seed, resampled = {}, []
        for s, (run, ref) in pairs.items():
            (auc, run_b), (ref_auc, ref_b) = self._auroc(run.name), self._auroc(ref.name)
            resampled.append(run_b - ref_b)
            per_seed[str(s)] = dict(auroc=auc, random_auroc=ref_auc, delta=auc - ref_auc,
                                    ci=stats.percentile_ci(run_b - ref_b))
        deltas = [v["delta"] for v in per_seed.values()]
        return dict(delta=float(np.mean(deltas)), ci=stats.percentile_ci(np.mean(resampled, 0)),
                    n=int(len(self.labels)), positives=int(self.labels.sum()), split="held_out",
                    seeds=list(pairs), per_seed=per_seed, method="paired bootstrap", note=None)

    def _delta_without_ci(self, pairs: dict[int, tuple[Run, Run]]) -> dict:
        per_seed = {}
        for s, (run, ref) in pairs.items():
            auc, ref_auc = (r.metrics["downstream"]["tasks"][self.task].get("auroc")
                            for r in (run, ref))
            per_seed[str(s)] = dict(auroc=auc, random_auroc=ref_auc, ci=None,
                                    delta=None if None in (auc, ref_auc) else auc - ref_auc)
        deltas = [v["delta"] for v in per_seed.values() if v["delta"] is not None]
        lacking = [r.name for pair in pairs.values() for r in pair if r.name not in self.scores]
        note = (f"no held_out predictions for {', '.join(lacking)}" if lacking else
                f"the {len(self.labels)} held_out rows shared by the runs' predictions hold "
                f"one class") + (": AUROCs from eval/metrics.json, no CI" if deltas else
                                 ": no AUROC (eval/metrics.json has none either)")
        n = [r.metrics["downstream"]["tasks"][self.task].get("n") for r, _ in pairs.values()]
        return dict(delta=float(np.mean(deltas)) if deltas else None, ci=None,
                    n=n[0] if len(set(n)) == 1 else n, positives=None, split="held_out",
                    seeds=list(pairs), per_seed=per_seed, method="difference of AUROCs",
                    note=note)


def _read_predictions(path: str) -> dict[tuple[int, int, int], tuple[bool, float]]:
    """(subject_id, prediction_time as int64, occurrence) -> (boolean_value, probability); a
    repeated (subject_id, prediction_time) pairs by its order in the file (occurrence 0, 1..),
    which is the label files' order in every run."""
    try:
        table = pq.read_table(path, columns=["subject_id", "prediction_time", "boolean_value",
                                             "predicted_boolean_probability"])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise ValueError(f"{path}: unreadable predictions ({e})") from None
    seen: dict[tuple[int, int], int] = {}
    out = {}
    for subject, time, label, prob in zip(
            table["subject_id"].to_pylist(),
            pc.cast(table["prediction_time"], pa.int64()).to_pylist(),
            table["boolean_value"].to_pylist(),
            table["predicted_boolean_probability"].to_pylist()):
        occurrence = seen[subject, time] = seen.get((subject, time), -1) + 1
        out[subject, time, occurrence] = (label, prob)
    return out


# --- convergence and perturbation -----------------------------------------------------------

def _convergence(pairs: dict[int, tuple[Run, Run]]) -> dict:
    per_seed = {str(s): convergence(run.validation, ref.validation)
                for s, (run, ref) in pairs.items()}
    out = _over_seeds({s: v["ratio"] for s, v in per_seed.items()})
    out["details"] = per_seed
    return out


def convergence(curve: list[tuple[int, float]], reference: list[tuple[int, float]]) -> dict:
    """First eval step of ``curve`` at or below the reference's final validation masked MSE,
    and its ratio to the reference's final step (None with a reason when never reached)."""
    out = dict(step=None, reference_final_step=None, target_masked_mse=None, ratio=None,
               reason=None)
    if not reference or not curve:
        out["reason"] = "no validation lines in metrics.jsonl" + (
            " of the random run" if not reference else "")
        return out
    out["reference_final_step"], out["target_masked_mse"] = reference[-1]
    step = next((s for s, mse in curve if mse <= out["target_masked_mse"]), None)
    if step is None:
        best_step, best = min(curve, key=lambda point: point[1])
        out["reason"] = (f"never reached {out['target_masked_mse']:.4g} in {curve[-1][0]} steps "
                         f"(best {best:.4g}, at step {best_step})")
        return out
    out["step"], out["ratio"] = step, step / out["reference_final_step"]
    return out


def _perturbation(by_seed: dict[int, Run]) -> dict:
    """kind -> reconstruction ratio (and downstream AUROC ratio per task) over seeds."""
    blocks = {s: r.metrics.get("perturbation") or {} for s, r in by_seed.items()}
    kinds = sorted({k for b in blocks.values() for k, v in b.items() if isinstance(v, dict)})
    out = {}
    for kind in kinds:
        entry = _over_seeds({s: b.get(kind, {}).get("reconstruction", {}).get("ratio")
                             for s, b in blocks.items()})
        tasks = sorted({t for b in blocks.values() for t in b.get(kind, {}).get("downstream",
                                                                                 {})})
        entry["auroc_ratio"] = {
            t: _over_seeds({s: b.get(kind, {}).get("downstream", {}).get(t, {})
                            .get("auroc_ratio") for s, b in blocks.items()}) for t in tasks}
        out[kind] = entry
    return out


# --- report ---------------------------------------------------------------------------------

def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ci(ci) -> str:
    return f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def report_lines(summary: dict, figures: list[str]) -> list[str]:
    strategies = summary["strategies"]
    tasks = list(summary["tasks"])
    kinds = sorted({k for e in strategies.values() for k in e["perturbation"]})
    seeds = sorted({s for e in strategies.values() for s in e["seeds"]})
    mask = summary.get("eval_mask") or {}
    lines = [f"# Masking strategies vs `{REFERENCE}`", "",
             f"{len(summary['runs'])} runs, seeds {', '.join(map(str, seeds))}. Reconstruction "
             f"on `{summary['split']}` under one uniform evaluation mask (rate "
             f"{_num(mask.get('rate'), '.0%')}, seed {mask.get('seed')}), so every run hides "
             f"the same values.", ""]
    header = (["strategy", "seeds", f"masked MSE ({summary['split']})",
               "win rate vs random (n labs)", "Wilcoxon p", "Cohen's d"]
              + [f"AUROC {t}: Δ vs random [95% CI]" for t in tasks]
              + [f"convergence ratio ({summary['validation_split'] or 'no validation'})"]
              + [f"perturbation ratio ({k})" for k in kinds])
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for strategy, e in strategies.items():
        cells = [f"`{strategy}`", ",".join(map(str, e["seeds"])), _num(e["masked_mse"]["mean"])]
        if strategy == REFERENCE:
            cells += ["reference", "", ""]
            cells += [_num(e["auroc"][t]["mean"]) for t in tasks]
            cells += ["1 (reference)"]
        else:
            vs = e["vs_random"]
            cells += _lab_cells(vs["reconstruction"]["uniform"])
            cells += [_auroc_cell(e["auroc"][t], vs["auroc_delta"][t]) for t in tasks]
            conv = vs["convergence"]
            cells += [f"{_num(conv['mean'], '.2f')} ({conv['n']}/{len(e['seeds'])} seeds)"]
        cells += [_num(e["perturbation"].get(k, {}).get("mean")) for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Conventions:", *(f"- {k}: {v}." for k, v in summary["conventions"].items())]
    lines += ["- AUROC rows (held_out): " + "; ".join(
        f"{t}: n = {i['n']} shared rows, {i['positives']} positive" if i["n"] else
        f"{t}: no predictions files" for t, i in summary["tasks"].items())] if tasks else []
    lines += ["- masked MSE: mean over seeds of each run's held_out masked MSE (normalized "
              "units); convergence: from the validation lines of each run's metrics.jsonl."]
    lines += [_noise_floor_line(summary.get("seed_noise_floor"))]
    lines += (_single_code_lines(strategies) + _label_efficiency_lines(strategies, tasks)
              + _per_seed_lines(strategies, tasks))
    notes = [f"- {s} {t}: {d['note']}" for s, e in strategies.items()
             for t, d in e.get("vs_random", {}).get("auroc_delta", {}).items() if d["note"]]
    notes += [f"- {s}: {lab['note']}" for s, e in strategies.items() if s != REFERENCE
              for lab in [e["vs_random"]["reconstruction"]["uniform"]] if "note" in lab]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Figures", "", *(f"![{f}]({f})" for f in figures)]
    return lines


def _noise_floor_line(floor: dict | None) -> str:
    if floor is None:
        return (f"- Seed noise floor: needs two `{REFERENCE}` seeds. With one seed a small "
                "Wilcoxon p may be a difference between two trainings, not between strategies; "
                "train several seeds (config.study.seeds) before reading it as an effect.")
    a, b = floor["seeds"]
    if floor.get("note"):
        return f"- Seed noise floor (`{REFERENCE}` seed {b} vs seed {a}): n/a, {floor['note']}."
    win, p, d = _lab_cells(dict(pooled=floor))
    return (f"- **Seed noise floor**: `{REFERENCE}` seed {b} vs `{REFERENCE}` seed {a} (the same "
            f"strategy, another training seed): win rate {win}, Wilcoxon p {p}, Cohen's d {d}. "
            "A strategy's p is evidence of an effect only well below this and with the same "
            "direction in every seed (per-seed table).")


def _lab_cells(lab: dict) -> list[str]:
    if "note" in lab:
        return ["n/a", "n/a", "n/a"]
    p = lab["pooled"]
    return [f"{_num(p['win_rate'], '.2f')} ({p['n_labs']})", _num(p["wilcoxon_p"], ".3g"),
            _num(p["cohens_d"], "+.2f")]


def _auroc_cell(auroc: dict, delta: dict) -> str:
    if delta["delta"] is None:
        return f"{_num(auroc['mean'])} (Δ n/a)"
    return (f"{_num(auroc['mean'])} (Δ {delta['delta']:+.3f}{_ci(delta['ci'])}"
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
    return lines + [f"| {t} | `{s}` | " + " | ".join(_num(curve.get(k, {}).get("mean"))
                                                    for k in sizes) + " |"
                    for s, t, curve in rows]


def _per_seed_lines(strategies: dict, tasks: list[str]) -> list[str]:
    lines = ["", "## Per seed (strategy seed s vs random seed s)", "",
             "| strategy | seed | win rate (n labs) | Wilcoxon p | Cohen's d | "
             + " | ".join(f"Δ AUROC {t} [95% CI]" for t in tasks)
             + (" | " if tasks else "") + "convergence step / random final step |",
             "|---|---:|---:|---:|---:|" + "---|" * len(tasks) + "---|"]
    for s, e in strategies.items():
        if s == REFERENCE:
            continue
        vs = e["vs_random"]
        for seed in map(str, e["seeds"]):
            lab = vs["reconstruction"]["uniform"]
            cells = _lab_cells(dict(pooled=lab["per_seed"][seed]) if "pooled" in lab else lab)
            for t in tasks:
                d = vs["auroc_delta"][t]["per_seed"][seed]
                cells.append("n/a" if d["delta"] is None else f"{d['delta']:+.3f}{_ci(d['ci'])}")
            c = vs["convergence"]["details"][seed]
            cells.append(f"{c['step']} / {c['reference_final_step']}" if c["ratio"] is not None
                         else f"n/a ({c['reason']})")
            lines.append(f"| `{s}` | {seed} | " + " | ".join(cells) + " |")
    return lines


# --- plots ----------------------------------------------------------------------------------

def _plot_all(groups: dict[str, dict[int, Run]], summary: dict, workdir: str) -> list[str]:
    figures = []
    for name, plot in (("validation_curves.png", _plot_validation),
                       ("lab_difference_by_cv.png", _plot_lab_differences),
                       ("auroc_by_task.png", _plot_aurocs)):
        fig = plot(groups, summary)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(os.path.join(workdir, name), dpi=120)
            plt.close(fig)
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
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 2.6 * len(rows) + 1), squeeze=False)
    threshold = next(iter(groups[REFERENCE].values())).metrics.get("cv_threshold")
    for ax, (strategy, labs) in zip(axes[:, 0], rows):
        diff = [lab["diff"] for lab in labs]
        ax.bar(range(len(labs)), diff, color=["tab:green" if d > 0 else "tab:red" for d in diff])
        ax.axhline(0, color="black", lw=0.8)
        if threshold is not None:  # eval/metrics.json from before the field: no line
            low = sum(lab["cv"] is not None and lab["cv"] <= threshold for lab in labs)
            ax.axvline(low - 0.5, color="gray", ls="--", lw=0.8,
                       label=f"CV {threshold:.3g}: right of it the high tier")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(range(len(labs)), [lab["code"] for lab in labs], rotation=90, fontsize=6)
        ax.set_ylabel(f"MSE(random) - MSE({strategy})", fontsize=8)
        ax.set_title(f"{strategy} vs random per lab (held_out), labs sorted by train CV; "
                     f"green: {strategy} better", fontsize=9)
    return fig


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
        ax.set_title(f"{task}: held_out AUROC, 95% CI per run", fontsize=9)
        ax.set_ylabel("AUROC")
    return fig
