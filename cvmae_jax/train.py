"""Pretraining: ``train_and_evaluate(config, workdir)`` = ``set_up``, ``compile_step``,
``TrainLoop.run``.

``set_up`` starts the devices, opens the workdir (resuming from its newest checkpoint),
prepares the data and builds the model state. ``compile_step`` compiles the whole step (mask
draw, forward, backward, update, metric totals) once under the configured launcher (jit over a
``data`` mesh, or pmap). ``TrainLoop`` trains with periodic metrics, validation and Orbax
checkpoints; it saves and exits cleanly on SIGTERM (preemption) and stops at the first
non-finite loss or gradient without saving anything after it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from cvmae_jax import parallel, run_setup
from cvmae_jax.checkpoint import Checkpointer, abstract_like
from cvmae_jax.config_checks import check_config
from cvmae_jax.data.packing import packed_train_dataset
from cvmae_jax.data.pipeline import train_dataset
from cvmae_jax.data.prepare import PreparedDataset
from cvmae_jax.jsonio import check_writable, write_json_atomic
from cvmae_jax.masking import mask_root
from cvmae_jax.metrics import MetricsWriter, Progress
from cvmae_jax.model import ModelConfig
from cvmae_jax.preemption import SaveOnSigterm, sigterm_stops_setup
from cvmae_jax.reconstruction import against_baselines, evaluate_split
from cvmae_jax.steps import (TrainState, WindowTotals, init_state, make_eval_step,
                             make_optimizer, make_train_step, make_window_step)
from cvmae_jax.workdir import CONFIG_FILE, DATA_STATS_FILE, METRICS_FILE, checkpoint_dir
from cvmae_jax.workdir_lock import WorkdirLock


# Steps the host may dispatch before the devices finish the oldest: enough to keep them busy
# while it prepares the next batch, few enough that a preemption's save comes soon.
MAX_STEPS_AHEAD = 2


def train_and_evaluate(config, workdir: str) -> dict:
    """Pretrains the VO-MAE described by ``config``; writes outputs to ``workdir``.

    Returns a summary: final step, last training and validation metrics, the number of times the
    train step was traced (1 when nothing recompiled) and whether the run was preempted.
    """
    with sigterm_stops_setup(not parallel.wants_distributed(config.parallel)):
        run = set_up(config, workdir)
    try:
        if run.start_step >= config.train.num_steps:
            return dict(step=run.start_step, train={}, eval={}, train_step_traces=0,
                        preempted=False)
        with sigterm_stops_setup(parallel.python_handles_sigterm()):
            first_batch = next(run.data)
            step, traces = compile_step(run, first_batch)
            loop = TrainLoop(run, step)
        summary = loop.train(first_batch)
        return dict(summary, train_step_traces=len(traces))
    finally:
        run.close()


@dataclasses.dataclass
class Run:
    """A run from set-up to the end of its loop."""

    config: Any
    workdir: str
    launcher: Any  # parallel.JitLauncher or PmapLauncher
    checkpointer: Checkpointer
    start_step: int  # the restored checkpoint's step (0: a fresh run)
    preempted_early: bool  # a preemption notice came while resuming
    dataset: PreparedDataset
    probs: np.ndarray  # float64 [V]: the training mask probability of each code
    run_info: dict  # config and data statistics, saved with every checkpoint
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    state: TrainState  # on the launcher's devices
    data: Iterator[dict]  # this process's training batches, from the checkpoint's position
    lock: WorkdirLock  # released when the run ends

    def close(self) -> None:
        """Stops the input pipeline's threads, waits for the last async save, releases the
        lock: each even when one before it raises."""
        _close_in_order(self.data.close, self.checkpointer.close, self.lock.release)


def _close_in_order(*closers: Callable[[], None] | None) -> None:
    """Calls ``closers`` in order (None: nothing to close), every one even when one before it
    raises; then raises the last error, the earlier ones chained as its context."""
    with contextlib.ExitStack() as stack:
        for close in reversed(closers):
            if close is not None:
                stack.callback(close)


def set_up(config, workdir: str) -> Run:
    """Devices, the workdir (refusing a resume whose settings or data changed), the data, and
    the model state: fresh, or restored from the workdir's newest checkpoint."""
    check_config(config)  # before the devices start: config.parallel sets them up
    parallel.set_cpu_devices(config.parallel.get("cpu_devices"))
    parallel.initialize_distributed(config.parallel)
    run_setup.enable_compilation_cache(config.train.get("compilation_cache_dir"))
    launcher = parallel.make_launcher(config.parallel)
    run_setup.validate_config(config, launcher.num_devices)
    logging.info("Training on %d %s device(s), parallel mode %s", launcher.num_devices,
                 jax.default_backend(), config.parallel.mode)
    lock, checkpointer, start_step, preempted_early, dataset = _open_workdir(config, workdir)
    data = None
    try:
        probs = run_setup.mask_probabilities(config, dataset)
        logging.info("schedule: %s", run_setup.schedule_words(config, dataset))
        run_info = dict(config=config.to_dict(), processes=jax.process_count(),
                        data_stats=run_setup.stats_record(config, dataset, probs))
        optimizer = make_optimizer(config.train)
        graphdef, state = _initial_state(config, dataset, optimizer)
        state = launcher.put_state(state)
        data = _train_batches(config, dataset)
        if start_step:
            state = launcher.put_state(run_setup.restore_for_resume(
                checkpointer, start_step, abstract_like(launcher.checkpoint_view(state)), data,
                config))
            logging.info("Resumed from the checkpoint at step %d%s", start_step,
                         "; training is already complete"
                         if start_step >= config.train.num_steps else "")
        _write_run_info(workdir, run_info)  # after the restore: a refused one leaves them
    except BaseException:
        _close_in_order(data.close if data is not None else None, checkpointer.close,
                        lock.release)
        raise
    return Run(config, workdir, launcher, checkpointer, start_step, preempted_early, dataset,
               probs, run_info, graphdef, optimizer, state, data, lock)


