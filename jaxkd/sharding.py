"""Devices, mesh and batch sharding: data parallel over every device of every process.

Parameters are replicated, batches are split on their first axis (after a seed axis, where
there is one) over the mesh axis "data". The global batch is a property of the recipe: each
process feeds `global_batch / process_count` examples and the global array is assembled from
the processes' parts, so the numbers do not depend on how many devices or hosts run them.
See docs/DESIGN.md#sharding.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run when one is configured; a no-op for a single process.

  Arguments win over the environment (`JAXKD_COORDINATOR`, `JAXKD_NUM_PROCESSES`,
  `JAXKD_PROCESS_ID`); on clusters JAX also detects SLURM / Open MPI / TPU pods by itself when
  `JAXKD_DISTRIBUTED=auto`. On CPU, processes exchange data over Gloo.
  """
  coordinator_address = coordinator_address or os.environ.get("JAXKD_COORDINATOR")
  if num_processes is None and "JAXKD_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAXKD_NUM_PROCESSES"])
  if process_id is None and "JAXKD_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAXKD_PROCESS_ID"])
  auto = os.environ.get("JAXKD_DISTRIBUTED") == "auto"
  if not coordinator_address and not auto:
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto and not coordinator_address:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  if jax.default_backend() == "cpu" and jax.local_device_count() > 1:
    # XLA:CPU's Gloo collectives can wait for ever with several CPU devices per process
    # (docs/NOTES.md#xlacpu-collective-hangs).
    logging.warning(
        "%d CPU devices in each of %d processes: XLA's Gloo collectives can hang with several "
        "CPU devices per process; give each process one "
        "(--xla_force_host_platform_device_count=1) and run more processes instead.",
        jax.local_device_count(), jax.process_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all processes).

  The devices keep the order given. (`jax.make_mesh` would sort GPUs by id and, by default,
  make an Explicit-sharding axis, which changes how operations on sharded arrays behave.)
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh, seed_axis: bool = False) -> NamedSharding:
  """The batch axis split over the data axis, the rest whole.

  Args:
    mesh: the data-parallel mesh.
    seed_axis: the arrays carry a leading seed axis [S, B, ...] (kept whole); else [B, ...].
  """
  return NamedSharding(mesh, P(None, DATA_AXIS) if seed_axis else P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices (and hence over processes)."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f"batch_size {global_batch} is not divisible by the {n} devices; choose a multiple of "
        f"{n} (the global batch is part of the recipe and is never changed silently).")


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host arrays replicated on every device of `mesh`.

  Works with several processes too: each passes the same full arrays.
  """
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def shard_batch(batch: Any, mesh: Mesh, seed_axis: bool = False) -> Any:
  """This process's rows of a batch (a pytree of numpy arrays) -> global `jax.Array`s.

  Each process passes its own rows ([b, ...], or [S, b, ...] with `seed_axis`, where
  b = global_batch / process_count); the result is [B, ...] (or [S, B, ...]) sharded by
  `data_sharded(mesh, seed_axis)`.
  """
  sharding = data_sharded(mesh, seed_axis)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def multi_device_cpu() -> bool:
  """Several CPU devices (virtual ones in tests): run one program at a time there, which
  also means no asynchronous checkpoint writes competing with a step's collectives."""
  return jax.default_backend() == "cpu" and jax.device_count() > 1


def fsdp_sharded(tree: Any, mesh: Mesh, min_size: int = 1024) -> Any:
  """Per leaf of `tree` (arrays or ShapeDtypeStructs), a sharding that splits it over the
  data axis along its largest dimension divisible by the device count (fully sharded data
  parallel: each device keeps 1/n of the parameters and optimizer state, and XLA gathers
  them for the matmuls). Leaves under `min_size` elements or with no such dimension stay
  replicated: scalars, norm scales, step counters.
  """
  n = mesh.devices.size

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    dims = [d for d in range(len(shape)) if shape[d] % n == 0]
    if n == 1 or not dims or int(np.prod(shape)) < min_size:
      return replicated(mesh)
    d = max(dims, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*([None] * d + [DATA_AXIS])))

  return jax.tree.map(one, tree)
