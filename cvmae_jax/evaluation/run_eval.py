"""``eval.py``: evaluation of a pretrained run, written to ``RUN/eval/`` (``RUN/eval_<split>/``
for a split other than held_out; ``_step<N>`` added for a checkpoint chosen with ``--step``).

Reconstruction under the fixed uniform mask (overall, by CV tier, per lab, beside the per-code
mean and carry-forward) and, optionally, with one code hidden at a time; downstream probes on
the MEDS label tasks beside the aggregates baseline, with label-efficiency curves, and the
fine-tuned networks; perturbation sensitivity; embeddings and MEDS-DEV predictions exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from cvmae_jax import parallel
from cvmae_jax.attention import runnable_here
from cvmae_jax.checkpoint import Checkpointer, abstract_like
from cvmae_jax.config import eval_settings, label_max_len, set_field
from cvmae_jax.config_checks import EVAL_OVERRIDABLE, check_eval_config, eval_overridable
from cvmae_jax.data import meds
from cvmae_jax.data.pipeline import eval_batches
from cvmae_jax.data.report import selection_summary
from cvmae_jax.evaluation import perturbation, report
from cvmae_jax.evaluation.aggregates import PREDICTION_MODELS, aggregates_baseline
from cvmae_jax.evaluation.downstream import (TEST, TRAIN, make_embed_fn, probe_tasks,
                                              read_label_tasks)
from cvmae_jax.evaluation.exports import (remove_stale_exports, write_model_predictions,
                                          write_task_exports)
from cvmae_jax.evaluation.finetune import MODELS as FINETUNE_MODELS
from cvmae_jax.evaluation.finetune import finetune_config, finetune_tasks
from cvmae_jax.evaluation.label_efficiency import label_efficiency
from cvmae_jax.evaluation.label_efficiency import settings as label_efficiency_settings
from cvmae_jax.evaluation.meds_evaluation import score_exports
from cvmae_jax.evaluation.staging import check_room, move_into, remove_interrupted, staged
from cvmae_jax.evaluation.untrained_probe import untrained_probe
from cvmae_jax.jsonio import check_writable, write_json_atomic
from cvmae_jax.mask_probabilities import percentile_threshold
from cvmae_jax.metrics import clock
from cvmae_jax.model import ModelConfig
from cvmae_jax.preemption import sigterm_terminates
from cvmae_jax.reconstruction import (against_baselines, evaluate_split, single_code_sums,
                                      subjects_per_code, summarize, suppress_small_codes)
from cvmae_jax.run_setup import (evaluated_config, mask_probabilities, prepare_eval_dataset,
                                 resolve_meds_dir)
from cvmae_jax.steps import init_state, make_eval_step, make_optimizer
from cvmae_jax.workdir import EVAL_METRICS_FILE, checkpoint_dir, eval_dir, run_config
from cvmae_jax.workdir_lock import WorkdirLock, evaluation


def run_config_with(workdir: str, overrides: dict) -> ml_collections.ConfigDict:
    """The run's ``config.json`` with ``overrides`` ({"eval.labels_dir": ..., ...}) applied.
    Only ``EVAL_OVERRIDABLE`` fields, which leave the trained model and its data unchanged,
    may be overridden; ``eval.split`` is ``--split``."""
    config = run_config(workdir)
    fixed = sorted(name for name in overrides
                   if not name.startswith(EVAL_OVERRIDABLE) or name == "eval.split")
    if fixed:
        raise ValueError(f"{', '.join('--config.' + n for n in fixed)}: eval.py evaluates the "
                         f"run as trained (its config.json); only {eval_overridable()} may be "
                         "overridden, and the split is --split")
    for name, value in overrides.items():  # eval, data or model: in every run's config.json
        set_field(config, name, value)
    check_eval_config(config.eval)
    return config


def evaluate_run(workdir: str, config=None, split: str = "held_out",
                 step: int | None = None) -> dict:
    """Restores the newest checkpoint of ``workdir`` (or the one of ``step``) and writes under
    ``eval_dir(workdir, split, step)``: metrics.json, report.md, reconstruction_by_lab.png,
    label_efficiency.png, embeddings/<task>.parquet, predictions/<task>/{tuning,held_out}.parquet
    (the probe) and predictions_<model>/<task>/{tuning,held_out}.parquet (the aggregates
    models, the probe with the aggregates, the fine-tuned networks). ``config``: the run's
    config (default: its config.json). Returns the metrics. SIGTERM stops it at once, leaving
    the earlier results (``preemption.Terminated``). One evaluation per results folder at a
    time (the workdir's ``.eval<folder suffix>.lock``: ``.eval.lock``, ``.eval_tuning.lock``,
    ``.eval_step500.lock``, ``.eval_tuning_step500.lock``): a second stops in one line. The
    staging folders of an evaluation killed on this machine are removed."""
    with sigterm_terminates("during the evaluation: the earlier results are as they were",
                            parallel.python_handles_sigterm()):
        _newest_step(workdir)  # no checkpoint: refused before the lock file is made
        config = config if config is not None else run_config(workdir)
        final = eval_dir(workdir, split, step)
        lock = WorkdirLock(workdir, evaluation(os.path.basename(final)))
        try:
            _remove_interrupted_results(final)
            if step is None:
                return _evaluate_newest(workdir, config, split, final)
            return _evaluate_chosen(workdir, config, split, step, final)
        finally:
            lock.release()


class Checked(NamedTuple):
    """What ``_evaluate`` evaluates: the checkpoint's step (the newest complete one, or the
    one chosen), the config evaluated at the split, the run's eval settings and the
    fine-tuning settings."""
    step: int
    config: ml_collections.ConfigDict
    settings: dict
    finetune: ml_collections.ConfigDict


class CheckpointRemoved(Exception):
    """The checkpoint (its step, the argument) chosen at the start was deleted before it was
    read: a train.py still training the run keeps only its newest ``train.keep_checkpoints``."""


RESTORE_ATTEMPTS = 3


def _evaluate_newest(workdir: str, config, split: str, final: str) -> dict:
    """``_evaluate`` of the newest complete checkpoint into ``final``; where the training
    deletes it before it is read, again with the newest one then, ``RESTORE_ATTEMPTS`` times at
    most."""
    deleted = []
    for _ in range(RESTORE_ATTEMPTS):
        step = _newest_step(workdir)
        if not deleted and step < config.train.num_steps:
            logging.warning("eval: evaluating step %d of the run's %d: its training has not "
                            "ended (it is still training, or it stopped early)", step,
                            config.train.num_steps)
        try:
            return _evaluate(workdir, split, final,
                             *_checked_config(workdir, config, split, step, final))
        except CheckpointRemoved:
            deleted.append(step)
            logging.warning("eval: checkpoint %d was deleted by the training before eval.py "
                            "read it (train.keep_checkpoints); evaluating the newest one", step)
    raise ValueError(f"{checkpoint_dir(workdir)}: checkpoints {', '.join(map(str, deleted))} "
                     "were each deleted by the training before eval.py read them: evaluate the "
                     "run once its training ends, or raise train.keep_checkpoints")


def _evaluate_chosen(workdir: str, config, split: str, step: int, final: str) -> dict:
    """``_evaluate`` of the complete checkpoint of ``step`` into ``final``."""
    checkpoints = checkpoint_dir(workdir)
    steps = Checkpointer.complete_steps(checkpoints)
    if step not in steps:
        raise ValueError(f"{checkpoints}: --step={step}: no complete checkpoint of that step "
                         f"(complete: {', '.join(map(str, steps))})")
    try:
        return _evaluate(workdir, split, final,
                         *_checked_config(workdir, config, split, step, final))
    except CheckpointRemoved as removed:
        if step in Checkpointer.complete_steps(checkpoints):  # there: it failed on its own
            raise removed.__cause__ from None  # (a damaged checkpoint, say)
        raise ValueError(f"{checkpoints}: checkpoint {step} was deleted by the training before "
                         "eval.py read it (train.keep_checkpoints)") from None


def _newest_step(workdir: str) -> int:
    """The step of the run's newest complete checkpoint."""
    checkpoints = checkpoint_dir(workdir)
    step = Checkpointer.latest_complete_step(checkpoints)
    if step is None:
        raise FileNotFoundError(f"{checkpoints}: no complete checkpoint to evaluate")
    return step


