"""SIGTERM (a scheduler's preemption) in train.py and eval.py. During training the loop saves a
checkpoint after the current step and exits 0 (``SaveOnSigterm``). Before the first step
(preparing the data, restoring, compiling) there is nothing new to save: set-up stops at once
(``sigterm_stops_setup``), cleaning up what it started as after Ctrl-C, and train.py exits 0.
An evaluation or cvmae-prepare's preparation stops at once (``sigterm_terminates``),
removing what it staged as after Ctrl-C, and the command exits 143, as a process ended by
SIGTERM does. Once jax.distributed is initialized (several processes, or one launched that
way), JAX's preemption sync catches SIGTERM itself, and no Python handler is installed: one
would replace JAX's, and setting back the handler Python saw would leave none."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module stays light: cli.py imports Preempted
    from cvmae_jax.checkpoint import Checkpointer


class Preempted(KeyboardInterrupt):
    """SIGTERM before the first training step. A KeyboardInterrupt, so that everything set-up
    removes after Ctrl-C (a half-prepared dataset, a new workdir) is removed after it too."""


def handles_sigterm(python_handler: bool) -> bool:
    """Python signal handlers run in the main thread; ``python_handler`` False (JAX's
    preemption sync catches SIGTERM) installs none."""
    return python_handler and threading.current_thread() is threading.main_thread()


class Terminated(KeyboardInterrupt):
    """SIGTERM during an evaluation or a preparation. A KeyboardInterrupt, so that what it
    staged (results, a half-prepared dataset) is removed as after Ctrl-C."""


def sigterm_stops_setup(python_handler: bool):
    """Within the block, SIGTERM raises ``Preempted`` (where ``handles_sigterm``)."""
    return _sigterm_raises(python_handler, lambda: Preempted(
        "preempted (SIGTERM) before the first training step: nothing new to save; rerun the "
        "same command (train.py resumes from its last checkpoint)"))


def sigterm_terminates(what: str, python_handler: bool):
    """Within the block, SIGTERM raises ``Terminated("terminated (SIGTERM) <what>; rerun the
    same command")`` (where ``handles_sigterm``)."""
    return _sigterm_raises(python_handler, lambda: Terminated(
        f"terminated (SIGTERM) {what}; rerun the same command"))


@contextlib.contextmanager
def _sigterm_raises(python_handler: bool, error: Callable[[], KeyboardInterrupt]):
    """Within the block, SIGTERM raises ``error()`` (where ``handles_sigterm``)."""
    if not handles_sigterm(python_handler):
        yield
        return

    def stop(*_):
        raise error()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class SaveOnSigterm:
    """SIGTERM sets a flag the loop checks after each step (``python_handler``). Under
    jax.distributed, Orbax's preemption sync point makes every process stop at the same step. The
    host runs at most ``train.MAX_STEPS_AHEAD`` steps ahead of the devices, so the save
    follows the signal after at most that many steps."""

    def __init__(self, checkpointer: Checkpointer, python_handler: bool,
                 preempted_early: bool = False):
        self.checkpointer = checkpointer
        self.flag = threading.Event()
        if preempted_early:
            self.flag.set()
        self.previous = None
        if handles_sigterm(python_handler):
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

    def reached(self, step: int) -> bool:
        return self.flag.is_set() or self.checkpointer.manager.reached_preemption(step)

    def restore_handler(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
