"""One training at a time per workdir: process 0 holds an exclusive ``flock`` on the workdir's
``.train.lock`` file while it trains, so a second ``train.py`` (a resubmitted job, a forgotten
``--config.parallel.distributed=True`` under ``srun``) stops in one line instead of writing
every step and checkpoint twice. A regular file, because NFS passes file locks to its server
(so they hold across machines); a GCS-FUSE mount keeps them on one machine only."""

from __future__ import annotations

import errno
import fcntl
import os

from absl import logging

from cvmae_jax import parallel

LOCK_FILE = ".train.lock"


class WorkdirLock:
    """Held from construction to ``release`` (or the process's end) by process 0; the other
    processes of a multi-process run hold nothing but raise with it when it is refused. On a
    filesystem without locks the run goes on with a warning."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd = parallel.on_process_0(
            lambda: _lock(self.path, workdir),
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


def _lock(path: str, workdir: str) -> int | None:
    """The descriptor of ``path`` locked exclusively; None (after a warning) where the
    filesystem has no locks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            logging.warning("%s: cannot lock the workdir (%s); nothing stops a second train.py "
                            "from writing into it at the same time", workdir, error.strerror)
            return None
        raise ValueError(f"{workdir}: another train.py (or study) is training in this workdir "
                         "now; wait for it to end, or use another --workdir") from None
    return fd
