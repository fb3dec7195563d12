"""One training at a time per workdir: process 0 holds an exclusive ``flock`` on the workdir
folder while it trains, so a second ``train.py`` (a resubmitted job, a forgotten
``--config.parallel.distributed=True`` under ``srun``) stops in one line instead of writing
every step and checkpoint twice."""

from __future__ import annotations

import errno
import fcntl
import os

import jax
from absl import logging


class WorkdirLock:
    """Held from construction to ``release`` (or the process's end) by process 0; the other
    processes of a multi-process run hold nothing. On a filesystem without locks the run goes
    on with a warning."""

    def __init__(self, workdir: str):
        self.fd = None
        if jax.process_index() != 0:
            return
        fd = os.open(workdir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                logging.warning("%s: cannot lock the workdir (%s); nothing stops a second "
                                "train.py from writing into it at the same time", workdir,
                                error.strerror)
                return
            raise ValueError(f"{workdir}: another train.py (or study) is training in this "
                             "workdir now; wait for it to end, or use another --workdir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
