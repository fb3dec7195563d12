"""Atomic files: written to a temporary file in the same folder, then renamed, with the
permissions a plain ``open`` would give (``mkstemp`` alone makes them private, 0600).

JSON is written strict (``allow_nan=False``): a non-finite float is written as the string
"inf", "-inf" or "nan" (``json_float``), which ``read_json`` and ``loads_json`` turn back into
the float, so every file parses with any JSON reader.

A folder is checked before long work that ends by writing there (``check_writable``): it must
be a local path (a mounted bucket, not a ``gs://`` URL) where files can be created.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: changing it later could race with other threads' files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yields a temporary path next to ``path``; when the block ends without an error it is
    renamed to ``path`` (readers never see a half-written file), otherwise removed. An
    OSError that names no file (a full disk) is raised again naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:
            raise os_error_saying(error, f"{path}: could not write it: {error}") from error
        raise


def os_error_saying(error: OSError, message: str) -> OSError:
    """An error reading ``message``, of ``error``'s type where that is a built-in one
    (PermissionError, FileNotFoundError, ...; else OSError), so callers that catch one still
    do."""
    kind = type(error) if type(error).__module__ == "builtins" else OSError
    return kind(message)


NONFINITE = ("inf", "-inf", "nan")


def json_float(x) -> float | str:
    """x as a JSON number, or "inf", "-inf", "nan" when it is not finite."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def strict_json(obj):
    """``obj`` (dicts, lists, tuples, numbers, strings, None) with every non-finite float
    replaced by ``json_float``'s string."""
    if isinstance(obj, float):
        return json_float(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps_json(obj, **kwargs) -> str:
    """``json.dumps`` of ``strict_json(obj)`` with ``allow_nan=False``."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def _restore_nonfinite(pairs: list[tuple]) -> dict:
    return {k: float(v) if isinstance(v, str) and v in NONFINITE else v for k, v in pairs}


def loads_json(text: str):
    """``json.loads`` with the values "inf", "-inf", "nan" read back as floats."""
    return json.loads(text, object_pairs_hook=_restore_nonfinite)


def read_json(path: str | os.PathLike, missing_hint: str = ""):
    """The JSON content of ``path`` (``loads_json``); FileNotFoundError (with ``missing_hint``)
    or ValueError naming the file when it is missing or not valid JSON."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing" + (f"; {missing_hint}" if missing_hint else ""))
    try:
        with open(path) as f:
            return loads_json(f.read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented strict JSON (``dumps_json``) to ``path`` atomically."""
    write_text_atomic(path, dumps_json(obj, indent=1) + "\n")


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # gs://, s3://, hdfs://, file://
MOUNT_HINT = ("this tool reads and writes local paths: mount the bucket (Cloud Storage FUSE, "
              "s3fs, ...) and pass the mount's path")


def is_url(path) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/x``), not a local path."""
    return bool(URL.match(os.fspath(path)))


def check_writable(folder: str | os.PathLike, purpose: str) -> None:
    """Raises ValueError when files cannot be created in ``folder`` (or, while it does not
    exist, in its nearest existing parent): called before long work that ends by writing there,
    so a read-only or mistyped path fails in a second, not after the work. Tried by creating
    and removing an empty folder there: permission bits say nothing for root, read-only mounts
    or root-squashed shares. An empty path (an unset shell variable) and a URL are refused
    too."""
    if not os.fspath(folder).strip():
        raise ValueError(f"an empty path where a folder is needed (an unset shell variable?); "
                         f"{purpose}")
    if is_url(folder):
        raise ValueError(f"{folder}: a URL, not a folder ({purpose}); {MOUNT_HINT}")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{folder}: cannot write there ({existing} is not a folder: it is a "
                         f"file); {purpose}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write_check_"))
    except OSError as error:
        raise ValueError(f"{folder}: cannot write there ({existing} refuses new files: "
                         f"{(error.strerror or str(error)).lower()}); {purpose}") from None