def _open_workdir(config, workdir: str):
    """(the workdir's lock, checkpointer, start step, preempted while resuming, prepared
    dataset). A refused resume or bad data leaves the workdir as it was (but for its lock
    file); folders that cannot be written are refused first (``_check_run_folders``)."""
    created_workdir = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_count() > 1:  # the run made the folder if any of its processes did
        created_workdir = bool(multihost_utils.process_allgather(np.int32(created_workdir)).any())
    lock = WorkdirLock(workdir)  # refused: a running train.py made the folder, it stays
    checkpointer = None
    try:
        parallel.on_every_process(lambda: _check_run_folders(config, workdir),
                                  "process(es) {processes} cannot write the run's folders; "
                                  "their errors are in their logs")
        checkpointer = Checkpointer(checkpoint_dir(workdir), config.train.keep_checkpoints)
        start_step = checkpointer.latest_step() or 0
        # Every process reports its step to JAX's preemption sync now: a notice that arrives
        # while resuming then stops the run at start_step + 1 (else at step 1, never reached).
        preempted_early = checkpointer.manager.reached_preemption(start_step)
        # before Orbax's restore, whose barrier a process seeing no checkpoint would not join
        run_setup.check_processes_share(workdir, start_step, config)
        saved_run = checkpointer.restore_run_info(start_step) if start_step else None
        if saved_run:
            run_setup.check_resume_settings(saved_run, config, start_step)
            run_setup.check_resume_dataset(saved_run, config, workdir, start_step)
        dataset = run_setup.prepare_run_data(config, workdir)
        if saved_run:
            run_setup.check_resume_codes(saved_run, dataset, start_step)
    except BaseException:
        _close_in_order(checkpointer.close if checkpointer is not None else None,
                        lambda: lock.release(remove_file=created_workdir),
                        (lambda: run_setup.remove_new_workdir(workdir)) if created_workdir
                        else None)
        raise
    return lock, checkpointer, start_step, preempted_early, dataset


def _check_run_folders(config, workdir: str) -> None:
    """Refuses a ``checkpoints/`` that cannot be written (Orbax would wait 300 s for the first
    save), and a data dir that would need creating where it cannot be (an existing one is
    checked by ``prepare_dataset`` only if the dataset must be built: a read-only one that
    holds it is read as it is)."""
    check_writable(checkpoint_dir(workdir), "checkpoints are saved there")
    data = run_setup.data_dir(config, workdir)
    if not os.path.isdir(data):
        check_writable(data, "the dataset is prepared there (config.data.data_dir)")


def _write_run_info(workdir: str, run_info: dict) -> None:
    """config.json and data_stats.json of ``run_info`` (process 0)."""
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, CONFIG_FILE), run_info["config"])
        write_json_atomic(os.path.join(workdir, DATA_STATS_FILE), run_info["data_stats"])


