"""Devices, mesh and batch sharding: data parallel over every device of every process.

Parameters are replicated, batches are split on their first axis over the mesh axis "data".
The global batch is a property of the recipe: each process feeds `global_batch /
process_count` examples and the global array is assembled from the processes' parts, so the
numbers do not depend on how many devices or hosts run them.
"""

from __future__ import annotations

import logging
import os

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
    # Seen with jax 0.10.2: one device's part of a Gloo all-gather waits on XLA:CPU's executor
    # semaphore while the others wait in the all-gather, for ever (now and then).
    logging.warning(
        "%d CPU devices in each of %d processes: XLA's Gloo collectives can hang with several "
        "CPU devices per process; give each process one "
        "(--xla_force_host_platform_device_count=1) and run more processes instead.",
        jax.local_device_count(), jax.process_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over all devices (of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """First axis split over the data axis, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices (and hence over processes)."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f"batch_size {global_batch} is not divisible by the {n} devices; choose a multiple of "
        f"{n} (the global batch is part of the recipe and is never changed silently).")


def local_batch_size(global_batch: int) -> int:
  """This process's share of the global batch."""
  return global_batch // jax.process_count()


def shard_host_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles global arrays, sharded on the data axis, from each process's local numpy part."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def put_replicated(tree, mesh: Mesh):
  """Places a pytree replicated on every device (works across processes)."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def avoid_cpu_collective_deadlocks() -> None:
  """Dispatches synchronously when the devices are several CPU devices.

  XLA's CPU devices share one thread pool. With several (virtual) CPU devices, two programs
  that run collectives at the same time (a train step still running while the next batch or
  an evaluation is dispatched) can starve each other's rendezvous, which XLA aborts after
  40 s. Synchronous dispatch runs one program at a time; accelerators are unaffected.

  Caveat (measured 2026-11-30, jax 0.10.2): JAX reads this setting only when it creates its
  CPU client, which `jaxkd.main` and the tests have done before this runs, so it has no
  effect there. Making it effective did not remove XLA:CPU's rare evaluation aborts with 2
  CPU devices (2/12 runs asynchronous, 5/12 synchronous), so it is left as it is until that
  XLA issue is understood.
  """
  if multi_device_cpu():
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def multi_device_cpu() -> bool:
  """Several CPU devices (virtual ones in tests): run one program at a time there, which
  also means no asynchronous checkpoint writes competing with a step's collectives."""
  return jax.default_backend() == "cpu" and jax.device_count() > 1
