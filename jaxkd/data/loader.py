"""The trainer's only door to data: global sharded batches, host or device-resident.

    train = make_train_loader(ds_spec, data_dir, mesh=mesh, global_batch=128, seeds=[0],
                              device_resident=True)
    batch = next(train)      # {'image': [S, B, H, W, C], 'label': [S, B], 'index': [S, B]}
    state = train.get_state(); train.set_state(state)        # JSON; resumes bit-exactly
    evals = make_eval_loader(ds_spec, data_dir, mesh=mesh, global_batch=500,
                             device_resident=True)            # once per run
    for batch in evals: ...  # {'image': [B, ...], 'label', 'index', 'mask': bool [B]}

Train batches always carry the seed axis (S = len(seeds), 1 included) and are sharded
PartitionSpec(None, 'data'); eval batches have none and are sharded PartitionSpec('data').
The device-resident path (small splits: CIFAR, Fashion-MNIST) and the host path (grain; any
dataset) give the same batches and the same state. See docs/DESIGN.md#data.
"""

from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh

from jaxkd import sharding
from jaxkd.data import arrays as jarrays
from jaxkd.data import datasets
from jaxkd.data import device
from jaxkd.data import host
from jaxkd.data import multiseed

TrainLoader = multiseed.StackedDeviceLoader | multiseed.StackedHostLoader


def make_train_loader(ds_spec: datasets.DatasetSpec | str, data_dir: str | None, *,
                      mesh: Mesh, global_batch: int, seeds: Sequence[int],
                      device_resident: bool, long_tail_factor: float | None = None,
                      long_tail_seed: int = 0, worker_count: int = 0) -> TrainLoader:
  """Endless train batches of S = len(seeds) independent data orders, stacked.

  Args:
    ds_spec: the dataset (a `datasets.DatasetSpec`, e.g. with overrides, or its name).
    data_dir: the tfds data dir holding it prepared (`builders.ensure_prepared`).
    mesh: the 1-D data-parallel mesh (`sharding.make_mesh`).
    global_batch: B, examples per step of each seed, whatever the device count.
    seeds: the S data seeds; seed i's batches are the single-seed pipeline's with `seeds[i]`.
    device_resident: keep the uint8 split on the devices and make batches there (only for
      `ds_spec.train_augment == 'pad_crop_flip'`); else the host pipeline.
    long_tail_factor, long_tail_seed: train on a long-tailed subset
      (`long_tail.long_tail_indices`).
    worker_count: grain worker processes of each seed's host pipeline (0: this process).

  Returns:
    An iterator of {'image': float32 [S, B, H, W, C], 'label': int32 [S, B],
    'index': int32 [S, B]} (global jax.Arrays, PartitionSpec(None, 'data')) with
    `steps_per_epoch`, `num_examples` (N used), `index_size` (the whole split's size, which
    bounds `index`: size per-example tables by it), `get_state()` (JSON-able),
    `set_state(state)` (ValueError if the state is another pipeline's: other seeds,
    dataset, split, batch or examples) and `close()`.

  Raises:
    ValueError: `global_batch` does not split over the mesh's devices, or no seeds.
  """
  ds_spec = datasets.spec(ds_spec)
  sharding.check_global_batch(global_batch, mesh)
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("make_train_loader needs at least one seed.")
  split = ds_spec.train_split
  if device_resident:
    device.check_device_resident(ds_spec)
    source = datasets.open_source(ds_spec.name, split, data_dir)
    arrays = jarrays.load_arrays(ds_spec.name, split, data_dir,
                                  long_tail_factor=long_tail_factor, seed=long_tail_seed)
    return multiseed.StackedDeviceLoader(arrays, ds_spec, mesh=mesh, global_batch=global_batch,
                                         seeds=seeds, index_size=len(source))
  iterators = [host.host_iterator(ds_spec.name, split, data_dir, global_batch=global_batch,
                                  train=True, seed=seed, ds_spec=ds_spec,
                                  long_tail_factor=long_tail_factor,
                                  long_tail_seed=long_tail_seed, worker_count=worker_count)
               for seed in seeds]
  return multiseed.StackedHostLoader(iterators, seeds, mesh, ds_spec)


class EvalLoader:
  """The eval split, one ordered pass per iteration, built once per run.

  Iterating (`for batch in evals:`) yields {'image': float32 [B, H, W, C], 'label': int32 [B],
  'index': int32 [B], 'mask': bool [B]} as global jax.Arrays sharded PartitionSpec('data');
  the last batch is padded and `mask` marks the real rows. Each iteration starts at the
  first batch again, from the same pipeline: device-resident, the split stays placed and
  the batch function compiled; on the host, grain's workers run only during a pass.

  Attributes:
    steps: batches per pass, ceil(N / B).
    num_examples: N.
  """

  def __init__(self, pipeline: device.DeviceResidentLoader | host.HostIterator, mesh: Mesh):
    self.pipeline = pipeline
    self.steps = len(pipeline)
    self.num_examples = pipeline.num_examples
    self._mesh = mesh
    self._on_host = isinstance(pipeline, host.HostIterator)

  def __len__(self) -> int:
    return self.steps

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    self.pipeline.restart(0)
    try:
      for batch in self.pipeline:
        yield sharding.shard_batch(batch, self._mesh) if self._on_host else batch
    finally:
      self.pipeline.close()

  def close(self) -> None:
    self.pipeline.close()


def make_eval_loader(ds_spec: datasets.DatasetSpec | str, data_dir: str | None, *,
                     mesh: Mesh, global_batch: int, device_resident: bool,
                     worker_count: int = 0, split: str | None = None,
                     long_tail_factor: float | None = None,
                     long_tail_seed: int = 0) -> EvalLoader:
  """The eval split (`ds_spec.eval_split`, never long-tailed) as an `EvalLoader`.

  Args: as `make_train_loader`; `global_batch` is the eval batch. `split` (default the eval
  split) passes over another split in order without augmentation, e.g. the train split for
  the teacher's class mass (`jaxkd.train.diagnose`); `long_tail_factor` and `long_tail_seed`
  then select the train split's long-tailed subset, as training does.

  Raises:
    ValueError: `global_batch` does not split over the mesh's devices.
  """
  ds_spec = datasets.spec(ds_spec)
  sharding.check_global_batch(global_batch, mesh)
  split = split or ds_spec.eval_split
  if device_resident:
    device.check_device_resident(ds_spec)
    arrays = jarrays.load_arrays(ds_spec.name, split, data_dir,
                                  long_tail_factor=long_tail_factor, seed=long_tail_seed)
    pipeline = device.DeviceResidentLoader(
        arrays, ds_spec, global_batch=global_batch, mesh=mesh, train=False)
    return EvalLoader(pipeline, mesh)
  pipeline = host.host_iterator(ds_spec.name, split, data_dir, global_batch=global_batch,
                                train=False, ds_spec=ds_spec, worker_count=worker_count,
                                long_tail_factor=long_tail_factor,
                                long_tail_seed=long_tail_seed)
  return EvalLoader(pipeline, mesh)