def _checked_config(workdir: str, config, split: str, step: int, final: str) -> Checked:
    """``Checked`` for checkpoint ``step`` of the run whose config.json is ``config``, once the
    results folder ``final`` is found writable."""
    config = _unless_deleted(workdir, step, lambda: evaluated_config(
        config, workdir, step))  # a new config: the caller's keeps its validation split
    settings = eval_settings(config)  # before the split below: as the run's config has them
    config.eval.split = split
    parallel.check_batch_size(config.eval.batch_size, jax.device_count(),
                              "config.eval.batch_size")
    finetune = finetune_config(config)
    check_writable(final, "eval.py writes its results there")
    return Checked(step, config, settings, finetune)


def _unless_deleted(workdir: str, step: int, read):
    """``read()`` of checkpoint ``step``; ``CheckpointRemoved`` (caused by the read's error)
    where it fails and the step is no longer the newest complete checkpoint (the training
    deleted it, or is deleting it)."""
    try:
        return read()
    except Exception as error:
        if Checkpointer.latest_complete_step(checkpoint_dir(workdir)) == step:
            raise
        raise CheckpointRemoved(step) from error


def _remove_interrupted_results(final: str) -> None:
    """Removes (process 0) the staging folders an evaluation killed before it finished left in
    ``final``, and names those that hold results never moved in."""
    if jax.process_index() != 0:
        return
    leftovers = remove_interrupted(final, EVAL_METRICS_FILE)
    if leftovers.removed:
        logging.info("eval: removed %d unfinished results folder(s) (.incomplete-*) of an "
                     "evaluation that was killed", leftovers.removed)
    if leftovers.others:
        logging.info("eval: %d results folder(s) (.incomplete-*) of an evaluation running now, "
                     "on another machine, or of unknown origin left as they are",
                     leftovers.others)
    for path in leftovers.finished:
        logging.warning("%s: an evaluation's results that were never moved into %s (a file or "
                        "folder was in the way, or it was killed while moving them); move what "
                        "you need and remove the folder", path, final)


