"""Device-resident path: the uint8 split lives on the devices, batches are made inside jit.

For CIFAR and Fashion-MNIST the whole train split is 47-154 MB of uint8: it goes to the
devices once, and each step gathers its examples and crops, flips and normalises them on
device, so the host does nothing per step. The batches are the host pipeline's, bit for bit
before normalisation: the same permutation rule (`sampling.epoch_permutation`, computed on
the host once per epoch) and the same per-example hashed augmentation (`augment`).

Placement: the dataset is **replicated** on every device, not sharded over the data axis.
A step's examples are a random subset of the whole split: with the split sharded, XLA has
every device gather all B rows (the others masked out) and all-reduces the uint8 batch each
step; restricting each device to its own shard would change which examples meet in a batch
(no longer the host pipeline's rule, and dependent on the device count). Replicated, each
device gathers only its own rows and the batch function has no collective at all, for one
copy of the split per device (CIFAR-100: 154 MB). Datasets too big for that
(`spec.fits_on_device` False) use the host pipeline. The measurements behind this choice:
docs/NOTES.md#device-resident-data.

Pure functions for a trainer's own jitted step:
    data = sharding.put_replicated(arrays, mesh)            # once
    perm = jnp.asarray(epoch_permutation(seed, epoch, n))   # once per epoch
    batch = device_batch(data, perm, step_in_epoch, epoch, ds_spec=..., global_batch=...,
                         seed=seed, batch_sharding=NamedSharding(mesh, P("data")))
                                                            # inside jit
and `DeviceResidentLoader`, an iterator of one seed's sharded batches (or of an eval pass).
Several seeds from one copy of the data: `multiseed.StackedDeviceLoader`.
"""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from jaxkd import sharding
from jaxkd.data import augment
from jaxkd.data import arrays as jarrays
from jaxkd.data import datasets
from jaxkd.data import sampling

FIELDS = ("image", "label", "index")


def check_device_resident(ds_spec: datasets.DatasetSpec) -> None:
  """Only pad-crop-flip datasets (CIFAR, Fashion-MNIST) have an on-device augmentation."""
  if ds_spec.train_augment != "pad_crop_flip":
    raise ValueError(f"{ds_spec.name} is not a device-resident dataset; use host_iterator.")


def take_batch(data: dict[str, jax.Array], perm: jax.Array, step_in_epoch,
               global_batch: int, batch_sharding: NamedSharding | None = None
               ) -> dict[str, jax.Array]:
  """Rows perm[s*B:(s+1)*B] of image/label/index (uint8 images, not augmented).

  Args:
    data: {'image': uint8 [N, H, W, C], 'label': int32 [N], 'index': int32 [N]}.
    perm: int32 [N], `epoch_permutation(seed, epoch, N)`.
    step_in_epoch: int scalar s in [0, N // B).
    global_batch: B (static).
    batch_sharding: the batch's sharding (e.g. NamedSharding(mesh, P('data'))). Inside a
      jit whose outputs do not fix it (a train step), pass it: the indices are then split
      over the devices before the gather, and each device gathers only its own rows.
  """
  idx = lax.dynamic_slice_in_dim(perm, step_in_epoch * global_batch, global_batch)
  if batch_sharding is not None:
    idx = lax.with_sharding_constraint(idx, batch_sharding)
  return {k: jnp.take(data[k], idx, axis=0, mode="clip") for k in FIELDS}


def augment_batch(images: jax.Array, ds_spec: datasets.DatasetSpec, *, train: bool,
                  seed=0, epoch=0, index=None) -> jax.Array:
  """`augment.augment_batch` on device: uint8 [B, H, W, C] -> float32 normalised."""
  return augment.augment_batch(images, ds_spec, train=train, seed=seed, epoch=epoch,
                               index=index, xp=jnp)


def device_batch(data: dict[str, jax.Array], perm: jax.Array, step_in_epoch, epoch, *,
                 ds_spec: datasets.DatasetSpec, global_batch: int, seed=0,
                 train: bool = True, batch_sharding: NamedSharding | None = None
                 ) -> dict[str, jax.Array]:
  """The train batch of (epoch, step_in_epoch): gathered, cropped, flipped, normalised.

  Pass `batch_sharding` when calling it inside a jitted train step (see `take_batch`).

  Returns:
    {'image': float32 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]}; the same
    batch as the host pipeline's global step epoch * (N // B) + step_in_epoch.
  """
  batch = take_batch(data, perm, step_in_epoch, global_batch, batch_sharding)
  batch["image"] = augment_batch(batch["image"], ds_spec, train=train, seed=seed,
                                 epoch=epoch, index=batch["index"])
  return batch


def eval_batch(data: dict[str, jax.Array], step, *, ds_spec: datasets.DatasetSpec,
               global_batch: int) -> dict[str, jax.Array]:
  """Eval step `step`: rows [step*B, (step+1)*B) in order, padded; adds 'mask' bool [B]."""
  n = data["label"].shape[0]
  pos = step * global_batch + jnp.arange(global_batch, dtype=jnp.int32)
  mask = pos < n
  pos = jnp.where(mask, pos, 0)
  batch = {k: jnp.take(data[k], pos, axis=0, mode="clip") for k in FIELDS}
  batch["image"] = augment_batch(batch["image"], ds_spec, train=False)
  batch["mask"] = mask
  return batch


