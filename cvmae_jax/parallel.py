"""Data parallelism: the device mesh, shardings, the jit and pmap launchers, multi-host setup.

Both launchers run the same step bodies from ``cvmae_jax.steps``:

- ``JitLauncher`` (default): one ``jax.jit`` over a ``Mesh`` with a ``data`` axis spanning every
  device of every process; parameters and optimizer state replicated, the batch sharded with
  ``NamedSharding``; each process contributes its rows via
  ``jax.make_array_from_process_local_data``.
- ``PmapLauncher``: ``jax.pmap`` over this process's devices; state stacked on a leading device
  axis, counts and gradients summed with ``lax.psum`` inside the body.

Checkpoints always hold the plain (unstacked, replicated) state, so a run can resume under the
other launcher or on another device count.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cvmae_jax import host_memory, transfer
from cvmae_jax.config_checks import PARALLEL_MODES as MODES

DATA_AXIS = "data"


def set_cpu_devices(count: int | None) -> None:
    """Splits a CPU host into ``count`` JAX devices (``jax_num_cpu_devices``), so a jitted step
    shards its batch over them and each device runs its own stream of ops on the shared cores.
    None or 0 keeps JAX's default (1). Must run before JAX starts its backends. Several devices
    also cap the host heap that ``host_memory.reuse_freed_memory`` keeps (see there)."""
    if count and count > 1:
        host_memory.cap_heap_for_concurrent_devices()
    if not count or jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:  # JAX has started
        if jax.device_count("cpu") == count:
            return  # already split this way (e.g. by --xla_force_host_platform_device_count)
        raise ValueError(f"config.parallel.cpu_devices={count} must be set before JAX starts; "
                         f"this process already runs with {jax.device_count('cpu')} CPU "
                         f"device(s) (run it in a fresh process)") from error


def wants_distributed(parallel_config) -> bool:
    """Whether ``initialize_distributed`` starts several processes: ``distributed`` or any of
    coordinator_address/num_processes/process_id set (known before JAX starts)."""
    manual = (parallel_config.coordinator_address, parallel_config.num_processes,
              parallel_config.process_id)
    return bool(parallel_config.distributed) or any(field is not None for field in manual)


def python_handles_sigterm() -> bool:
    """False once jax.distributed is initialized (one process too): JAX's preemption sync then
    catches SIGTERM, and a Python handler must not replace it (preemption.py)."""
    return not jax.distributed.is_initialized()


def initialize_distributed(parallel_config) -> None:
    """``jax.distributed.initialize`` when ``config.parallel.distributed`` is set or any of
    coordinator_address/num_processes/process_id is (a manual launch, e.g. several processes
    on one machine; without it each would train alone on the same workdir).

    Unset fields are auto-detected (TPU VM pods, SLURM, ...). ``local_device_ids`` None lets
    JAX choose: every local device, except under SLURM or Open MPI, where each process gets the
    one GPU of its local rank (so launch one task per GPU, or list the GPUs of a task).
    """
    if jax.distributed.is_initialized() or not wants_distributed(parallel_config):
        return
    local_ids = parallel_config.local_device_ids
    try:
        jax.distributed.initialize(coordinator_address=parallel_config.coordinator_address,
                                   num_processes=parallel_config.num_processes,
                                   process_id=parallel_config.process_id,
                                   local_device_ids=list(local_ids) if local_ids else None)
    except ValueError as error:  # e.g. nothing to auto-detect on a plain host
        raise ValueError(f"config.parallel.distributed: jax.distributed.initialize failed "
                         f"({error}); outside a cluster JAX detects (TPU VM pod, SLURM, Open "
                         "MPI) set config.parallel.coordinator_address, num_processes and "
                         "process_id (docs/launching.md)") from error


def on_process_0(work: Callable, failure: str):
    """``work()`` on process 0 while the others wait; its result there (None on the others).
    When it raises, every process raises: process 0 its error, the others
    ``ValueError(failure)`` (they would otherwise wait in their next collective until JAX's
    shutdown timeout). ``work`` must run no collective (nor Orbax's CheckpointManager, whose
    barriers the waiting processes would never join)."""
    if jax.process_count() == 1:
        return work()
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = work()
        except Exception as raised:  # noqa: BLE001 - re-raised below, after the collective
            error = raised
    if multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
        if error is not None:
            raise error
        raise ValueError(failure)
    return result


def on_every_process(work: Callable, failure: str):
    """``work()`` on every process; its result there. When it raises on any process, every
    process raises: those where it raised their error, the others
    ``ValueError(failure.format(processes=[...]))`` naming the processes that failed (they
    would otherwise wait in their next collective until JAX's shutdown timeout). ``work``
    must run no collective."""
    if jax.process_count() == 1:
        return work()
    result, error = None, None
    try:
        result = work()
    except Exception as raised:  # noqa: BLE001 - re-raised below, after the collective
        error = raised
    failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    if len(failed):
        raise ValueError(failure.format(processes=failed.tolist()))
    return result


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with the ``data`` axis."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, num_devices: int, field: str) -> None:
    """Refuse a global batch that does not split evenly over the devices and processes."""
    processes = jax.process_count()
    if batch_size % num_devices or batch_size % processes:
        raise ValueError(f"{field}={batch_size} must be divisible by the number of devices "
                         f"({num_devices}) and processes ({processes})")


def global_batch(local_batch, mesh: Mesh):
    """This process's rows (a dict of [b, ...] arrays, or one) -> global arrays sharded over
    ``data`` (explicit host->device copy; JAX copies each array separately, which is why the
    train step takes its batch packed into one, ``cvmae_jax/transfer.py``)."""
    with jax.transfer_guard_host_to_device("allow"):  # explicit, also with several processes
        return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


class CompiledTrainStep:
    """An ahead-of-time compiled ``body(state, batch) -> (state, metrics)`` that takes the
    state as its flat list of arrays and the batch as one packed array (``put``).

    The host's fixed costs per step, measured (benchmarks/NOTES.md): calling a
    compiled function flattens its arguments and rebuilds its outputs, which for the train
    state's ~100 nnx Variables took ~1.3 of the ~2.3 ms the call cost (CPU); and each array put
    on a device costs a fixed amount, ~0.28 ms per batch field on an H200 host, where the
    whole ``large`` bf16 step takes 2.28 ms. So the loop flattens the state once, rebuilds it
    only to save or evaluate, and copies each batch in one transfer (``cvmae_jax.transfer``).
    """

    def __init__(self, transform: Callable, put: Callable, body: Callable, state,
                 local_batch: dict[str, np.ndarray]):
        """``transform``: ``jax.jit``/``jax.pmap`` with the launcher's settings (the leaves,
        argument 0, donated); ``put``: the launcher's host->device copy of this process's rows;
        ``state``, ``local_batch``: examples to compile for (later batches must have the same
        fields, dtypes and shapes)."""
        self.treedef = jax.tree.structure(state)
        self.layout = transfer.layout_of(local_batch)
        self._put = put

        def flat_body(leaves, packed_batch):
            new_state, metrics = body(self.unflatten(leaves),
                                      transfer.unpack(packed_batch, self.layout))
            return self.flatten(new_state), metrics

        self.compiled = transform(flat_body).lower(self.flatten(state),
                                                   self.put(local_batch)).compile()

    def put(self, local_batch: dict[str, np.ndarray]) -> jax.Array:
        """This process's rows of a batch -> the step's batch argument (one transfer)."""
        return self._put(transfer.pack(local_batch, self.layout))

    def flatten(self, state) -> list:
        return self.treedef.flatten_up_to(state)

    def unflatten(self, leaves: list):
        return self.treedef.unflatten(leaves)

    def __call__(self, leaves: list, batch: jax.Array) -> tuple[list, object]:
        """One step: (state leaves, ``put(local_batch)``) -> (new state leaves, metrics); the
        old leaves are donated."""
        return self.compiled(leaves, batch)

    def cost_analysis(self):
        return self.compiled.cost_analysis()


class JitLauncher:
    """``jax.jit`` over a ``data`` mesh; the state is a replicated global array tree."""

    axis_name = None

    def __init__(self, devices):
        self.mesh = make_mesh(devices)
        self.replicated = replicated_sharding(self.mesh)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def put_state(self, state):
        return jax.device_put(state, self.replicated)

    def checkpoint_view(self, state):
        """The state as checkpoints hold it (replicated, unstacked)."""
        return state

    def put_batch(self, local_batch):
        """This process's rows (a dict of them, or one array) -> global arrays."""
        return global_batch(local_batch, self.mesh)

    def compile_train_step(self, body: Callable, state,
                           local_batch: dict[str, np.ndarray]) -> CompiledTrainStep:
        """``body(state, batch)`` compiled ahead of time, the state donated."""
        return CompiledTrainStep(
            lambda flat_body: jax.jit(flat_body, donate_argnums=0,
                                      in_shardings=(self.replicated, batch_sharding(self.mesh)),
                                      out_shardings=(self.replicated, self.replicated)),
            self.put_batch, body, state, local_batch)

    def eval_step(self, body: Callable) -> Callable:
        return jax.jit(body, out_shardings=self.replicated)

    def fetch(self, tree):
        """Device values -> numpy on the host (waits for them)."""
        return jax.device_get(tree)