def _evaluate(workdir: str, split: str, final: str, step: int, config, settings: dict,
              finetune) -> dict:
    """The evaluation of ``evaluate_run`` into ``final``, once its config is checked and its
    lock held."""
    checkpoints = checkpoint_dir(workdir)
    meds_dir = resolve_meds_dir(config, workdir)
    dataset = prepare_eval_dataset(config, workdir, meds_dir)
    if split not in dataset.num_examples:
        raise ValueError(f"--split={split!r}: unknown split; have {sorted(dataset.num_examples)}")
    label_len = label_max_len(config)
    each_code_latest = config.eval.label_window == "each_code_latest"
    labels_dir, label_tasks = read_label_tasks(meds_dir, dataset.stats, label_len,
                                               config.eval.labels_dir, each_code_latest)
    probs = mask_probabilities(config, dataset)
    launcher = parallel.JitLauncher(jax.devices())
    model_config = ModelConfig.from_config(config.model, dataset.stats.vocab_size)
    attention = runnable_here(model_config.attention, jax.default_backend())
    if attention != model_config.attention:
        logging.info("eval: attention %s -> %s (the same function) on %s", model_config.attention,
                     attention, jax.default_backend())
    model_config = dataclasses.replace(model_config, attention=attention)
    graphdef, state = init_state(model_config, make_optimizer(config.train), config.seed)
    state = launcher.put_state(state)
    initial_params = state.params  # where pretraining started: the untrained probe's network
    state = _unless_deleted(workdir, step, lambda: Checkpointer.restore_state(
        checkpoints, step, abstract_like(state), verified=True))  # by evaluated_config
    params, stats = state.params, dataset.stats
    eval_step = launcher.eval_step(make_eval_step(graphdef, stats.vocab_size,
                                                  config.eval.mask_rate, config.eval.mask_seed))
    with _phase(f"reconstruction on {split} ({dataset.num_examples[split]:,} windows)"):
        result = evaluate_split(eval_step, params, dataset, config, launcher, probs)
    result.update(step=step, split=split, eval_settings=settings, dataset=dataset.settings_id,
                  strategy=config.masking.strategy,
                  eval_mask=dict(rate=config.eval.mask_rate, seed=config.eval.mask_seed),
                  code_selection=selection_summary(dataset.report))
    _add_cv(result, stats.cv, config.masking.threshold_percentile)
    _add_names(result["per_code"], dataset.lab_names)
    batches = list(eval_batches(dataset, split, config.eval.batch_size, config.data.max_len,
                                shard_index=jax.process_index(),
                                shard_count=jax.process_count()))
    if config.eval.single_code:
        with _phase(f"single-code reconstruction ({stats.vocab_size} codes x {len(batches)} "
                    "batches; config.eval.single_code=False skips it)"):
            result["single_code"] = _single_code(graphdef, params, batches, stats, probs,
                                                 config, launcher)
            _add_names(result["single_code"]["per_code"], dataset.lab_names)
    code_subjects = subjects_per_code(dataset, split)  # suppression after the CV tiers pool
    for block in (result, result.get("single_code")):  # every code's values
        if block:
            suppress_small_codes(block, code_subjects, config.data.get(
                "min_subjects", meds.DATA_DEFAULTS["min_subjects"]))
    embed_fn = make_embed_fn(graphdef, config.eval.pooling, stats.vocab_size)
    with _phase(f"downstream probes ({len(label_tasks)} task(s))"):
        result["downstream"], tasks = probe_tasks(
            graphdef, params, labels_dir, label_tasks, label_len,
            config.eval.batch_size, seed=config.seed, embed_fn=embed_fn,
            each_code_latest=each_code_latest)
    aggregate_probabilities = {}
    with _phase("aggregates baseline (logistic regression, gradient boosting)"):
        for task, data in tasks.items():
            probe = result["downstream"]["tasks"][task]
            probe["aggregates"], aggregate_probabilities[task] = aggregates_baseline(
                data, probe, stats.vocab_size, label_len, config.seed, each_code_latest)
    if config.eval.untrained_probe and tasks:
        with _phase("probe on the untrained network (config.eval.untrained_probe=False skips "
                    "it)"):
            for task, data in tasks.items():
                probe = result["downstream"]["tasks"][task]
                probe["untrained"] = untrained_probe(graphdef, initial_params, data, probe,
                                                     label_len, config.eval.batch_size,
                                                     embed_fn, config.seed)
    del initial_params
    sample_seed = config.eval.sample_seed
    result["downstream"]["label_efficiency"] = label_efficiency_settings(sample_seed)
    with _phase("label-efficiency curves"):
        for task, data in tasks.items():
            probe = result["downstream"]["tasks"][task]
            probe["label_efficiency"] = label_efficiency(
                data.x[TRAIN], data.y[TRAIN], data.x[TEST], data.y[TEST], data.probe,
                sample_seed, probe["auroc"])
    finetuned = {}
    if finetune.enabled and tasks:
        models = "pretrained and from scratch" if finetune.scratch else "pretrained"
        with _phase(f"fine-tuning ({len(tasks)} task(s), {models}; "
                    "config.eval.finetune.enabled=False skips it)"):
            result["downstream"]["finetune"], finetuned = finetune_tasks(
                launcher, model_config, params, tasks, result["downstream"]["tasks"], finetune,
                label_len, config.seed, sample_seed, config.eval.pooling)
    with _phase(f"perturbation sensitivity ({', '.join(perturbation.KINDS)})"):
        result["perturbation"] = perturbation.perturbation_metrics(
            perturbation.KINDS, sample_seed, split, sum(int(b["valid"].sum()) for b in batches),
            lambda kind: perturbation.reconstruction_sensitivity(
                eval_step, params, batches, kind, sample_seed, result["overall"]["masked_mse"],
                launcher.put_batch, launcher.fetch),
            lambda task, kind: perturbation.downstream_sensitivity(
                graphdef, params, tasks[task], kind, sample_seed, label_len,
                config.eval.batch_size, embed_fn),
            tasks)
    result["downstream"]["embed_traces"] = len(embed_fn.traces)
    if jax.process_index() == 0:
        _write_results(final, split, result, tasks,
                       {task: aggregate_probabilities.get(task, {})
                        | (finetuned[task].probabilities if task in finetuned else {})
                        for task in tasks})
    return result