def _initial_state(config, dataset: PreparedDataset, optimizer) -> tuple[nnx.GraphDef,
                                                                         TrainState]:
    start = time.perf_counter()
    graphdef, state = init_state(ModelConfig.from_config(config.model, dataset.stats.vocab_size),
                                 optimizer, config.seed)
    logging.info("Model: %s parameters, initialized in %.1f s",
                 f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
                 time.perf_counter() - start)
    return graphdef, state


def _train_batches(config, dataset: PreparedDataset):
    """This process's share of every training batch, padded or packed, in a checkpointable
    iterator."""
    make_dataset = packed_train_dataset if config.data.packing else train_dataset
    return iter(make_dataset(dataset, "train", config.train.batch_size, config.data.max_len,
                             seed=config.seed, shard_index=jax.process_index(),
                             shard_count=jax.process_count(), workers=config.data.workers))


def compile_step(run: Run, first_batch: dict) -> tuple[parallel.CompiledTrainStep, list]:
    """The run's train step compiled ahead of time for batches like ``first_batch``; its
    carry is (train state, ``WindowTotals``). Also a list that gets one entry each time the
    step is traced (one when nothing recompiles)."""
    traces = []
    window_step = make_window_step(make_train_step(
        run.graphdef, run.optimizer, jnp.asarray(run.probs, jnp.float32),
        mask_root(run.config.seed), run.config.loss.unmasked_weight, run.launcher.axis_name))

    def counted_step(carry, batch):
        traces.append(1)  # runs only while tracing
        return window_step(carry, batch)

    start = time.perf_counter()
    with jax.transfer_guard(run.config.train.transfer_guard):
        compiled = run.launcher.compile_train_step(
            counted_step, (run.state, run.launcher.put_state(WindowTotals.zeros())),
            first_batch)
    logging.info("Compiled the train step in %.1f s", time.perf_counter() - start)
    return compiled, traces


