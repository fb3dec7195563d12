"""eval.py's results are written into a new folder beside the results folder, then moved into
it file by file: a failed or interrupted evaluation (a full disk, Ctrl-C) leaves the earlier
results as they were, and files of the results folder that eval.py does not write stay."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def staged(final: str) -> Iterator[str]:
    """A new empty folder beside ``final`` (``.<name>.incomplete-*``) to write the results
    into; removed on exit, with whatever ``move_into`` did not move."""
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(final)),
                               prefix=f".{os.path.basename(final)}.incomplete-")
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staged_files(staging: str) -> list[str]:
    """The files under ``staging``, as paths relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(folder, name), staging)
                  for folder, _, names in os.walk(staging) for name in names)


def check_room(staging: str, final: str) -> None:
    """ValueError naming the path when a file of ``staging`` would land where ``final`` has
    a folder, or needs a folder where ``final`` has a file: checked before anything moves."""
    final = os.path.abspath(final)
    for relative in staged_files(staging):
        target = os.path.join(final, relative)
        if os.path.isdir(target):
            raise ValueError(f"{target}: a folder where eval.py writes a file; move it away "
                             "and evaluate again (the earlier results are unchanged)")
        parent = os.path.dirname(target)
        while parent.startswith(final + os.sep):
            if os.path.lexists(parent) and not os.path.isdir(parent):
                raise ValueError(f"{parent}: a file where eval.py writes a folder; move it "
                                 "away and evaluate again (the earlier results are unchanged)")
            parent = os.path.dirname(parent)


def move_into(staging: str, final: str, last: tuple[str, ...] = ()) -> None:
    """Moves every file of ``staging`` to the same path under ``final``, replacing a file of
    that name, the paths in ``last`` (relative, e.g. "metrics.json") after all others."""
    for relative in sorted(staged_files(staging), key=lambda path: path in last):
        target = os.path.join(final, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, relative), target)
