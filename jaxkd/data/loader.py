"""One entry point for a training loop: sharded global batches from the right pipeline.

    it = make_loader("cifar100", global_batch=64, mesh=mesh, seed=0)   # device-resident
    it = make_loader("imagenet2012", global_batch=512, mesh=mesh, worker_count=8)  # host
    batch = next(it)       # global jax.Arrays sharded over mesh axis 'data' (first axis)
    it.get_state(), it.set_state(state)

Both paths give the same batches for the same seed and the same state format, so a run can
even resume on the other path.
"""

from typing import Any

from jax.sharding import Mesh

from jaxkd.data import datasets
from jaxkd.data import device
from jaxkd.data import host


class ShardedHostIterator:
  """A `HostIterator` whose batches become global arrays sharded over `data_axis`.

  Every process feeds its own rows (`jax.make_array_from_process_local_data`); the other
  attributes and methods are the wrapped iterator's.
  """

  def __init__(self, it: host.HostIterator, mesh: Mesh, data_axis: str = "data"):
    n_dev = mesh.shape[data_axis]
    if it.global_batch % n_dev:
      raise ValueError(f"global_batch {it.global_batch} is not divisible by the {n_dev} "
                       f"devices of mesh axis {data_axis!r}.")
    self.host = it
    self._mesh = mesh
    self._axis = data_axis

  def __iter__(self):
    return self

  def __next__(self):
    return device.shard_batch(next(self.host), self._mesh, self._axis)

  def __len__(self) -> int:
    return len(self.host)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.host, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.host.close()


def make_loader(name: str, split: str | None = None, data_dir: str | None = None, *,
                global_batch: int, mesh: Mesh, train: bool = True, seed: int = 0,
                device_resident: bool | None = None, long_tail_factor: float | None = None,
                long_tail_seed: int = 0, worker_count: int = 0, start_step: int = 0,
                num_epochs: int | None = None, data_axis: str = "data",
                ds_spec: datasets.DatasetSpec | None = None):
  """Iterator of global batches sharded over `mesh`'s `data_axis`, from either path.

  Args:
    device_resident: None picks the device-resident path where `spec.fits_on_device`
      (CIFAR, Fashion-MNIST), else the host pipeline; True / False force one.
    Other arguments: as `host.host_iterator` (`worker_count` only matters on the host).

  Returns:
    A `device.DeviceResidentLoader` or a `ShardedHostIterator`: both yield
    {'image': float32 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]} (+ 'mask' in
    eval) as global jax.Arrays, and both have get_state / set_state, steps_per_epoch,
    num_examples and index_size.
  """
  ds_spec = ds_spec or datasets.spec(name)
  if device_resident is None:
    device_resident = ds_spec.fits_on_device
  if device_resident:
    return device.device_loader(
        name, split, data_dir, global_batch=global_batch, mesh=mesh, train=train,
        seed=seed, long_tail_factor=long_tail_factor, long_tail_seed=long_tail_seed,
        data_axis=data_axis, start_step=start_step, num_epochs=num_epochs, ds_spec=ds_spec)
  it = host.host_iterator(
      name, split, data_dir, global_batch=global_batch, train=train, seed=seed,
      long_tail_factor=long_tail_factor, long_tail_seed=long_tail_seed,
      worker_count=worker_count, start_step=start_step, num_epochs=num_epochs,
      ds_spec=ds_spec)
  return ShardedHostIterator(it, mesh, data_axis)
