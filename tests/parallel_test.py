"""Scale-out in one process on 8 fake CPU devices: jit vs pmap, device counts, topology
changes, resume refusal, the non-finite guard and the transfer guard."""

import json
import os
import shutil
from unittest import mock

import jax
import numpy as np
import pytest

import cvmae_jax.train as train_module
from cvmae_jax import parallel, run_setup
from cvmae_jax.checkpoint import Checkpointer
from cvmae_jax.config import default_config
from cvmae_jax.train import train_and_evaluate
from cvmae_jax.workdir_lock import WorkdirLock

from train_test import read_metrics, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def losses(workdir):
    return {m["step"]: m for m in read_metrics(workdir) if "split" not in m}


def run(data_dir, workdir, **overrides):
    config = tiny_config(data_dir, num_steps=20, log_every=1, eval_every=20,
                         checkpoint_every=10)
    for name, value in overrides.items():
        section, field = name.split("__")
        config[section][field] = value
    return train_and_evaluate(config, str(workdir)), config


def test_jit_and_pmap_give_the_same_losses(data_dir, tmp_path):
    run(data_dir, tmp_path / "jit")
    summary, _ = run(data_dir, tmp_path / "pmap", parallel__mode="pmap")
    assert summary["train_step_traces"] == 1
    jit, pmap = losses(tmp_path / "jit"), losses(tmp_path / "pmap")
    assert sorted(jit) == sorted(pmap) == list(range(1, 21))
    for step in jit:
        assert jit[step]["mask_rate"] == pmap[step]["mask_rate"]  # identical masks
        np.testing.assert_allclose(pmap[step]["loss"], jit[step]["loss"], rtol=1e-5)
    jit_eval = [m for m in read_metrics(tmp_path / "jit") if "split" in m][-1]
    pmap_eval = [m for m in read_metrics(tmp_path / "pmap") if "split" in m][-1]
    np.testing.assert_allclose(pmap_eval["masked_mse"], jit_eval["masked_mse"], rtol=1e-5)


def test_one_and_eight_devices_give_the_same_masks_and_losses(data_dir, tmp_path):
    run(data_dir, tmp_path / "one", parallel__num_devices=1)
    run(data_dir, tmp_path / "eight", parallel__num_devices=8)
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    for step in one:
        assert one[step]["mask_rate"] == eight[step]["mask_rate"]
        np.testing.assert_allclose(eight[step]["loss"], one[step]["loss"], rtol=1e-5)


def _restored_params(workdir, config, num_devices):
    """Parameters of the newest checkpoint restored onto ``num_devices`` devices."""
    from cvmae_jax.checkpoint import abstract_like
    from cvmae_jax.model import ModelConfig
    from cvmae_jax.steps import init_state, make_optimizer

    with open(os.path.join(workdir, "data_stats.json")) as f:
        vocab = len(json.load(f)["codes"])
    launcher = parallel.JitLauncher(jax.devices()[:num_devices])
    _, state = init_state(ModelConfig.from_config(config.model, vocab),
                          make_optimizer(config.train), seed=123)  # other init on purpose
    state = launcher.put_state(state)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    restored = checkpointer.restore(checkpointer.latest_step(), abstract_like(state))
    checkpointer.close()
    assert {leaf.sharding.mesh.devices.size for leaf in jax.tree.leaves(restored)} == {
        num_devices}
    return jax.device_get(restored.params)


def test_a_checkpoint_from_eight_devices_restores_on_two_and_back(data_dir, tmp_path):
    _, config = run(data_dir, tmp_path / "eight")
    on_eight = _restored_params(tmp_path / "eight", config, 8)
    on_two = _restored_params(tmp_path / "eight", config, 2)
    for a, b in zip(jax.tree.leaves(on_eight), jax.tree.leaves(on_two)):
        np.testing.assert_array_equal(a, b)
    # ...and a run interrupted on 2 devices after step 10 continues on 8 with the same losses.
    run(data_dir, tmp_path / "two", parallel__num_devices=2)
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "20")
    os.remove(tmp_path / "two" / "metrics.jsonl")
    run(data_dir, tmp_path / "two", parallel__num_devices=8)
    resumed, reference = losses(tmp_path / "two"), losses(tmp_path / "eight")
    assert sorted(resumed) == list(range(11, 21))
    for step in resumed:
        np.testing.assert_allclose(resumed[step]["loss"], reference[step]["loss"], rtol=1e-5)


def test_the_host_runs_at_most_max_steps_ahead_of_the_devices(data_dir, tmp_path, monkeypatch):
    """Before dispatching past MAX_STEPS_AHEAD unfinished steps the loop waits for the oldest,
    so a SIGTERM's save does not wait for a logging window of queued steps."""
    dispatched, waited = [], []
    real_call = parallel.CompiledTrainStep.__call__

    class StepNumber:
        def __init__(self, array):
            self.array, self.dispatch = array, len(dispatched)

        def block_until_ready(self):
            waited.append((len(dispatched), self.dispatch, int(self.array.block_until_ready())))

    def call(self, leaves, batch):
        new_leaves, number = real_call(self, leaves, batch)
        dispatched.append(1)
        return new_leaves, StepNumber(number)

    monkeypatch.setattr(parallel.CompiledTrainStep, "__call__", call)
    run(data_dir, tmp_path / "run", train__log_every=20)
    ahead = train_module.MAX_STEPS_AHEAD
    assert waited == [(s, s - ahead, s - ahead) for s in range(ahead + 1, 21)]