class PmapLauncher:
    """``jax.pmap`` over this process's devices; the state is stacked on a device axis."""

    axis_name = DATA_AXIS

    def __init__(self, devices):
        if jax.process_count() > 1:
            raise ValueError("config.parallel.mode='pmap' runs on one process; use the default "
                             "'jit' mode for multi-host launches")
        self.mesh = make_mesh(devices)
        self.stacked = batch_sharding(self.mesh)
        self.replicated = replicated_sharding(self.mesh)
        n = self.num_devices
        self._stack = jax.jit(lambda tree: jax.tree.map(
            lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree), out_shardings=self.stacked)
        self._unstack = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree),
                                out_shardings=self.replicated)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def put_state(self, state):
        """Plain state -> one copy per device, stacked on a leading axis [n, ...]."""
        return self._stack(jax.device_put(state, self.replicated))

    def checkpoint_view(self, state):
        return self._unstack(state)

    def put_batch(self, local_batch):
        """[b, ...] rows (a dict of them, or one array) -> [n, b / n, ...] with block i on
        device i."""
        n = self.num_devices
        return jax.device_put(jax.tree.map(lambda value: value.reshape((n, -1) + value.shape[1:]),
                                           local_batch), self.stacked)

    def compile_train_step(self, body: Callable, state,
                           local_batch: dict[str, np.ndarray]) -> CompiledTrainStep:
        return CompiledTrainStep(
            lambda flat_body: jax.pmap(flat_body, axis_name=self.axis_name, donate_argnums=0,
                                       devices=list(self.mesh.devices.flat)),
            self.put_batch, body, state, local_batch)

    def eval_step(self, body: Callable) -> Callable:
        return jax.pmap(body, axis_name=self.axis_name, devices=list(self.mesh.devices.flat))

    def fetch(self, tree):
        """Device values (identical on every device after psum) -> numpy from device 0."""
        return jax.tree.map(lambda x: x[0], jax.device_get(tree))


def make_launcher(parallel_config):
    """The launcher of ``config.parallel.mode`` over ``config.parallel.num_devices`` devices
    (0: all devices of all processes for jit, all local devices for pmap)."""
    mode, count = parallel_config.mode, parallel_config.num_devices
    if mode not in MODES:
        raise ValueError(f"config.parallel.mode={mode!r}: expected one of {MODES}")
    devices = jax.devices() if mode == "jit" else jax.local_devices()
    if count:
        if jax.process_count() > 1 or count > len(devices):
            raise ValueError(f"config.parallel.num_devices={count}: {len(devices)} devices "
                             f"available (and only 0 = all is allowed with several processes)")
        devices = devices[:count]
    return (JitLauncher if mode == "jit" else PmapLauncher)(devices)
