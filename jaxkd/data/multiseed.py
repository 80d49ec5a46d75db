"""Train batches of several seeds at once, [S, B, ...], for S independent runs in one step.

Seed i of a stacked batch is exactly the batch of the single-seed pipeline with seed
`seeds[i]`: the same permutation rule (`sampling.epoch_permutation(seeds[i], ...)`) and the
same hashed augmentation, so run i of a multi-seed run sees the batches of a single-seed run
with that seed. S = 1 is the single-seed run, with its seed axis.

Both loaders yield {'image': float32 [S, B, H, W, C], 'label': int32 [S, B],
'index': int32 [S, B]} as global `jax.Array`s sharded PartitionSpec(None, 'data') (the seed
axis whole, the batch split over the devices), and share one state format
({'step', 'dataset', 'split', 'seeds', 'global_batch', 'num_examples'}), so a run can resume
on the other path. See docs/DESIGN.md#data.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from jaxkd import sharding
from jaxkd.data import datasets
from jaxkd.data import device
from jaxkd.data import host
from jaxkd.data import sampling


def _fingerprint(ds_spec: datasets.DatasetSpec, seeds: Sequence[int], global_batch: int,
                 num_examples: int) -> dict[str, Any]:
  return {"dataset": ds_spec.name, "split": ds_spec.train_split, "seeds": list(seeds),
          "global_batch": global_batch, "num_examples": num_examples}


def _stacked_device_batch(data, perms, step_in_epoch, epoch, seeds, *, ds_spec, global_batch,
                          batch_sharding):
  """`device.device_batch` of every seed: perms int32 [S, N], seeds int32 [S] -> [S, B, ...]."""
  one = lambda perm, seed: device.device_batch(
      data, perm, step_in_epoch, epoch, ds_spec=ds_spec, global_batch=global_batch,
      seed=seed, batch_sharding=batch_sharding)
  return jax.vmap(one)(perms, seeds)


class StackedDeviceLoader(sampling.StepIterator):
  """S seeds' train batches from ONE device-resident copy of the split.

  The split is replicated on the devices once (as `device.DeviceResidentLoader`); each step
  is one jitted `device.device_batch` vmapped over the seeds, with the epoch's S
  permutations (int32 [S, N], replicated) made on the host once per epoch.

  Attributes:
    seeds: the S data seeds.
    steps_per_epoch: N // global_batch.
    num_examples: N, examples used (after any long-tail subsampling).
    index_size: examples in the whole split; every `index` is below it.
  """

  def __init__(self, arrays: dict[str, np.ndarray], ds_spec: datasets.DatasetSpec, *,
               mesh: Mesh, global_batch: int, seeds: Sequence[int],
               index_size: int | None = None):
    sharding.check_global_batch(global_batch, mesh)
    device.check_device_resident(ds_spec)
    self.seeds = tuple(int(s) for s in seeds)
    self.num_examples = len(arrays["label"])
    self.steps_per_epoch = sampling.steps_per_epoch(self.num_examples, global_batch)
    self.index_size = index_size or int(np.max(arrays["index"])) + 1
    super().__init__(num_steps=None, fingerprint=_fingerprint(
        ds_spec, self.seeds, global_batch, self.num_examples))
    self._mesh = mesh
    self._data = sharding.put_replicated({k: arrays[k] for k in device.FIELDS}, mesh)
    self._seed_array = sharding.put_replicated(np.asarray(self.seeds, np.int32), mesh)
    # The constraint on one seed's rows ([B] over 'data') becomes [S, B] over (None, 'data')
    # under vmap: each device gathers only its own rows of every seed.
    batch_fn = functools.partial(_stacked_device_batch, ds_spec=ds_spec,
                                 global_batch=global_batch,
                                 batch_sharding=sharding.data_sharded(mesh))
    self._fn = jax.jit(batch_fn, out_shardings=sharding.data_sharded(mesh, seed_axis=True))
    self._perm_epoch, self._perms = -1, None

  def permutations(self, epoch: int) -> jax.Array:
    """int32 [S, N], every seed's permutation of `epoch`, replicated; cached per epoch."""
    if epoch != self._perm_epoch:
      perms = np.stack([sampling.epoch_permutation(s, epoch, self.num_examples)
                        for s in self.seeds])
      self._perms = sharding.put_replicated(perms, self._mesh)
      self._perm_epoch = epoch
    return self._perms

  def batch_at(self, step: int) -> dict[str, jax.Array]:
    """The stacked batch of global step `step`."""
    epoch, s = divmod(int(step), self.steps_per_epoch)
    return self._fn(self._data, self.permutations(epoch), jnp.int32(s), jnp.int32(epoch),
                    self._seed_array)

  def _next_batch(self) -> dict[str, jax.Array]:
    return self.batch_at(self._step)

  def close(self) -> None:
    """Nothing to stop (the host loader's `close` stops grain workers)."""


class StackedHostLoader(sampling.StepIterator):
  """S seeds' host pipelines (`host.HostIterator`, one per seed), stacked on this process.

  Each process stacks its own rows of every seed's batch to [S, b, ...] (b = B / processes)
  and the global [S, B, ...] arrays are assembled from the processes' parts.
  """

  def __init__(self, iterators: Sequence[host.HostIterator], seeds: Sequence[int],
               mesh: Mesh, ds_spec: datasets.DatasetSpec):
    if len(iterators) != len(seeds) or not iterators:
      raise ValueError(f"one host iterator per seed: got {len(iterators)} for seeds "
                       f"{list(seeds)}.")
    first = iterators[0]
    self.iterators = tuple(iterators)
    self.seeds = tuple(int(s) for s in seeds)
    self.steps_per_epoch = first.steps_per_epoch
    self.num_examples = first.num_examples
    self.index_size = first.index_size
    super().__init__(num_steps=None, start_step=first.step, fingerprint=_fingerprint(
        ds_spec, self.seeds, first.global_batch, self.num_examples))
    self._mesh = mesh

  def _next_batch(self) -> dict[str, jax.Array]:
    parts = [next(it) for it in self.iterators]
    # One seed: a view with the seed axis, not a copy of the (ImageNet-sized) batch.
    stacked = {k: (parts[0][k][None] if len(parts) == 1 else np.stack([p[k] for p in parts]))
               for k in parts[0]}
    return sharding.shard_batch(stacked, self._mesh, seed_axis=True)

  def _seek(self, step: int) -> None:
    for it in self.iterators:
      it.restart(step)

  def close(self) -> None:
    """Stops every seed's grain workers."""
    for it in self.iterators:
      it.close()