class TrainLoop:
    """Steps, logging windows, validation, checkpoints and preemption of a compiled run.

    The train state and the window's metric totals stay on the devices as the compiled step's
    carry. The host reads the totals once per logging window (``train.log_every`` steps) and
    their non-finite step alone before each validation and save, so a step whose loss or
    gradient is not finite ends the run before anything after it is evaluated or saved.
    """

    def __init__(self, run: Run, step: parallel.CompiledTrainStep):
        self.run, self.step, self.config = run, step, run.config
        self.carry = step.flatten((run.state, self._empty_totals()))
        run.state = None  # the carry holds it now (its arrays are donated to each step)
        self.eval_step = run.launcher.eval_step(make_eval_step(
            run.graphdef, run.dataset.stats.vocab_size, self.config.eval.mask_rate,
            self.config.eval.mask_seed, run.launcher.axis_name))
        self.writer = MetricsWriter(os.path.join(run.workdir, METRICS_FILE), run.start_step,
                                    tensorboard_dir=run.workdir)
        self.progress = Progress(self.config.train.num_steps)
        self.window = _WindowClock(run.start_step + 1)
        self.last_train, self.last_eval = {}, {}

    def train(self, first_batch: dict) -> dict:
        """Trains from the run's start step to ``train.num_steps`` (or a preemption); returns
        the final step, the last window's and validation's metrics and whether preempted."""
        train, guard = self.config.train, self.config.train.transfer_guard
        preemption = SaveOnSigterm(self.run.checkpointer, parallel.python_handles_sigterm(),
                                   self.run.preempted_early)
        batch, preempted = first_batch, False
        in_flight = collections.deque()  # step numbers of the steps dispatched, not waited for
        try:
            for step in range(self.run.start_step + 1, train.num_steps + 1):
                if batch is None:
                    batch = self.window.timed_wait(self.run.data)
                with jax.transfer_guard(guard):
                    self.carry, step_number = self.step(self.carry, self.step.put(batch))
                    in_flight.append(step_number)
                    if len(in_flight) > MAX_STEPS_AHEAD:
                        in_flight.popleft().block_until_ready()
                    if step % train.log_every == 0 or step == train.num_steps:
                        self._log_window(step)
                batch = None
                pause_start = time.perf_counter()
                if step % train.eval_every == 0 or step == train.num_steps:
                    self._validate(step)
                if preemption.reached(step):
                    if step % train.log_every and step != train.num_steps:
                        self.window.exclude(time.perf_counter() - pause_start)
                        self._log_window(step)  # the steps since the last line
                    save_start = time.perf_counter()
                    self._save(step)
                    self.run.checkpointer.wait_until_saved()  # "saved" below means on disk
                    preempted = True
                    logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved in %.1f s; "
                                    "rerun the same command to resume", step,
                                    time.perf_counter() - save_start)
                    break
                if step % train.checkpoint_every == 0 or step == train.num_steps:
                    self._save(step)
                self.window.exclude(time.perf_counter() - pause_start)
        finally:
            self.writer.close()
            preemption.restore_handler()
        final = self.run.launcher.checkpoint_view(self._state()).step
        return dict(step=int(jax.device_get(final)), train=self.last_train, eval=self.last_eval,
                    preempted=preempted)

    def _state(self) -> TrainState:
        return self.step.unflatten(self.carry)[0]

    def _totals(self) -> WindowTotals:
        return self.step.unflatten(self.carry)[1]

    def _empty_totals(self) -> WindowTotals:
        return self.run.launcher.put_state(WindowTotals.zeros())

    def _log_window(self, step: int) -> None:
        """Reads the window's totals (one transfer), stops if a step was not finite, writes
        metrics.jsonl, TensorBoard and the progress line, and starts the next window."""
        totals = self.run.launcher.fetch(self._totals())
        self._stop_if_not_finite(totals, step)
        elapsed, steps = self.window.elapsed(), int(totals.steps)
        tokens = totals.total("num_tokens")
        slots = steps * self.config.train.batch_size * self.config.data.max_len
        self.last_train = dict(totals.summary(), step=step, window_steps=steps,
                               tokens_per_sec=tokens / elapsed, steps_per_sec=steps / elapsed,
                               real_token_fraction=tokens / slots,
                               data_wait_fraction=self.window.data_wait / elapsed)
        self.writer.write(self.last_train)
        self.progress.log(step, self.last_train)
        self.carry = self.step.flatten((self._state(), self._empty_totals()))
        self.window = _WindowClock(step + 1)

    def _check_finite(self, step: int) -> None:
        """Before a validation or save: the window's non-finite step, read alone."""
        if self.run.launcher.fetch(self._totals().first_nonfinite):
            self._stop_if_not_finite(self.run.launcher.fetch(self._totals()), step)

    def _stop_if_not_finite(self, totals: WindowTotals, step: int) -> None:
        if not totals.first_nonfinite:
            return
        loss, grad_norm = np.asarray(totals.nonfinite_values).tolist()
        last = self.run.checkpointer.latest_step()
        raise FloatingPointError(
            f"step {int(totals.first_nonfinite)}: the loss ({loss:.4g}) or gradient norm "
            f"({grad_norm:.4g}) is not finite (the first such step of steps "
            f"{self.window.first_step}-{step}); training stopped and saved nothing after it: "
            + (f"the last checkpoint is step {last}" if last is not None
               else "no checkpoint was saved")
            + " (lower config.train.learning_rate, or look for extreme values in the data)")

    def _validate(self, step: int) -> None:
        self._check_finite(step)
        with jax.transfer_guard(self.config.train.transfer_guard):
            result = evaluate_split(self.eval_step, self._state().params, self.run.dataset,
                                    self.config, self.run.launcher, self.run.probs)
        self.last_eval = dict(result["overall"], step=step, split=self.config.eval.split)
        self.writer.write(self.last_eval)
        if jax.process_index() == 0:
            logging.info("eval %s step %d: %s", self.config.eval.split, step,
                         against_baselines(self.last_eval))

    def _save(self, step: int) -> None:
        self._check_finite(step)  # a non-finite step is never saved
        self.run.checkpointer.save(step, self.run.launcher.checkpoint_view(self._state()),
                                   self.run.data, self.run.run_info)


class _WindowClock:
    """A logging window's training time (evaluating and saving excluded) and the part of it
    the host waited for the input pipeline."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.start = time.perf_counter()
        self.data_wait = 0.0

    def timed_wait(self, data: Iterator[dict]) -> dict:
        """The next batch of ``data``; the wait counts as data wait."""
        start = time.perf_counter()
        batch = next(data)
        self.data_wait += time.perf_counter() - start
        return batch

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