class DeviceResidentLoader(sampling.StepIterator):
  """Iterator of one seed's sharded batches made on device from a device-resident split.

  Train: endless (or `num_epochs`), shuffled and augmented; eval: one ordered pass with a
  padded last batch and 'mask' (`restart()` for another). Every batch is a dict of global
  `jax.Array`s sharded over the mesh's `data_axis` on their first axis. `get_state()` /
  `set_state()` use the same format as `HostIterator`'s ({'step': next global step, ...}).
  """

  def __init__(self, arrays: dict[str, np.ndarray], ds_spec: datasets.DatasetSpec, *,
               global_batch: int, mesh: Mesh, train: bool = True, seed: int = 0,
               data_axis: str = sharding.DATA_AXIS, start_step: int = 0,
               num_epochs: int | None = None, index_size: int | None = None,
               fingerprint: dict[str, Any] | None = None):
    sharding.check_global_batch(global_batch, mesh)
    check_device_resident(ds_spec)
    self.spec = ds_spec
    self.global_batch = global_batch
    self.train = train
    self.seed = seed
    self.num_examples = len(arrays["label"])
    # Per-example tables are indexed by `index`: the split's size when known.
    self.index_size = index_size or (int(np.max(arrays["index"])) + 1 if self.num_examples
                                     else 0)
    self._mesh = mesh
    self._data = sharding.put_replicated({k: arrays[k] for k in FIELDS}, mesh)
    batch_sharding = NamedSharding(mesh, P(data_axis))
    if train:
      self.steps_per_epoch = sampling.steps_per_epoch(self.num_examples, global_batch)
      num_steps = None if num_epochs is None else num_epochs * self.steps_per_epoch
      self._fn = jax.jit(functools.partial(device_batch, ds_spec=ds_spec,
                                           global_batch=global_batch,
                                           batch_sharding=batch_sharding),
                         out_shardings=batch_sharding)
    else:
      self.steps_per_epoch = sampling.eval_steps(self.num_examples, global_batch)
      num_steps = self.steps_per_epoch
      self._fn = jax.jit(functools.partial(eval_batch, ds_spec=ds_spec,
                                           global_batch=global_batch),
                         out_shardings=batch_sharding)
    super().__init__(num_steps=num_steps, start_step=start_step, fingerprint={
        "dataset": ds_spec.name, "seed": seed, "global_batch": global_batch,
        "num_examples": self.num_examples, "train": train, **(fingerprint or {})})
    self._perm_epoch, self._perm = -1, None

  def permutation(self, epoch: int) -> jax.Array:
    """The epoch's permutation on the devices (replicated), cached for the current epoch."""
    if epoch != self._perm_epoch:
      self._perm = sharding.put_replicated(
          sampling.epoch_permutation(self.seed, epoch, self.num_examples), self._mesh)
      self._perm_epoch = epoch
    return self._perm

  def batch_at(self, step: int) -> dict[str, jax.Array]:
    """The batch of global step `step`."""
    if not self.train:
      return self._fn(self._data, jnp.int32(step))
    epoch, s = divmod(int(step), self.steps_per_epoch)
    return self._fn(self._data, self.permutation(epoch), jnp.int32(s), jnp.int32(epoch),
                    seed=jnp.int32(self.seed))

  def _next_batch(self) -> dict[str, jax.Array]:
    return self.batch_at(self._step)

  def close(self) -> None:
    """Nothing to stop (as `HostIterator.close`, for code that handles both)."""


def device_loader(name: str, split: str | None = None, data_dir: str | None = None, *,
                  global_batch: int, mesh: Mesh, train: bool = True, seed: int = 0,
                  long_tail_factor: float | None = None, long_tail_seed: int = 0,
                  data_axis: str = sharding.DATA_AXIS, start_step: int = 0,
                  num_epochs: int | None = None,
                  ds_spec: datasets.DatasetSpec | None = None,
                  arrays: dict[str, np.ndarray] | None = None) -> DeviceResidentLoader:
  """`load_arrays` + `DeviceResidentLoader`: the device-resident pipeline of one split.

  Arguments as `host.host_iterator`; `arrays` (from `load_arrays`) skips the reading.
  """
  ds_spec = ds_spec or datasets.spec(name)
  if split is None:
    split = ds_spec.train_split if train else ds_spec.eval_split
  index_size = None
  if arrays is None:
    source = datasets.open_source(ds_spec.name, split, data_dir)
    index_size = len(source)
    arrays = jarrays.load_arrays(ds_spec.name, split, long_tail_factor=long_tail_factor,
                                  seed=long_tail_seed, source=source)
  return DeviceResidentLoader(arrays, ds_spec, global_batch=global_batch, mesh=mesh,
                              train=train, seed=seed, data_axis=data_axis,
                              start_step=start_step, num_epochs=num_epochs,
                              index_size=index_size, fingerprint={"split": split})
