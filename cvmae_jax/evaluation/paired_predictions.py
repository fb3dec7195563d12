"""One downstream task's held_out predictions across runs, aligned on shared label rows, with
paired-bootstrap AUROC deltas between runs (resampling subjects, each with all its rows)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation import paired_stats
from cvmae_jax.evaluation.compared_runs import Run
from cvmae_jax.workdir import eval_dir

BOOTSTRAP_SEED = 0
# model -> (eval/ folder of its held_out predictions, its block in downstream.tasks[task])
MODELS = dict(probe=("predictions", ()), finetuned=("predictions_pretrained",
                                                     ("finetune", "pretrained")))


def task_result(run: Run, task: str, model: str) -> dict:
    """The ``model``'s held_out result for ``task`` in the run's eval/metrics.json ({} when the
    run has none, e.g. fine-tuning off)."""
    block = run.metrics["downstream"]["tasks"][task]
    for key in MODELS[model][1]:
        block = block.get(key) or {}
    return block


class TaskPredictions:
    """One task's held_out predictions by one model (``MODELS``: the frozen probe or the
    fine-tuned classifier) of every run that has them, aligned on the rows all of those runs
    share, with each run's AUROC on every bootstrap resample of those rows."""

    def __init__(self, task: str, model: str, labels, subjects, scores: dict[str, np.ndarray],
                 missing: list[str]):
        self.task, self.model, self.labels, self.scores = task, model, labels, scores
        self.missing = missing
        self.bootstrap = paired_stats.SubjectBootstrap(subjects, BOOTSTRAP_SEED)
        self._resampled: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, runs: list[Run], task: str, model: str = "probe") -> "TaskPredictions":
        tables, missing = {}, []
        for run in runs:
            path = os.path.join(eval_dir(run.path), MODELS[model][0], task, "held_out.parquet")
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
        if any(dropped.values()):
            raise ValueError(f"task {task}: the runs' held_out label rows differ ({len(keys)} "
                             "shared; " + ", ".join(f"{name} has {n} others"
                                                   for name, n in dropped.items() if n)
                             + "); evaluate them with the same config.eval.labels_dir")
        return cls(task, model, labels if labels is not None else np.zeros(0, bool),
                   [subject for subject, _, _ in keys], scores, missing)

    def info(self) -> dict:
        return dict(n=int(len(self.labels)), positives=int(self.labels.sum()),
                    subjects=self.bootstrap.n_subjects,
                    runs_with_predictions=sorted(self.scores), runs_without=self.missing)

    def _auroc(self, name: str) -> tuple[float, np.ndarray]:
        if name not in self._resampled:
            self._resampled[name] = paired_stats.resampled_aurocs(
                self.labels, self.scores[name], self.bootstrap)
        return float(roc_auc_score(self.labels, self.scores[name])), self._resampled[name]

    def delta(self, pairs: dict[int, tuple[Run, Run]]) -> dict:
        """Mean AUROC delta over the seed pairs with a paired-bootstrap 95% CI, and per seed;
        from eval/metrics.json without a CI when a run lacks predictions."""
        names = [r.name for pair in pairs.values() for r in pair]
        if any(n not in self.scores for n in names) or paired_stats.one_class(self.labels):
            return self._delta_without_ci(pairs)
        per_seed, resampled = {}, []
        for s, (run, ref) in pairs.items():
            (auc, run_b), (ref_auc, ref_b) = self._auroc(run.name), self._auroc(ref.name)
            resampled.append(run_b - ref_b)
            per_seed[str(s)] = dict(auroc=auc, random_auroc=ref_auc, delta=auc - ref_auc,
                                    ci=paired_stats.percentile_ci(run_b - ref_b))
        deltas = [v["delta"] for v in per_seed.values()]
        return dict(delta=float(np.mean(deltas)),
                    ci=paired_stats.percentile_ci(np.mean(resampled, 0)),
                    n=int(len(self.labels)), positives=int(self.labels.sum()),
                    subjects=self.bootstrap.n_subjects, split="held_out", seeds=list(pairs),
                    per_seed=per_seed, method="paired bootstrap of subjects", note=None)

    def _delta_without_ci(self, pairs: dict[int, tuple[Run, Run]]) -> dict:
        per_seed = {}
        for s, (run, ref) in pairs.items():
            auc, ref_auc = (task_result(r, self.task, self.model).get("auroc")
                            for r in (run, ref))
            per_seed[str(s)] = dict(auroc=auc, random_auroc=ref_auc, ci=None,
                                    delta=None if None in (auc, ref_auc) else auc - ref_auc)
        deltas = [v["delta"] for v in per_seed.values() if v["delta"] is not None]
        lacking = [r.name for pair in pairs.values() for r in pair if r.name not in self.scores]
        note = (f"no held_out predictions for {', '.join(lacking)}" if lacking else
                f"the {len(self.labels)} held_out rows shared by the runs' predictions hold "
                f"one class") + (": AUROCs from eval/metrics.json, no CI" if deltas else
                                 ": no AUROC (eval/metrics.json has none either)")
        n = [task_result(r, self.task, self.model).get("n") for r, _ in pairs.values()]
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
    except (pa.ArrowException, OSError) as e:  # a bad file, or a column missing
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
