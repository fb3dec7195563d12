"""SIGTERM (a scheduler's preemption) in train.py and eval.py. During training the loop saves a
checkpoint after the current step and exits 0 (``SaveOnSigterm``). Before the first step
(preparing the data, restoring, compiling) there is nothing new to save: set-up stops at once
(``sigterm_stops_setup``), cleaning up what it started as after Ctrl-C, and train.py exits 0.
With several processes JAX's preemption sync handles SIGTERM in training, and neither is
installed. An evaluation or a preparation stops at once (``sigterm_terminates``), removing
what it staged as after Ctrl-C, and the command exits 143, as a process ended by SIGTERM
does."""

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


def handles_sigterm(single_process: bool) -> bool:
    """Python signal handlers run in the main thread; several processes leave SIGTERM to
    JAX's preemption sync."""
    return single_process and threading.current_thread() is threading.main_thread()


class Terminated(KeyboardInterrupt):
    """SIGTERM during an evaluation or a preparation. A KeyboardInterrupt, so that what it
    staged (results, a half-prepared dataset) is removed as after Ctrl-C."""


def sigterm_stops_setup(single_process: bool):
    """Within the block, SIGTERM raises ``Preempted``."""
    return _sigterm_raises(single_process, lambda: Preempted(
        "preempted (SIGTERM) before the first training step: nothing new to save; rerun the "
        "same command (train.py resumes from its last checkpoint)"))


def sigterm_terminates(what: str):
    """Within the block, SIGTERM raises ``Terminated("terminated (SIGTERM) <what>; rerun the
    same command")``, in the main thread, on each process that receives it."""
    return _sigterm_raises(True, lambda: Terminated(f"terminated (SIGTERM) {what}; rerun the "
                                                    "same command"))


@contextlib.contextmanager
def _sigterm_raises(single_process: bool, error: Callable[[], KeyboardInterrupt]):
    """Within the block, SIGTERM raises ``error()`` (where ``handles_sigterm``)."""
    if not handles_sigterm(single_process):
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
    """SIGTERM sets a flag the loop checks after each step (single process). With several
    processes, Orbax's preemption sync point makes every process stop at the same step. The
    host runs at most ``train.MAX_STEPS_AHEAD`` steps ahead of the devices, so the save
    follows the signal after at most that many steps."""

    def __init__(self, checkpointer: Checkpointer, single_process: bool,
                 preempted_early: bool = False):
        self.checkpointer = checkpointer
        self.flag = threading.Event()
        if preempted_early:
            self.flag.set()
        self.previous = None
        if handles_sigterm(single_process):
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

    def reached(self, step: int) -> bool:
        return self.flag.is_set() or self.checkpointer.manager.reached_preemption(step)

    def restore_handler(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