def _write_results(final: str, split: str, result: dict, tasks: dict,
                   model_probabilities: dict) -> None:
    """Writes (process 0) the exports of each task (embeddings, the probe's predictions, and
    ``model_probabilities[task]``: the other models' predictions), scores them, and writes
    metrics.json, report.md and the figures, all into a staging folder moved into
    ``final`` (``eval_dir``) once complete (staging.py); then removes the exports of an
    earlier evaluation that are not written now. Adds the exports and scores to ``result``."""
    with staged(final) as out:
        result["exports"] = {task: write_task_exports(out, task, data)
                             for task, data in tasks.items()}
        for task, written in result["exports"].items():
            written["models"] = write_model_predictions(out, task, tasks[task],
                                                        model_probabilities[task])
            logging.info("eval %s: embeddings of %d label rows, predictions %s, of %d other "
                         "model(s)", task, written["embeddings"], written["predictions"],
                         len(written["models"]))
        result["meds_evaluation"], result["meds_evaluation_models"] = score_exports(
            out, result["exports"])
        report.write_report(os.path.join(out, "report.md"), result)
        report.plot_by_lab(os.path.join(out, "reconstruction_by_lab.png"), result)
        report.plot_label_efficiency(os.path.join(out, "label_efficiency.png"),
                                     result["downstream"])
        write_json_atomic(os.path.join(out, EVAL_METRICS_FILE), result)  # last: finished
        check_room(out, final)
        move_into(out, final, last=(EVAL_METRICS_FILE,))
    removed = remove_stale_exports(final, result["exports"], (*PREDICTION_MODELS, *FINETUNE_MODELS))
    if removed:
        logging.info("eval: removed %d export(s) of an earlier evaluation (embeddings or "
                     "predictions of a task or model not evaluated now)", len(removed))
    logging.info("eval %s step %d: %s; wrote %s", split, result["step"],
                 against_baselines(result["overall"]), final)