def test_a_failed_start_releases_the_workdir_lock_and_removes_what_it_created(
        data_dir, tmp_path, monkeypatch):
    """E.g. every checkpoint damaged: the error comes before training, the lock is released
    (a second attempt in the same process is not refused) and a new workdir is removed."""
    def no_checkpointer(*args, **kwargs):
        raise ValueError("every checkpoint is damaged")

    monkeypatch.setattr(train_module, "Checkpointer", no_checkpointer)
    with pytest.raises(ValueError, match="every checkpoint is damaged"):
        run(data_dir, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    for _ in range(2):
        with pytest.raises(ValueError, match="every checkpoint is damaged"):
            run(data_dir, tmp_path / "old")


def test_a_failing_last_save_still_releases_the_workdir_lock(data_dir, tmp_path, monkeypatch):
    """The checkpointer's close raising (an asynchronous save that failed) still stops the
    input pipeline and releases the lock: rerunning in the same process is not refused."""
    real_close = Checkpointer.close

    def failing_close(self):
        real_close(self)
        raise RuntimeError("the last asynchronous save failed")

    monkeypatch.setattr(Checkpointer, "close", failing_close)
    with pytest.raises(RuntimeError, match="the last asynchronous save failed"):
        run(data_dir, tmp_path / "run")
    monkeypatch.setattr(Checkpointer, "close", real_close)
    summary, _ = run(data_dir, tmp_path / "run")
    assert summary["step"] == 20


def test_resume_with_changed_settings_is_refused_unless_allowed(data_dir, tmp_path):
    run(data_dir, tmp_path / "run")
    saved_config = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"model.d_model: 32 -> 64.*allow_config_change"):
        run(data_dir, tmp_path / "run", model__d_model=64, train__num_steps=30)
    assert (tmp_path / "run" / "config.json").read_text() == saved_config  # not overwritten
    with pytest.raises(ValueError, match=r"^the checkpoint at step 20 does not fit this "
                                         r"config's model: params/\S+ has shape \[(32|\d+, 32)"
                                         r"\] there and \[(64|\d+, 64)\] here \(\d+ arrays "
                                         r"differ\); config.train.allow_config_change resumes"):
        run(data_dir, tmp_path / "run", model__d_model=64, train__num_steps=30,
            train__allow_config_change=True)
    with pytest.raises(ValueError, match=r"does not fit this config's model: params/blocks/1/"
                                         r"\S+ is not in the checkpoint"):
        run(data_dir, tmp_path / "run", model__num_layers=2, train__num_steps=30,
            train__allow_config_change=True)
    assert (tmp_path / "run" / "config.json").read_text() == saved_config  # kept again
    with pytest.raises(ValueError, match=r"masking.strategy: 'cv' -> 'random'"):
        run(data_dir, tmp_path / "run", masking__strategy="random")
    # Bookkeeping fields and the device count may change.
    summary, _ = run(data_dir, tmp_path / "run", train__log_every=5, parallel__num_devices=2)
    assert summary["step"] == 20
    # An allowed change is resumed and said.
    with mock.patch.object(run_setup.logging, "warning") as warning:
        summary, _ = run(data_dir, tmp_path / "run", train__num_steps=25,
                         train__allow_config_change=True)
    assert summary["step"] == 25
    assert any("train.num_steps: 20 -> 25" in str(call.args[-1])
               for call in warning.call_args_list)
    # A second training in the same workdir (a resubmitted job) stops before writing anything.
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    held = WorkdirLock(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"run: another train.py \(or study\) is training in "
                                         r"this workdir now; wait for it to end"):
        run(data_dir, tmp_path / "run", train__num_steps=30, train__allow_config_change=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == files
    held.release()
    again = WorkdirLock(str(tmp_path / "run"))  # the runs above released theirs
    assert again.fd is not None
    again.release()


@pytest.mark.parametrize("poisoned_step, log_every, message, last_checkpoint", [
    (13, 1, "last checkpoint is step 10", 10),
    (10, 7, "no checkpoint was saved", None),  # checked before step 10's save, not after
])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint(
        data_dir, tmp_path, monkeypatch, poisoned_step, log_every, message, last_checkpoint):
    real = train_module.train_dataset

    class PoisonedIterator:  # NaN values in one batch; checkpointable like grain's
        def __init__(self, iterator):
            self.iterator, self.count = iterator, 0

        def __next__(self):
            batch, self.count = next(self.iterator), self.count + 1
            return dict(batch, values=np.full_like(batch["values"], np.nan)) \
                if self.count == poisoned_step else batch

        def get_state(self):  # bytes, as grain's checkpoint handler expects of non-grain types
            return self.iterator.get_state()

        def set_state(self, state):
            self.iterator.set_state(state)

        def close(self):
            self.iterator.close()

    class PoisonedDataset:
        def __init__(self, dataset):
            self.dataset = dataset

        def __iter__(self):
            return PoisonedIterator(iter(self.dataset))

    def poisoned(*args, **kwargs):
        return PoisonedDataset(real(*args, **kwargs))

    monkeypatch.setattr(train_module, "train_dataset", poisoned)
    with pytest.raises(FloatingPointError, match=rf"step {poisoned_step}: the loss .*{message}"):
        run(data_dir, tmp_path / "run", train__log_every=log_every)
    assert Checkpointer.latest_complete_step(tmp_path / "run" / "checkpoints") == last_checkpoint


def test_the_loop_makes_no_implicit_host_device_transfers(data_dir, tmp_path):
    summary, _ = run(data_dir, tmp_path / "run", train__transfer_guard="disallow")
    assert summary["step"] == 20
    summary, _ = run(data_dir, tmp_path / "pmap", train__transfer_guard="disallow",
                     parallel__mode="pmap")
    assert summary["step"] == 20


def test_cpu_devices_cannot_change_once_jax_has_started():
    """The tests' process already runs 8 CPU devices: asking for 8 is a no-op, for 3 an error
    naming the field (train.py calls this before anything starts JAX)."""
    from cvmae_jax.parallel import set_cpu_devices

    set_cpu_devices(0)
    set_cpu_devices(8)
    with pytest.raises(ValueError, match=r"config.parallel.cpu_devices=3 must be set before"):
        set_cpu_devices(3)
    assert jax.device_count("cpu") == 8


@pytest.mark.parametrize("launcher_class", [parallel.JitLauncher, parallel.PmapLauncher])
def test_the_compiled_step_runs_on_the_state_leaves_and_donates_them(launcher_class):
    """The loop holds the state as the compiled step's leaves; they rebuild into the same
    structure with the step applied, the leaves passed in are donated, and the packed batch
    reaches the body whole."""
    launcher = launcher_class(jax.devices())
    state = launcher.put_state({"count": np.int32(0), "weights": np.arange(3, dtype=np.float32)})
    local_batch = {"valid": np.ones((8, 2), bool), "values": np.full((8, 2), 0.5, np.float32)}

    def body(state, batch):
        return ({"count": state["count"] + 1, "weights": state["weights"] * 2},
                state["weights"].sum() + jax.lax.psum(batch["values"].sum(), "data")
                if launcher.axis_name else state["weights"].sum() + batch["values"].sum())

    compiled = launcher.compile_train_step(body, state, local_batch)
    leaves = compiled.flatten(state)
    new_leaves, metric = compiled(leaves, compiled.put(local_batch))
    assert all(leaf.is_deleted() for leaf in leaves)
    new_state = launcher.checkpoint_view(compiled.unflatten(new_leaves))
    assert sorted(new_state) == ["count", "weights"] and int(new_state["count"]) == 1
    np.testing.assert_array_equal(new_state["weights"], [0.0, 2.0, 4.0])
    assert float(np.ravel(launcher.fetch(metric))[0]) == 3.0 + 8.0  # weights + all 16 values


@pytest.mark.parametrize("fields, expected", [
    (dict(distributed=True), dict(coordinator_address=None, num_processes=None,
                                  process_id=None, local_device_ids=None)),
    (dict(distributed=True, local_device_ids=(0, 1, 2, 3)),  # one SLURM task per node, 4 GPUs
     dict(coordinator_address=None, num_processes=None, process_id=None,
          local_device_ids=[0, 1, 2, 3])),
    (dict(coordinator_address="host:1234", num_processes=2, process_id=1),  # implies distributed
     dict(coordinator_address="host:1234", num_processes=2, process_id=1,
          local_device_ids=None)),
])
def test_initialize_distributed_passes_the_config_fields(fields, expected):
    config = default_config().parallel
    config.update(fields)
    with mock.patch.object(jax.distributed, "is_initialized", return_value=False), \
            mock.patch.object(jax.distributed, "initialize") as initialize:
        parallel.initialize_distributed(config)
    initialize.assert_called_once_with(**expected)


def test_initialize_distributed_is_not_called_for_one_process():
    with mock.patch.object(jax.distributed, "initialize") as initialize:
        parallel.initialize_distributed(default_config().parallel)
    initialize.assert_not_called()


def test_a_lock_file_that_cannot_be_opened_warns_and_locks_nothing(tmp_path):
    """E.g. a read-only workdir (here: a folder where the lock file goes, which root cannot
    open either): the evaluation goes on unlocked, and the warning names eval.py."""
    from cvmae_jax import workdir_lock
    from cvmae_jax.workdir_lock import evaluation

    (tmp_path / ".eval.lock").mkdir()
    with mock.patch.object(workdir_lock.logging, "warning") as warning:
        lock = WorkdirLock(str(tmp_path), evaluation("eval"))
    assert lock.fd is None
    [call] = warning.call_args_list
    assert call.args[1] == str(tmp_path) and call.args[-1] == "eval.py"
    lock.release()
