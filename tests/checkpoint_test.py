"""Damaged checkpoints (a truncated file): resume sets them aside and goes on from the newest
intact one; evaluation names the step in one line. A save without room is refused before
anything is written."""

import logging
import os
import re
import shutil
import types

import jax.numpy as jnp
import pytest

from cvmae_jax import checkpoint
from cvmae_jax.damaged_checkpoints import (DamagedCheckpointError, check_intact, damage,
                                          set_aside_damaged)
from cvmae_jax.evaluation.run_eval import evaluate_run
from cvmae_jax.train import train_and_evaluate
from cvmae_jax.trained import load_trained
from train_test import read_metrics, tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 20-step run with checkpoints at steps 10 and 20."""
    data_dir = tmp_path_factory.mktemp("data")
    config = tiny_config(data_dir, num_steps=20, log_every=1, eval_every=100,
                         checkpoint_every=10)
    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(config, workdir)
    return config, workdir


def damaged_copy(workdir, tmp_path, step=20):
    """A copy of ``workdir`` whose checkpoint at ``step`` has every file of its array
    databases (OCDBT's ``d/`` folders) cut in half: what a full disk or a copy killed half-way
    leaves. Every file, so that the damage does not depend on which one a read reaches."""
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    data_files = [os.path.join(folder, name)
                  for folder, _, names in os.walk(os.path.join(copy, "checkpoints", str(step),
                                                               "state"))
                  if os.path.basename(folder) == "d" for name in names]
    assert data_files, "no OCDBT data files to damage"
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return copy


def test_an_intact_checkpoint_has_no_damage(finished):
    _, workdir = finished
    assert damage(os.path.join(workdir, "checkpoints", "20")) is None


@pytest.mark.parametrize("removed, problem", [
    ("state/ocdbt.process_0/d", "state: NOT_FOUND: Error reading"),  # read through the root,
    # these values come back short without an error
    ("state/ocdbt.process_0", r"state: (\d+) of \1 array entries are in no process's database"),
    ("state/_METADATA", "state/_METADATA: missing"),
    ("state/manifest.ocdbt", "state/manifest.ocdbt: missing"),
    ("run/metadata", "run/metadata: missing"),
    ("data/process_0-of-1.json", "data/process_0-of-1.json: missing"),
])
def test_a_checkpoint_missing_a_file_is_damaged(finished, tmp_path, removed, problem):
    _, workdir = finished
    copy = tmp_path / "20"
    shutil.copytree(os.path.join(workdir, "checkpoints", "20"), copy)
    target = copy / removed
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert re.match(problem, damage(str(copy)))


def test_resume_sets_a_damaged_checkpoint_aside_and_trains_on_from_the_intact_one(
        finished, tmp_path, caplog):
    config, workdir = finished
    copy = damaged_copy(workdir, tmp_path)
    with caplog.at_level(logging.WARNING):
        summary = train_and_evaluate(config, copy)
    assert summary["step"] == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "step 20" in warnings[0] and "step 10" in warnings[0]
    assert os.path.isdir(os.path.join(copy, "damaged_checkpoints", "20"))
    assert damage(os.path.join(copy, "checkpoints", "20")) is None  # saved again, intact
    expected = {m["step"]: m["loss"] for m in read_metrics(workdir) if "split" not in m}
    again = {m["step"]: m["loss"] for m in read_metrics(copy) if "split" not in m}
    assert again == expected  # steps 11-20 trained again from step 10, bitwise


def test_evaluating_a_damaged_checkpoint_names_its_step_and_the_intact_one(finished, tmp_path):
    _, workdir = finished
    copy = damaged_copy(workdir, tmp_path)
    for load in (evaluate_run, load_trained):
        with pytest.raises(DamagedCheckpointError) as raised:
            load(copy)
        message = str(raised.value)
        assert "\n" not in message
        assert "checkpoints/20: the checkpoint at step 20 is damaged" in message
        assert "the newest intact checkpoint is step 10" in message
    assert not os.path.exists(os.path.join(copy, "eval"))


def test_resume_with_every_checkpoint_damaged_is_refused_moving_nothing(finished, tmp_path):
    config, workdir = finished
    copy = damaged_copy(workdir, tmp_path)
    shutil.rmtree(os.path.join(copy, "checkpoints", "10"))
    with pytest.raises(DamagedCheckpointError, match="every checkpoint is damaged"):
        train_and_evaluate(config, copy)
    assert os.listdir(os.path.join(copy, "checkpoints")) == ["20"]
    assert not os.path.exists(os.path.join(copy, "damaged_checkpoints"))


@pytest.mark.parametrize("name", ["run/metadata", "data/process_0-of-1.json"])
def test_a_truncated_json_file_is_damaged(finished, tmp_path, name):
    _, workdir = finished
    copy = tmp_path / "20"
    shutil.copytree(os.path.join(workdir, "checkpoints", "20"), copy)
    path = copy / name
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert (damage(str(copy)) or "").startswith(f"{name}: ")


def test_a_missing_input_position_of_another_process_is_damage(finished, tmp_path):
    _, workdir = finished
    copy = tmp_path / "20"
    shutil.copytree(os.path.join(workdir, "checkpoints", "20"), copy)
    os.rename(copy / "data" / "process_0-of-1.json", copy / "data" / "process_0-of-2.json")
    assert damage(str(copy)) == "data/process_1-of-2.json: missing"


def test_an_older_damaged_checkpoint_stays_and_names_no_newer_one(finished, tmp_path):
    _, workdir = finished
    copy = damaged_copy(workdir, tmp_path, step=10)
    checkpoints = os.path.join(copy, "checkpoints")
    set_aside_damaged(checkpoints)
    assert sorted(os.listdir(checkpoints)) == ["10", "20"]
    assert not os.path.exists(os.path.join(copy, "damaged_checkpoints"))
    with pytest.raises(DamagedCheckpointError, match="step 10 is damaged .*no older checkpoint "
                                                     "is intact"):
        check_intact(checkpoints, 10)


def test_the_newest_of_several_intact_older_checkpoints_is_named(finished, tmp_path):
    _, workdir = finished
    copy = damaged_copy(workdir, tmp_path)
    checkpoints = os.path.join(copy, "checkpoints")
    shutil.copytree(os.path.join(checkpoints, "10"), os.path.join(checkpoints, "5"))
    with pytest.raises(DamagedCheckpointError, match="the newest intact checkpoint is step 10:"):
        check_intact(checkpoints, 20)


def test_a_step_set_aside_before_keeps_its_folder(finished, tmp_path):
    _, workdir = finished
    copy = damaged_copy(workdir, tmp_path)
    aside = os.path.join(copy, "damaged_checkpoints")
    for name in ("20", "20_2"):
        os.makedirs(os.path.join(aside, name))
        with open(os.path.join(aside, name, "earlier"), "w") as f:
            f.write(name)
    set_aside_damaged(os.path.join(copy, "checkpoints"))
    assert sorted(os.listdir(aside)) == ["20", "20_2", "20_3"]
    for name in ("20", "20_2"):
        assert os.listdir(os.path.join(aside, name)) == ["earlier"]
    assert os.path.isfile(os.path.join(aside, "20_3", "run", "metadata"))
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["10"]


def free_space(monkeypatch, free: int) -> None:
    """The room check sees ``free`` bytes free on every file system."""
    monkeypatch.setattr(checkpoint, "disk_usage",
                        lambda path: types.SimpleNamespace(total=10**12, used=10**12 - free,
                                                           free=free))


def test_room_for_a_checkpoint_is_its_array_bytes_and_the_metadata(tmp_path, monkeypatch):
    state = {"params": jnp.zeros((250,), jnp.float32), "step": jnp.zeros((), jnp.int32)}
    need = 250 * 4 + 4 + checkpoint.CHECKPOINT_OVERHEAD_BYTES
    free_space(monkeypatch, need)
    checkpoint.check_room(str(tmp_path), state, newest=None)
    free_space(monkeypatch, need - 1)
    with pytest.raises(OSError, match=r"1\.0 MiB free .* needs up to 1\.0 MiB.*no checkpoint"):
        checkpoint.check_room(str(tmp_path), state, newest=None)


def test_a_save_without_room_is_refused_leaving_the_checkpoints_as_they_are(
        finished, tmp_path, monkeypatch):
    config, workdir = finished
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "20"))  # the resume saves step 20 again
    free_space(monkeypatch, 0)
    with pytest.raises(OSError, match=r"checkpoints: 0\.0 MiB free .*resume from step 10$"):
        train_and_evaluate(config, copy)
    assert os.listdir(os.path.join(copy, "checkpoints")) == ["10"]


def test_a_save_that_fails_in_the_background_names_the_folder_and_the_resume_step(
        finished, tmp_path, monkeypatch):
    _, workdir = finished
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    saver = checkpoint.Checkpointer(copy / "checkpoints", keep=3)

    waits = []

    def failed_write():  # Orbax raises its writer thread's error once: the disk filled mid-save
        waits.append(1)
        if len(waits) == 1:
            raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device")

    monkeypatch.setattr(saver.manager, "wait_until_finished", failed_write)
    with pytest.raises(OSError, match=r"checkpoints: a checkpoint save failed \(RESOURCE_EXHAUSTED"
                                      r": .*No space left on device\); a rerun resumes from "
                                      r"step 20$"):
        saver.close()
