"""eval.py's results are written into a new folder inside the results folder, then moved into
place file by file: a failed or interrupted evaluation (a full disk, Ctrl-C) leaves the earlier
results as they were, and files of the results folder that eval.py does not write stay."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

from cvmae_jax.jsonio import os_error_saying


STAGING_PREFIX = ".incomplete-"


class NoRoom(ValueError):
    """A file or folder of the results folder is in the way of the finished results, which
    stay in their staging folder (the message names both)."""


@contextlib.contextmanager
def staged(final: str) -> Iterator[str]:
    """A new empty folder ``<final>/.incomplete-<host>-<pid>-*`` (on ``final``'s own file
    system, through a link too) to write the results into; removed on exit with whatever
    ``move_into`` did not move, except after ``NoRoom``. A ``final`` this call created is
    removed again when the results never reach it. An OSError (a full disk) is raised again
    naming its file's path under ``final``, or ``final``."""
    final = os.path.realpath(final)
    created = not os.path.isdir(final)
    os.makedirs(final, exist_ok=True)
    staging = tempfile.mkdtemp(dir=final, prefix=_staging_prefix())
    try:
        yield staging
    except NoRoom:
        raise
    except OSError as error:  # a full disk: named as the file's final path, or the folder
        _remove(staging, final if created else None)
        message = str(error).replace(staging, final)
        if final not in message:
            message = f"{final}: could not write the evaluation's results there: {message}"
        raise os_error_saying(error, message) from error
    except BaseException:
        _remove(staging, final if created else None)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _remove(staging: str, created: str | None) -> None:
    """Removes ``staging`` and the results folder ``created`` (None: it existed) while it is
    empty."""
    shutil.rmtree(staging, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(created)


class Leftovers(NamedTuple):
    """The staging folders an earlier evaluation left in a results folder."""
    removed: int  # of evaluations on this machine that were killed before they finished
    finished: list[str]  # paths holding finished results that were never moved in
    others: int  # of evaluations running now, on other machines, or of unknown origin


def remove_interrupted(final: str, finished_file: str) -> Leftovers:
    """Removes the staging folders of ``final`` whose evaluation, on this machine, has ended
    without finishing (killed: its process is gone) and that hold no ``finished_file``; the
    others stay (``Leftovers``)."""
    removed, finished, others = 0, [], 0
    names = sorted(os.listdir(final)) if os.path.isdir(final) else []
    for name in names:
        path = os.path.join(final, name)
        if not (name.startswith(STAGING_PREFIX) and os.path.isdir(path)):
            continue
        if os.path.exists(os.path.join(path, finished_file)):
            finished.append(path)
        elif _ended_here(name):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        else:
            others += 1
    return Leftovers(removed, finished, others)


def _staging_prefix() -> str:
    """``.incomplete-<host>-<pid>-``: whose staging folder it is."""
    return f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _ended_here(name: str) -> bool:
    """Whether a staging folder's name, as ``_staging_prefix`` makes it (tempfile's random part
    has no ``-``), names this machine and a process that no longer runs; False for other
    names."""
    parts = name[len(STAGING_PREFIX):].rsplit("-", 2)
    return (len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit()
            and not _alive(int(parts[1])))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def staged_files(staging: str) -> list[str]:
    """The files under ``staging``, as paths relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(folder, name), staging)
                  for folder, _, names in os.walk(staging) for name in names)


def check_room(staging: str, final: str) -> None:
    """``NoRoom`` naming the path when a file of ``staging`` would land where ``final`` has a
    folder, or needs a folder where ``final`` has a file: checked before anything moves."""
    final = os.path.realpath(final)
    kept = f"the finished results wait in {staging}; move the path away and move them in"
    for relative in staged_files(staging):
        target = os.path.join(final, relative)
        if os.path.isdir(target):
            raise NoRoom(f"{target}: a folder where eval.py writes a file; {kept}")
        parent = os.path.dirname(target)
        while parent.startswith(final + os.sep):
            if os.path.lexists(parent) and not os.path.isdir(parent):
                raise NoRoom(f"{parent}: a file where eval.py writes a folder; {kept}")
            parent = os.path.dirname(parent)


def move_into(staging: str, final: str, last: tuple[str, ...] = ()) -> None:
    """Moves every file of ``staging`` to the same path under ``final``, replacing a file of
    that name (copied where a linked folder lies on another file system), the paths in
    ``last`` (relative, e.g. "metrics.json") after all others."""
    for relative in sorted(staged_files(staging), key=lambda path: path in last):
        target = os.path.join(final, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(staging, relative), target)
