"""One training and one evaluation per results folder at a time per workdir: process 0 holds
an exclusive ``flock`` on the workdir's ``.train.lock`` file while it trains (``.eval.lock``
while eval.py writes ``eval/``), so a second ``train.py`` (a resubmitted job, a forgotten
``--config.parallel.distributed=True`` under ``srun``) stops in one line instead of writing
every step and checkpoint twice, and a second ``eval.py`` instead of mixing its results with the
first's. A regular file, because NFS passes file locks to its server (so they hold across
machines); a GCS-FUSE mount keeps them on one machine only."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os

from absl import logging

from cvmae_jax import parallel


@dataclasses.dataclass(frozen=True)
class Activity:
    """What a lock keeps to one process at a time: its file in the workdir, the program and
    what a second one is told."""
    lock_file: str
    program: str
    busy: str


TRAINING = Activity(".train.lock", "train.py",
                    "another train.py (or study) is training in this workdir now; wait for it "
                    "to end, or use another --workdir")


def evaluation(results_folder: str) -> Activity:
    """eval.py writing the results folder ``results_folder`` (``eval``, ``eval_tuning``) of a
    run: one lock per folder, so the evaluations of two splits may run side by side."""
    return Activity(f".{results_folder}.lock", "eval.py",
                    f"another eval.py (or study) is writing this run's {results_folder}/ now; "
                    "wait for it to end")


class WorkdirLock:
    """Held from construction to ``release`` (or the process's end) by process 0; the other
    processes of a multi-process run hold nothing but raise with it when it is refused. On a
    filesystem without locks the run goes on with a warning."""

    def __init__(self, workdir: str, activity: Activity = TRAINING):
        self.path = os.path.join(workdir, activity.lock_file)
        self.fd = parallel.on_process_0(
            lambda: _lock(self.path, workdir, activity),
            f"{workdir}: process 0 could not lock the workdir; its error is in its log")

    def release(self, remove_file: bool = False) -> None:
        """Releases the lock; ``remove_file``: also deletes the lock file (a workdir the run
        created and leaves empty)."""
        if self.fd is None:
            return
        if remove_file:
            os.remove(self.path)
        os.close(self.fd)  # closing the descriptor releases the lock
        self.fd = None


def _lock(path: str, workdir: str, activity: Activity) -> int | None:
    """The descriptor of ``path`` locked exclusively; None (after a warning) where the
    filesystem has no locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:  # a read-only workdir: what must be written is checked after
        return _unlocked(workdir, error, activity)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _unlocked(workdir, error, activity)
        raise ValueError(f"{workdir}: {activity.busy}") from None
    return fd


def _unlocked(workdir: str, error: OSError, activity: Activity) -> None:
    """None, after a warning that nothing keeps a second ``activity`` out."""
    logging.warning("%s: cannot lock the workdir (%s); nothing stops a second %s from writing "
                    "into it at the same time", workdir, error.strerror, activity.program)
