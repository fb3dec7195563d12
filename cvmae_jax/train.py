"""Pretraining loop: ``train_and_evaluate(config, workdir)``.

Sets up the prepared dataset and masking probabilities, compiles the whole step (mask draw,
forward, backward, update) once with ``jax.jit`` over a ``data`` mesh, then trains with periodic
metrics, validation and Orbax checkpoints, resuming automatically from ``workdir``.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cvmae_jax import parallel
from cvmae_jax.checkpoint import Checkpointer, abstract_like
from cvmae_jax.data.pipeline import eval_batches, train_dataset
from cvmae_jax.data.prepare import PreparedDataset, prepare_dataset
from cvmae_jax.data.synthetic import generate_synthetic_meds
from cvmae_jax.evaluation.reconstruction import accumulate_sums, summarize
from cvmae_jax.masking import STRATEGIES, expected_mask_rate, strategy_probs
from cvmae_jax.jsonio import write_json_atomic
from cvmae_jax.metrics import MetricsWriter, Progress
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import init_state, make_eval_step, make_optimizer, make_train_step


def resolve_meds_dir(config, workdir: str) -> str:
    """``config.data.meds_dir``, or the synthetic default generated once under the data dir."""
    if config.data.meds_dir:
        return config.data.meds_dir
    meds_dir = os.path.join(data_dir(config, workdir), "synthetic_meds")
    if not os.path.exists(meds_dir):
        logging.info("Generating synthetic MEDS (%d subjects) in %s",
                     config.data.synthetic_subjects, meds_dir)
        generate_synthetic_meds(meds_dir, num_subjects=config.data.synthetic_subjects,
                                seed=config.data.synthetic_seed)
    return meds_dir


def validate_config(config, mesh) -> None:
    """Refuses settings that would fail later, before anything is written."""
    if config.masking.strategy not in STRATEGIES:
        raise ValueError(f"config.masking.strategy={config.masking.strategy!r}: expected one of "
                         f"{STRATEGIES}")
    if not (config.data.meds_dir or config.data.allow_synthetic):
        raise ValueError("config.data.meds_dir is required with this config "
                         "(pass --config.data.meds_dir=/path/to/MEDS; configs/demo.py runs on "
                         "the embedded synthetic data)")
    parallel.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    parallel.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def mask_probabilities(config, dataset: PreparedDataset) -> np.ndarray:
    """Per-code mask probabilities [V] of ``config.masking.strategy`` from train statistics."""
    stats, masking = dataset.stats, config.masking
    return strategy_probs(masking.strategy, cv=stats.cv, variance=stats.variance,
                          token_counts=stats.count,
                          threshold_percentile=masking.threshold_percentile,
                          p_high=masking.p_high, p_low=masking.p_low)


def stats_record(config, dataset: PreparedDataset, probs: np.ndarray) -> dict:
    """The content of ``data_stats.json``: per-code statistics with mask probabilities."""
    record = dataset.stats.to_dict(extra={"mask_prob": probs})
    record["masking"] = dict(config.masking.to_dict(),
                             cv_threshold=float(np.percentile(
                                 dataset.stats.cv, config.masking.threshold_percentile)),
                             expected_mask_rate=expected_mask_rate(probs, dataset.stats.count))
    return record


def evaluate(eval_step, params, dataset: PreparedDataset, config, mesh, probs) -> dict:
    """Reconstruction under the fixed evaluation mask on ``config.eval.split``."""
    batches = eval_batches(dataset, config.eval.split, config.eval.batch_size,
                           config.data.max_len)
    sums = accumulate_sums(eval_step, params, batches,
                           lambda batch: parallel.global_batch(batch, mesh))
    return summarize(sums, dataset.stats.codes, dataset.stats.norm_std, probs)


def train_and_evaluate(config, workdir: str) -> dict:
    """Pretrains the VO-MAE described by ``config``; writes outputs to ``workdir``.

    Returns a summary: final step, last training metrics, last validation metrics and the
    number of times the train step was traced (1 when nothing recompiled).
    """
    mesh = parallel.make_mesh()
    validate_config(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    dataset = prepare_dataset(config.data, resolve_meds_dir(config, workdir),
                              data_dir(config, workdir))
    probs = mask_probabilities(config, dataset)
    if is_main:
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
        write_json_atomic(os.path.join(workdir, "data_stats.json"),
                          stats_record(config, dataset, probs))

    model_config = ModelConfig.from_config(config.model, dataset.stats.vocab_size)
    optimizer = make_optimizer(config.train)
    graphdef, state = init_state(model_config, optimizer, config.seed)
    state = jax.device_put(state, parallel.replicated_sharding(mesh))

    traces = []
    step_body = make_train_step(graphdef, optimizer, jnp.asarray(probs, jnp.float32),
                                jax.random.key(config.seed), config.loss.unmasked_weight)

    def counted_step(state, batch):
        traces.append(1)  # runs only while tracing
        return step_body(state, batch)

    replicated = parallel.replicated_sharding(mesh)
    train_step = jax.jit(counted_step, donate_argnums=0,
                         in_shardings=(replicated, parallel.batch_sharding(mesh)),
                         out_shardings=(replicated, replicated))
    eval_step = jax.jit(make_eval_step(graphdef, dataset.stats.vocab_size,
                                       config.eval.mask_rate, config.eval.mask_seed),
                        out_shardings=replicated)

    data = iter(train_dataset(dataset, "train", config.train.batch_size, config.data.max_len,
                              seed=config.seed, shard_index=jax.process_index(),
                              shard_count=jax.process_count()))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                config.train.keep_checkpoints)
    run_info = dict(config=config.to_dict(), data_stats=stats_record(config, dataset, probs))
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = checkpointer.restore(start_step, abstract_like(state), data)
        logging.info("Resumed from checkpoint at step %d", start_step)

    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
    progress = Progress(config.train.num_steps, start_step)
    compiled = None
    window, window_tokens, window_start = [], 0, time.perf_counter()
    last_train, last_eval = {}, {}
    for step in range(start_step + 1, config.train.num_steps + 1):
        local_batch = next(data)
        batch = parallel.global_batch(local_batch, mesh)
        if compiled is None:
            compile_start = time.perf_counter()
            compiled = train_step.lower(state, batch).compile()
            compile_seconds = time.perf_counter() - compile_start
            window_start += compile_seconds  # throughput counts training time only
            logging.info("Compiled the train step in %.1f s", compile_seconds)
        state, metrics = compiled(state, batch)
        window.append(metrics)
        window_tokens += int(local_batch["valid"].sum()) * jax.process_count()
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            last_train = _mean_metrics(jax.device_get(window))  # waits for the window's steps
            elapsed = time.perf_counter() - window_start
            last_train.update(step=step, tokens_per_sec=window_tokens / elapsed,
                              steps_per_sec=len(window) / elapsed)
            _check_finite(last_train, step)
            writer.write(last_train)
            progress.log(step, last_train)
            window, window_tokens, window_start = [], 0, time.perf_counter()
        pause_start = time.perf_counter()
        if step % config.train.eval_every == 0 or step == config.train.num_steps:
            last_eval = dict(evaluate(eval_step, state.params, dataset, config, mesh,
                                      probs)["overall"], step=step, split=config.eval.split)
            writer.write(last_eval)
            logging.info("eval %s step %d: masked_mse %.4f (per-code-mean baseline %.4f, "
                         "ratio %.3f)", config.eval.split, step, last_eval["masked_mse"],
                         last_eval["baseline_masked_mse"], last_eval["mse_vs_baseline"])
        if step % config.train.checkpoint_every == 0 or step == config.train.num_steps:
            checkpointer.save(step, state, data, run_info)
        window_start += time.perf_counter() - pause_start  # evaluation and saving excluded
    checkpointer.close()
    return dict(step=int(jax.device_get(state.step)), train=last_train, eval=last_eval,
                train_step_traces=len(traces))


def _mean_metrics(window: list[dict]) -> dict:
    """Averages per-step scalar metrics over a logging window (masked MSE pooled by count)."""
    stacked = {k: np.asarray([m[k] for m in window], np.float64) for k in window[0]}
    out = {k: float(v.mean()) for k, v in stacked.items()
           if k not in ("num_masked", "num_tokens", "masked_sse", "baseline_masked_sse")}
    masked = max(stacked["num_masked"].sum(), 1.0)
    out["masked_mse"] = float(stacked["masked_sse"].sum() / masked)
    out["baseline_masked_mse"] = float(stacked["baseline_masked_sse"].sum() / masked)
    out["mask_rate"] = float(stacked["num_masked"].sum() / max(stacked["num_tokens"].sum(), 1))
    return out


def _check_finite(metrics: dict, step: int) -> None:
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        raise FloatingPointError(f"non-finite loss or gradient in the logging window ending at "
                                 f"step {step}; the last good checkpoint is kept")
