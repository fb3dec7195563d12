"""The training runs ``eval.py --compare`` reads: each run's ``eval/metrics.json``, seed and
validation curve, grouped strategy -> seed and checked for pairing with the ``random`` runs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from cvmae_jax.config import default_config
from cvmae_jax.mask_probabilities import STRATEGIES
from cvmae_jax.workdir import (DATA_STATS_FILE, METRICS_FILE, eval_metrics_path, read_config,
                               read_data_stats, read_eval_metrics)

REFERENCE = "random"
# eval settings that change what the downstream models read (eval/metrics.json eval_settings)
DOWNSTREAM_SETTINGS = ("pooling", "label_max_len", "label_window")
# config.eval.finetune fields that leave each fine-tuned model unchanged (every other one must
# agree among compared runs: eval/metrics.json downstream.finetune)
FINETUNE_FREE = ("enabled", "scratch", "kshot_draws")


@dataclasses.dataclass
class Run:
    path: str
    strategy: str
    seed: int
    metrics: dict  # eval/metrics.json
    validation: list[tuple[int, float]]  # (step, masked_mse) of metrics.jsonl, one per step
    validation_split: str | None  # the split of those lines (config.eval.split)
    dataset: str | None  # the prepared dataset evaluated (PreparedDataset.settings_id)

    @property
    def name(self) -> str:
        return f"{self.strategy}_s{self.seed}"


def over_seeds(values: dict[int, float | None]) -> dict:
    """{"mean" over the seeds with a value, "n" of them, "per_seed"}."""
    present = [v for v in values.values() if v is not None]
    return dict(mean=float(np.mean(present)) if present else None, n=len(present),
                per_seed={str(s): v for s, v in values.items()})


def load_run(path: str) -> Run:
    if not os.path.exists(eval_metrics_path(path)):
        raise FileNotFoundError(f"{path}: no eval/metrics.json; run `python eval.py "
                                f"--workdir={path}` first")
    metrics = read_eval_metrics(path)
    seed = int(read_config(path)["seed"])
    return Run(path, metrics["strategy"], seed, metrics, *_validation_curve(path),
               _evaluated_dataset(path, metrics))


def _evaluated_dataset(path: str, metrics: dict) -> str | None:
    """The prepared dataset eval.py read: metrics.json's ``dataset``, else (an evaluation that
    does not record it) the one the run was trained on (data_stats.json); None without both."""
    if metrics.get("dataset") or not os.path.exists(os.path.join(path, DATA_STATS_FILE)):
        return metrics.get("dataset")
    return read_data_stats(path).get("dataset")


def _validation_curve(path: str) -> tuple[list[tuple[int, float]], str | None]:
    """Validation (masked MSE by step) of metrics.jsonl and its split; a step logged twice
    (after a resume) keeps its last line."""
    by_step, split = {}, None
    jsonl = os.path.join(path, METRICS_FILE)
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


def _refuse_differing(runs: list[Run], name: str, value_of, why: str = "") -> None:
    """Raises ValueError naming each run's ``value_of(run)`` (a string) when they differ."""
    values = {value_of(r): r.path for r in runs}
    if len(values) > 1:
        raise ValueError(f"runs evaluated with different {name}{why}: " + "; ".join(
            f"{path}: {value}" for value, path in values.items()))


def _refuse_different_evaluations(runs: list[Run]) -> None:
    """Runs must share the prepared dataset (the MEDS files, their split and the data
    settings), the split, the evaluation mask, the eval settings of the vectors their probes
    read and, among runs with fine-tuned models, the fine-tuning settings (a field missing from
    a metrics.json: its default)."""
    _refuse_differing(runs, "data", lambda r: f"prepared dataset {r.dataset}",
                      " (other MEDS files, subject splits or config.data settings), so their "
                      "lab errors and label rows cannot be paired")
    for key in ("split", "eval_mask"):
        _refuse_differing(runs, key, lambda r: json.dumps(r.metrics.get(key), sort_keys=True))
    defaults = default_config().eval
    for key in DOWNSTREAM_SETTINGS:
        _refuse_differing(runs, f"config.eval.{key}", lambda r: repr(
            r.metrics.get("eval_settings", {}).get(key, defaults[key])),
            ", so their probes read different vectors")
    tuned = [r for r in runs if r.metrics.get("downstream", {}).get("finetune")]
    for key in (k for k in defaults.finetune if k not in FINETUNE_FREE):
        _refuse_differing(tuned, f"config.eval.finetune.{key}", lambda r: repr(
            r.metrics["downstream"]["finetune"].get(key, defaults.finetune[key])),
            ", so their fine-tuned models were trained differently")


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
    _refuse_different_evaluations(runs)
    for strategy, by_seed in groups.items():
        for seed, run in by_seed.items():
            if seed not in groups[REFERENCE]:
                raise ValueError(f"{run.path} ({strategy}, seed {seed}) has no {REFERENCE} run "
                                 f"with seed {seed} to pair with (random seeds: "
                                 f"{sorted(groups[REFERENCE])})")
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return {s: dict(sorted(groups[s].items()))
            for s in sorted(groups, key=lambda s: (order.get(s, len(order)), s))}
