"""Checkpoints with a truncated or damaged file: found before Orbax reads them (its error is a
TensorStore traceback), set aside on resume, named in one line on evaluation."""

from __future__ import annotations

import glob
import json
import os
import re

import tensorstore as ts
from absl import logging

# The JSON files of a step folder (Orbax's and grain's metadata, the run item); other files,
# OCDBT's array databases included, are read through TensorStore or not at all.
_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
# The files every checkpoint of Checkpointer.save holds, besides each process's input-pipeline
# position (data/process_<i>-of-<n>.json)
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
                   "run/metadata")


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be read back; the message names its step and what to do."""


def damage(step_dir: str) -> str | None:
    """What is damaged in the checkpoint folder ``step_dir`` ("run/metadata: Expecting ...",
    "state/_METADATA: missing", or for an array database "state: OUT_OF_RANGE: ... of local
    file .../state/d/3f2a ..."), or None when every file a checkpoint needs is there, every
    JSON file parses and every value of every array database reads in full. Reads the whole
    checkpoint once."""
    missing = _missing_file(step_dir)
    if missing:
        return f"{missing}: missing"
    for folder, subfolders, files in os.walk(step_dir):
        subfolders[:] = [name for name in subfolders  # OCDBT's files: read through its root
                         if name != "d" and not name.startswith("ocdbt.process_")]
        if "manifest.ocdbt" in files:
            problem = _unreadable_database(folder)
            if problem:
                return f"{os.path.relpath(folder, step_dir)}: {problem}"
        for name in files:
            if not (name in _JSON_NAMES or name.endswith(".json")
                    or os.path.basename(folder) == "array_metadatas"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as error:
                return f"{os.path.relpath(os.path.join(folder, name), step_dir)}: {error}"
    return None


def _missing_file(step_dir: str) -> str | None:
    """The first file that every checkpoint of ``Checkpointer.save`` holds (Orbax's metadata,
    the state's array database, the run item, each process's input-pipeline position) and
    ``step_dir`` lacks, relative to it; or None."""
    for name in _REQUIRED_FILES:
        if not os.path.isfile(os.path.join(step_dir, name)):
            return name
    positions = glob.glob(os.path.join(step_dir, "data", "process_*-of-*.json"))
    if not positions:
        return "data/process_0-of-1.json"
    processes = int(re.search(r"-of-(\d+)\.json$", positions[0]).group(1))
    for index in range(processes):
        name = f"data/process_{index}-of-{processes}.json"
        if not os.path.isfile(os.path.join(step_dir, name)):
            return name
    return None


def _unreadable_database(folder: str) -> str | None:
    """What is wrong with the OCDBT database in ``folder`` (the arrays of one item): an entry
    the root lists that no process's own database (``ocdbt.process_*``) holds, or
    TensorStore's first error line on reading every value through those databases; None when
    all read in full. Read through the root instead, a value whose data file or process folder
    is gone comes back short, without an error."""
    try:
        listed = set(_open_database(folder).list().result())
        held = set()
        for part in sorted(glob.glob(os.path.join(folder, "ocdbt.process_*"))):
            store = _open_database(part)
            for key in store.list().result():
                store.read(key).result()
                held.add(key)
    except Exception as error:  # noqa: BLE001 - TensorStore raises ValueError and others
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return lines[0][:200]
    if listed - held:
        return (f"{len(listed - held)} of {len(listed)} array entries are in no process's "
                "database (an ocdbt.process_* folder missing?)")
    return None


def _open_database(folder: str) -> ts.KvStore:
    return ts.KvStore.open({"driver": "ocdbt",
                            "base": "file://" + os.path.abspath(folder) + "/"}).result()


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, str(step))


def step_folders(directory: str) -> list[int]:
    """Steps of the complete checkpoints under ``directory``, oldest first: the folders named
    by a step alone (Orbax renames a save's temporary folder to that name when it completes).
    Listed without Orbax's CheckpointManager, whose barriers need every process."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def newest_intact(directory: str, steps: list[int]) -> int | None:
    """The newest of ``steps`` whose checkpoint has no damage, or None."""
    for step in sorted(steps, reverse=True):
        if damage(step_dir(directory, step)) is None:
            return step
    return None


def set_aside_damaged(directory: str) -> None:
    """Before a resume from the checkpoints under ``directory``: moves those newer than the
    newest intact one to ``damaged_checkpoints/`` beside ``directory``, with a warning naming
    each, so the run resumes from the intact one (Orbax would try the newest). Refuses, moving
    nothing, when no checkpoint is intact."""
    steps, damaged = step_folders(directory), []
    for step in reversed(steps):
        problem = damage(step_dir(directory, step))
        if problem is None:
            break
        damaged.append((step, problem))
    if not damaged:
        return
    if len(damaged) == len(steps):
        raise DamagedCheckpointError(
            f"{directory}: every checkpoint is damaged (step {damaged[0][0]}: {damaged[0][1]}); "
            f"to train from step 0 in this workdir, move {directory} aside, or use a new workdir")
    resume = steps[-len(damaged) - 1]
    for step, problem in damaged:
        moved_to = _free_path(os.path.join(os.path.dirname(os.path.abspath(directory)),
                                           "damaged_checkpoints", str(step)))
        os.makedirs(os.path.dirname(moved_to), exist_ok=True)
        os.rename(step_dir(directory, step), moved_to)
        logging.warning("%s: the checkpoint at step %d is damaged (%s); moved to %s, resuming "
                        "from step %d, the newest intact checkpoint", directory, step, problem,
                        moved_to, resume)


def check_intact(directory: str, step: int) -> None:
    """Raises DamagedCheckpointError naming ``step`` and the newest intact older step when
    the checkpoint at ``step`` is damaged."""
    problem = damage(step_dir(directory, step))
    if problem is None:
        return
    older = newest_intact(directory, [s for s in step_folders(directory) if s < step])
    remedy = (f"the newest intact checkpoint is step {older}: rerun the run's train.py command "
              f"(or the study) to set step {step} aside and train on from step {older}"
              if older is not None
              else "no older checkpoint is intact: train the run again in a new workdir")
    raise DamagedCheckpointError(f"{step_dir(directory, step)}: the checkpoint at step {step} "
                                 f"is damaged ({problem}); {remedy}")


def _free_path(path: str) -> str:
    """``path``, or ``path_2``, ``path_3``... when it exists."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}_{n}"
    return candidate