@contextlib.contextmanager
def _phase(description: str):
    """Logs (process 0) the start of one part of the evaluation and, after it, its time."""
    log = logging.info if jax.process_index() == 0 else lambda *args: None
    log("eval: %s", description)
    start = time.perf_counter()
    yield
    log("eval: done in %s", clock(time.perf_counter() - start))


def _single_code(graphdef, params, batches: list[dict], stats, probs, config,
                 launcher) -> dict:
    """Reconstruction with each code hidden in turn: summarize()'s format plus by_cv_tier."""
    step = launcher.eval_step(make_eval_step(graphdef, stats.vocab_size, config.eval.mask_rate,
                                             config.eval.mask_seed, mode="single_code"))
    sums = single_code_sums(step, params, batches, stats.vocab_size, launcher.put_batch,
                            launcher.fetch)
    result = dict(summarize(sums, stats.codes, stats.norm_std, probs), split=config.eval.split,
                  mask="every value of one code hidden, all others visible")
    _add_cv(result, stats.cv, config.masking.threshold_percentile)
    overall = result["overall"]
    logging.info("eval %s single-code: %d hidden values, %s", config.eval.split,
                 overall["num_masked"], against_baselines(overall))
    return result


def _add_cv(result: dict, cv: np.ndarray, threshold_percentile: float) -> None:
    """Each per-code row's train CV, the CV threshold of the tiers and the by-CV-tier
    summary."""
    for row, value in zip(result["per_code"], cv):
        row["cv"] = float(value)
    result["cv_threshold"] = float(percentile_threshold(cv, threshold_percentile))
    result["by_cv_tier"] = _by_cv_tier(result["per_code"], cv, threshold_percentile)


def _add_names(rows: list[dict], names: tuple[str, ...]) -> None:
    """Each per-code row's readable lab name (``PreparedDataset.lab_names``, same order)."""
    for row, name in zip(rows, names, strict=True):
        row["name"] = name


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
