"""Orbax checkpoints: train state, input-pipeline position and run metadata, saved together."""

from __future__ import annotations

import os
from shutil import disk_usage

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from cvmae_jax import parallel
from cvmae_jax.damaged_checkpoints import check_intact, set_aside_damaged, step_dir

CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # Orbax's metadata, the pipeline position, the run item


class Checkpointer:
    """Async keep-latest-N checkpoints under ``directory``; restores the newest complete one.

    Each checkpoint holds three items: ``state`` (params, optimizer state, step), ``data`` (the
    input pipeline's position, saved by grain's checkpoint handler) and ``run`` (config and
    dataset statistics, as JSON). Orbax writes to a temporary folder and renames it when
    complete, so a save killed half-way is ignored. Damaged checkpoints (a truncated file)
    newer than the newest intact one are set aside first, with a warning, so a resume starts
    from the intact one.
    """

    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = str(directory)
        parallel.on_process_0(lambda: set_aside_damaged(self.directory),
                              "process 0 could not check the checkpoints; its error is in its "
                              "log")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    @staticmethod
    def latest_complete_step(directory: str | os.PathLike) -> int | None:
        """The newest complete checkpoint's step under ``directory``, creating nothing (None
        when there is no such folder or no complete checkpoint in it)."""
        steps = Checkpointer.complete_steps(directory)
        return steps[-1] if steps else None

    @staticmethod
    def complete_steps(directory: str | os.PathLike) -> list[int]:
        """The steps of the complete checkpoints under ``directory``, ascending, creating
        nothing ([] when there is no such folder)."""
        if not os.path.isdir(directory):
            return []
        manager = _read_only_manager(directory)
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()

    @staticmethod
    def restore_state(directory: str | os.PathLike, step: int, abstract_state,
                      verified: bool = False):
        """The ``state`` item of checkpoint ``step``, read without writing anything, onto the
        shardings of ``abstract_state``. A damaged checkpoint is refused in one line naming
        its step and the newest intact one (``verified``: ``read_run_info`` of the same step
        has just checked it, so the arrays are not read twice)."""
        if not verified:
            check_intact(str(directory), step)
        manager = _read_only_manager(directory)
        try:
            return manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        finally:
            manager.close()

    @staticmethod
    def saved_shapes(directory: str | os.PathLike, step: int) -> dict[str, tuple[int, ...]]:
        """``array_shapes`` of the ``state`` item of checkpoint ``step``, from its metadata
        (no array is read)."""
        handler = ocp.StandardCheckpointHandler()
        return array_shapes(handler.metadata(epath.Path(step_dir(str(directory), step))
                                             / "state"))

    def save(self, step: int, state, data_iterator, run_info: dict) -> None:
        """Starts an async save once the previous one has finished and the folder has room
        for this one (``check_room``, on process 0); the next save or ``close`` waits for
        it."""
        self.wait_until_saved()
        newest = self.manager.latest_step()
        parallel.on_process_0(lambda: check_room(self.directory, state, newest),
                              "process 0 found no room for the checkpoint; its error is in its "
                              "log")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            run=ocp.args.JsonSave(run_info)))

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores ``state`` onto the shardings of ``abstract_state`` (a pytree of
        ShapeDtypeStruct) and, when given, moves ``data_iterator`` to the saved position."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_run_info(self, step: int) -> dict:
        return _restore_run(self.manager, step)

    @staticmethod
    def read_run_info(directory: str | os.PathLike, step: int) -> dict:
        """The ``run`` item of checkpoint ``step`` (the config and data statistics it was saved
        with), read without writing anything. FileNotFoundError when there is no complete
        checkpoint at ``step``; a damaged one is refused as by ``restore_state``."""
        manager = _read_only_manager(directory)
        try:
            if step not in manager.all_steps():
                raise FileNotFoundError(f"{directory}: no checkpoint at step {step}")
            check_intact(str(directory), step)
            return _restore_run(manager, step)
        finally:
            manager.close()

    def close(self) -> None:
        try:
            self.wait_until_saved()
        finally:
            self.manager.close()

    def wait_until_saved(self) -> None:
        """Waits for the save in flight. Its failure (the disk filled during it), which Orbax
        raises here, is raised again as an OSError naming the folder and the step a rerun
        resumes from (the failed save is incomplete, so ignored)."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - Orbax re-raises its writer's error as is
            newest = Checkpointer.latest_complete_step(self.directory)
            then = (f"a rerun resumes from step {newest}" if newest is not None
                    else "no checkpoint is saved yet")
            raise OSError(f"{self.directory}: a checkpoint save failed ({error}); {then}") \
                from error


def check_room(directory: str, state, newest: int | None) -> None:
    """Refuses a save that might not fit (OSError naming the space free and needed) before
    anything is written, so a full disk leaves the newest checkpoint (step ``newest``) as it
    is. A checkpoint takes at most the bytes of ``state``'s arrays (Orbax compresses them
    with zstd: trained weights by a few percent) plus ``CHECKPOINT_OVERHEAD_BYTES`` of
    metadata."""
    need = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + CHECKPOINT_OVERHEAD_BYTES
    free = disk_usage(directory).free
    if free < need:
        then = (f"rerun the same command to resume from step {newest}" if newest is not None
                else "rerun the same command (no checkpoint is saved yet)")
        raise OSError(f"{directory}: {free / 2**20:.1f} MiB free on its file system and a "
                      f"checkpoint needs up to {need / 2**20:.1f} MiB; free space there, then "
                      f"{then}")


def _restore_run(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run


def _read_only_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """A manager that creates nothing and is never asked to save (Orbax's read_only=True
    would add two WARNING lines per use)."""
    return ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(create=False))


def array_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{path: shape} of every array of a state pytree (arrays, ShapeDtypeStructs or Orbax's
    metadata), paths written alike for each ("params/blocks/0/attn_norm/bias/value")."""
    def name(key) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of ``tree``, as a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
