"""Pretraining loop: ``train_and_evaluate(config, workdir)``.

Compiles the whole step (mask draw, forward, backward, update) once under the configured
launcher (jit over a ``data`` mesh, or pmap), then trains with periodic metrics, validation and
Orbax checkpoints. It resumes automatically from ``workdir``, saves and exits cleanly on SIGTERM
(preemption), and stops at the first non-finite loss or gradient without saving it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cvmae_jax import parallel, run_setup
from cvmae_jax.checkpoint import Checkpointer, abstract_like
from cvmae_jax.data.packing import packed_train_dataset
from cvmae_jax.data.pipeline import train_dataset
from cvmae_jax.reconstruction import evaluate_split
from cvmae_jax.jsonio import write_json_atomic
from cvmae_jax.masking import mask_root
from cvmae_jax.metrics import MetricsWriter, Progress
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import init_state, make_eval_step, make_optimizer, make_train_step
from cvmae_jax.workdir import CONFIG_FILE, DATA_STATS_FILE, METRICS_FILE, checkpoint_dir


class _Preemption:
    """SIGTERM sets a flag the loop checks after each step (single process). With several
    processes, Orbax's preemption sync point makes every process stop at the same step."""

    def __init__(self, checkpointer: Checkpointer, preempted_early: bool = False):
        self.checkpointer = checkpointer
        self.flag = threading.Event()
        if preempted_early:
            self.flag.set()
        self.previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

    def reached(self, step: int) -> bool:
        return self.flag.is_set() or self.checkpointer.manager.reached_preemption(step)

    def restore_handler(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def train_and_evaluate(config, workdir: str) -> dict:
    """Pretrains the VO-MAE described by ``config``; writes outputs to ``workdir``.

    Returns a summary: final step, last training and validation metrics, the number of times the
    train step was traced (1 when nothing recompiled) and whether the run was preempted.
    """
    parallel.set_cpu_devices(config.parallel.get("cpu_devices"))
    parallel.initialize_distributed(config.parallel)
    run_setup.enable_compilation_cache(config.train.get("compilation_cache_dir"))
    launcher = parallel.make_launcher(config.parallel)
    run_setup.validate_config(config, launcher.num_devices)
    logging.info("Training on %d %s device(s), parallel mode %s", launcher.num_devices,
                 jax.default_backend(), config.parallel.mode)
    created_workdir = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(checkpoint_dir(workdir),
                                config.train.keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    # Every process reports its step to JAX's preemption sync now: a notice that arrives while
    # resuming then stops the run at start_step + 1 (else at step 1, never reached after it).
    preempted_early = checkpointer.manager.reached_preemption(start_step)
    try:  # a refused resume or bad data leaves the workdir as it was
        # before Orbax's restore, whose barrier a process seeing no checkpoint would not join
        run_setup.check_processes_share(workdir, start_step)
        saved_run = checkpointer.restore_run_info(start_step) if start_step else None
        if saved_run:
            run_setup.check_resume_settings(saved_run, config, start_step)
        dataset = run_setup.prepare_run_data(config, workdir)
        if saved_run:
            run_setup.check_resume_dataset(saved_run, config, dataset, start_step)
    except BaseException:
        checkpointer.close()
        if created_workdir:
            run_setup.remove_empty_folders(workdir)
        raise
    probs = run_setup.mask_probabilities(config, dataset)
    run_info = dict(config=config.to_dict(), processes=jax.process_count(),
                    data_stats=run_setup.stats_record(config, dataset, probs))
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, CONFIG_FILE), run_info["config"])
        write_json_atomic(os.path.join(workdir, DATA_STATS_FILE), run_info["data_stats"])

    optimizer = make_optimizer(config.train)
    init_start = time.perf_counter()
    graphdef, state = init_state(ModelConfig.from_config(config.model, dataset.stats.vocab_size),
                                 optimizer, config.seed)
    logging.info("Model: %s parameters, initialized in %.1f s",
                 f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
                 time.perf_counter() - init_start)
    state = launcher.put_state(state)
    traces = []
    step_body = make_train_step(graphdef, optimizer, jnp.asarray(probs, jnp.float32),
                                mask_root(config.seed), config.loss.unmasked_weight,
                                launcher.axis_name)

    metric_names = []

    def counted_step(state, batch):
        traces.append(1)  # runs only while tracing
        state, metrics = step_body(state, batch)
        metric_names[:] = sorted(metrics)  # one float32 vector: one small transfer per step
        return state, jnp.stack([metrics[name].astype(jnp.float32) for name in metric_names])

    eval_step = launcher.eval_step(make_eval_step(
        graphdef, dataset.stats.vocab_size, config.eval.mask_rate, config.eval.mask_seed,
        launcher.axis_name))
    make_dataset = packed_train_dataset if config.data.packing else train_dataset
    data = iter(make_dataset(dataset, "train", config.train.batch_size, config.data.max_len,
                             seed=config.seed, shard_index=jax.process_index(),
                             shard_count=jax.process_count(), workers=config.data.workers))
    if start_step:
        restored = run_setup.restore_for_resume(
            checkpointer, start_step, abstract_like(launcher.checkpoint_view(state)), data,
            config)
        state = launcher.put_state(restored)
        logging.info("Resumed from the checkpoint at step %d%s", start_step,
                     "; training is already complete" if start_step >= config.train.num_steps
                     else "")

    compiled, leaves = None, None  # after the first batch: the compiled step and its state leaves

    def current_state():  # the loop holds the state as the compiled step's leaves
        return state if compiled is None else compiled.unflatten(leaves)

    def save(step):
        checkpointer.save(step, launcher.checkpoint_view(current_state()), data, run_info)

    writer = MetricsWriter(os.path.join(workdir, METRICS_FILE), start_step)
    progress = Progress(config.train.num_steps)
    preemption = _Preemption(checkpointer, preempted_early)
    pending = None
    window, window_tokens, window_start, data_wait = [], 0, time.perf_counter(), 0.0
    last_train, last_eval, preempted = {}, {}, False

    def record(step_metrics):  # host copy of a finished step's metrics; stop if non-finite
        step, metrics = step_metrics
        metrics = dict(zip(metric_names, launcher.fetch(metrics).tolist()))
        if not metrics["finite"]:
            last = checkpointer.latest_step()
            raise FloatingPointError(
                f"step {step}: the loss ({metrics['loss']}) or gradient norm "
                f"({metrics['grad_norm']}) is not finite; stopped without applying or saving "
                "it (" + (f"the last checkpoint is step {last})" if last is not None
                          else "no checkpoint was saved)"))
        window.append(metrics)

    def record_pending():  # before a save too: a non-finite step is never saved
        nonlocal pending
        if pending is not None:
            record(pending)
            pending = None

    try:
        step = start_step
        for step in range(start_step + 1, config.train.num_steps + 1):
            wait_start = time.perf_counter()
            local_batch = next(data)
            data_wait += time.perf_counter() - wait_start  # host blocked on the input pipeline
            with jax.transfer_guard(config.train.transfer_guard):
                if compiled is None:
                    compile_start = time.perf_counter()
                    compiled = launcher.compile_train_step(counted_step, state, local_batch)
                    leaves, state = compiled.flatten(state), None
                    compile_seconds = time.perf_counter() - compile_start
                    window_start += compile_seconds  # throughput counts training time only
                    logging.info("Compiled the train step in %.1f s", compile_seconds)
                leaves, metrics = compiled(leaves, compiled.put(local_batch))
                record_pending()  # the previous step: done or nearly, so no stall
                pending = (step, metrics)
                window_tokens += int(local_batch["valid"].sum()) * jax.process_count()
                if step % config.train.log_every == 0 or step == config.train.num_steps:
                    record_pending()
                    elapsed = time.perf_counter() - window_start
                    last_train = _mean_metrics(window)
                    slots = len(window) * local_batch["valid"].size * jax.process_count()
                    last_train.update(step=step, window_steps=len(window),
                                      tokens_per_sec=window_tokens / elapsed,
                                      steps_per_sec=len(window) / elapsed,
                                      real_token_fraction=window_tokens / slots,
                                      data_wait_fraction=data_wait / elapsed)
                    writer.write(last_train)
                    progress.log(step, last_train)
                    window, window_tokens, window_start = [], 0, time.perf_counter()
                    data_wait = 0.0
            pause_start = time.perf_counter()
            if step % config.train.eval_every == 0 or step == config.train.num_steps:
                with jax.transfer_guard(config.train.transfer_guard):
                    result = evaluate_split(eval_step, current_state().params, dataset,
                                            config, launcher, probs)
                last_eval = dict(result["overall"], step=step, split=config.eval.split)
                writer.write(last_eval)
                if jax.process_index() == 0:
                    logging.info("eval %s step %d: masked_mse %.4f (per-code-mean baseline %.4f, "
                                 "ratio %.3f)", config.eval.split, step,
                                 last_eval["masked_mse"], last_eval["baseline_masked_mse"],
                                 last_eval["mse_vs_baseline"])
            if preemption.reached(step):
                record_pending()
                save(step)
                preempted = True
                logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved; rerun the "
                                "same command to resume", step)
                break
            if step % config.train.checkpoint_every == 0 or step == config.train.num_steps:
                record_pending()
                save(step)
            window_start += time.perf_counter() - pause_start  # evaluation/saving excluded
        record_pending()
    finally:
        data.close()  # stops the input pipeline's threads
        checkpointer.close()  # waits for the last async save
        preemption.restore_handler()
    return dict(step=int(jax.device_get(launcher.checkpoint_view(current_state()).step)),
                train=last_train, eval=last_eval, train_step_traces=len(traces),
                preempted=preempted)


def _mean_metrics(window: list[dict]) -> dict:
    """Averages per-step scalar metrics over a logging window (masked MSE pooled by count)."""
    stacked = {k: np.asarray([m[k] for m in window], np.float64) for k in window[0]}
    out = {k: float(v.mean()) for k, v in stacked.items()
           if k not in ("num_masked", "num_tokens", "masked_sse", "baseline_masked_sse",
                        "finite")}
    masked = max(stacked["num_masked"].sum(), 1.0)
    out["masked_mse"] = float(stacked["masked_sse"].sum() / masked)
    out["baseline_masked_mse"] = float(stacked["baseline_masked_sse"].sum() / masked)
    out["mask_rate"] = float(stacked["num_masked"].sum() / max(stacked["num_tokens"].sum(), 1))
    return out
