"""Data parallelism over every device of every host: one mesh, global arrays, multi-host start.

One ``jax.sharding.Mesh`` over ``jax.devices()`` (all devices of all processes) with a single
axis ``data``. Batches are global ``jax.Array``s split along their leading axis over ``data``
(``P('data')``); the train state (params, optimizer state, BN statistics, EMA, step, RNG,
counters) is replicated (``P()``). One ``jax.jit`` step runs on the whole mesh (no pmap): it
has global semantics, so BatchNorm statistics, the loss normalisation and the gradients are
over the global batch and N devices compute what one device computes on the same batch.

The global batch is ``device.batchsize_per_gpu * len(device.gpu_ids)`` as the config writes
it (the reference's per-GPU batch times its GPU count), whatever the number of JAX devices
that run it; every process loads its ``1 / process_count`` slice
(:class:`nanodet_jax.data.loader.Loader`) and :func:`global_batch` assembles the global arrays
with ``jax.make_array_from_process_local_data``.

Multi-host runs start the JAX distributed system first (:func:`maybe_initialize_distributed`,
before any other JAX call): when ``device.distributed`` in the config, the ``NANODET_*`` /
``JAX_COORDINATOR_ADDRESS`` environment, or a multi-process SLURM / Open MPI / TPU-pod launch
asks for it. A single-process run never calls ``jax.distributed.initialize``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanodet_jax.assigner import BATCH_AXIS
from nanodet_jax.config import ConfigError

DATA = BATCH_AXIS  # the mesh axis the batch is split over ("data")
ENV = {"coordinator_address": ("NANODET_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
       "num_processes": ("NANODET_NUM_PROCESSES",),
       "process_id": ("NANODET_PROCESS_ID",)}  # config field -> environment variables


# -- mesh and shardings --------------------------------------------------------------------


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh, axis ``data``, over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their leading (batch) axis over ``data``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole by every device (the train state)."""
    return NamedSharding(mesh, P())


def _global(sharding: NamedSharding, tree: Any) -> Any:
    if jax.process_count() == 1:  # no host round trip
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (the same values on every process) as arrays replicated over ``mesh``."""
    return _global(replicated(mesh), tree)


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows ``(b, ...)`` of every array in ``local`` -> global arrays
    ``(b * process_count, ...)`` split over ``data`` (``jax.make_array_from_process_local_data``;
    one process: the rows are the whole batch). ``b`` must be divisible by this process's
    device count."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def allgather(tree: Any) -> Any:
    """Host numpy copies of ``tree`` on every process: a global ``jax.Array`` whole, a
    process-local array concatenated over processes along axis 0 (process order)
    (``multihost_utils.process_allgather``; one process: ``jax.device_get``)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def local_device_count(mesh: Mesh) -> int:
    """Devices of ``mesh`` this process drives (its rows of a batch divide over these)."""
    return len(mesh.local_devices)


# -- batch size ----------------------------------------------------------------------------


def global_batch_size(cfg: Any) -> int:
    """``device.batchsize_per_gpu * len(device.gpu_ids)``: the reference's global batch,
    independent of the JAX devices that run it (``gpu_ids: -1``, the reference's CPU mode,
    counts as one)."""
    per = int(cfg.device.batchsize_per_gpu)
    ids = cfg.device.gpu_ids
    if isinstance(ids, int) and not isinstance(ids, bool) and ids == -1:
        count = 1
    elif isinstance(ids, (list, tuple)) and ids:
        count = len(ids)
    else:
        raise ConfigError(f"device.gpu_ids = {ids!r}: expected a non-empty list of GPU ids "
                          "(its length times device.batchsize_per_gpu is the global batch) "
                          "or -1")
    if per < 1:
        raise ConfigError(f"device.batchsize_per_gpu must be >= 1, got {per}")
    return per * count


def check_batch_divides(cfg: Any, devices: int | None = None,
                        processes: int | None = None) -> int:
    """The global batch (:func:`global_batch_size`), or a ConfigError when it cannot be split
    evenly over the ``devices`` JAX devices (default ``jax.device_count()``) and the
    ``processes`` processes (default ``jax.process_count()``)."""
    batch = global_batch_size(cfg)
    n = jax.device_count() if devices is None else devices
    p = jax.process_count() if processes is None else processes
    per, gpus = int(cfg.device.batchsize_per_gpu), cfg.device.gpu_ids
    for count, what in ((n, "JAX devices"), (p, "processes")):
        if batch % count:
            raise ConfigError(
                f"the global batch device.batchsize_per_gpu x len(device.gpu_ids) = {per} x "
                f"{len(gpus) if isinstance(gpus, (list, tuple)) else 1} = {batch} is not "
                f"divisible by the {count} {what} in use (every device runs an equal share): "
                f"choose device.batchsize_per_gpu / device.gpu_ids so that it is, or use a "
                f"device count that divides it (e.g. CUDA_VISIBLE_DEVICES)")
    return batch


# -- multi-host start ----------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher_processes(environ: Mapping[str, str]) -> int:
    """How many processes a SLURM / Open MPI / TPU-pod launcher started (1: none seen).
    These are the environments ``jax.distributed.initialize()`` detects by itself."""
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ:
        n = _env_int(environ, "SLURM_STEP_NUM_TASKS") or _env_int(environ, "SLURM_NTASKS")
        if n and n > 1:
            return n
    if "OMPI_MCA_orte_hnp_uri" in environ:
        n = _env_int(environ, "OMPI_COMM_WORLD_SIZE")
        if n and n > 1:
            return n
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in environ.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return len(hosts)
    return 1


def distributed_init_args(cfg: Any, environ: Mapping[str, str] | None = None
                          ) -> dict[str, Any] | None:
    """The keyword arguments for ``jax.distributed.initialize``, or ``None`` when this is a
    single-process run that must not call it.

    ``device.distributed.enabled``: ``False`` never; ``True`` always (unset arguments are
    auto-detected by JAX: TPU pods, SLURM, Open MPI); ``"auto"`` (default) when a coordinator
    address, process count or process id is given (the config's ``device.distributed``
    fields, else ``NANODET_COORDINATOR_ADDRESS`` / ``NANODET_NUM_PROCESSES`` /
    ``NANODET_PROCESS_ID`` or JAX's own ``JAX_COORDINATOR_ADDRESS``), or a SLURM / Open MPI /
    TPU-pod launch of more than one process is detected. The config wins over the
    environment.
    """
    environ = os.environ if environ is None else environ
    node = cfg.device.get("distributed") or {}
    enabled = node.get("enabled", "auto")
    if enabled is False:
        return None
    args: dict[str, Any] = {}
    for key, names in ENV.items():
        value = node.get(key)
        for name in names:
            if value is None:
                value = environ.get(name) or None
                if value is not None and key != "coordinator_address":
                    value = _env_int(environ, name)
        if value is not None:
            args[key] = str(value) if key == "coordinator_address" else int(value)
    if enabled is True or args or _launcher_processes(environ) > 1:
        return args
    return None


def maybe_initialize_distributed(cfg: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize(**distributed_init_args(cfg))`` when the run is
    multi-process (see :func:`distributed_init_args`); returns whether it was called. Must
    come before any other JAX call (device queries, arrays, compilation) of the program."""
    args = distributed_init_args(cfg, environ)
    if args is None or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**args)
    return True
