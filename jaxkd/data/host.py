"""Host input pipeline: grain over `tfds.data_source`, for any dataset (ImageNet-sized too).

    it = host_iterator("cifar100", global_batch=64, seed=0, worker_count=2)
    batch = next(it)             # this process's rows of global step 0, numpy
    state = it.get_state()       # {"step": 1, ...}: JSON; save it with the checkpoint
    it.set_state(state)          # a restored run continues with the identical next batch

A training loop does not use this directly: `loader.make_train_loader` stacks one of these
per seed and makes global arrays of their batches.

One element of the grain dataset is one whole batch: `grain.MapDataset.range(start, stop)`
of global step numbers, mapped by `BatchFn` (read the step's examples from the data source,
decode, augment, stack). Batches are built in grain worker processes (`worker_count`, 0 =
in this process) and come back in step order, so the result depends on neither the worker
count nor the number of JAX processes: which examples and which augmentation each step gets
is fixed by `sampling` (the permutation rule) and `augment` (per-example hashed randomness).
That is also why the iterator's state is just the next global step.
"""

import sys
from typing import Any

import numpy as np

from jaxkd.data import augment
from jaxkd.data import datasets
from jaxkd.data import sampling


class BatchFn:
  """Global step -> this process's rows of that batch, as numpy arrays.

  Picklable (grain sends it to its worker processes). Train batches:
  {'image': float32 [b, H, W, C] normalised, 'label': int32 [b], 'index': int32 [b]};
  eval batches add 'mask': bool [b] (False on padding rows), with b = global_batch /
  process_count. With `normalize=False` images stay uint8 (augmented, not normalised).
  """

  def __init__(self, source: datasets.Source, ds_spec: datasets.DatasetSpec,
               keys: np.ndarray, *, global_batch: int, train: bool, seed: int,
               process_index: int, process_count: int, normalize: bool = True):
    self.source = source
    self.spec = ds_spec
    self.keys = np.asarray(keys, np.int32)  # position -> record key in the data source
    self.global_batch = global_batch
    self.train = train
    self.seed = seed
    self.normalize = normalize
    self.rows = sampling.process_rows(global_batch, process_index, process_count)
    self._perm_cache = (-1, None)  # (epoch, permutation), replaced as one object
    if train:
      self.steps_per_epoch = sampling.steps_per_epoch(len(self.keys), global_batch)
    else:
      self.steps_per_epoch = sampling.eval_steps(len(self.keys), global_batch)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perm_cache"] = (-1, None)  # recomputed where needed
    return state

  def _permutation(self, epoch: int) -> np.ndarray:
    # Read and replaced as one tuple: grain may call this from several threads.
    cached_epoch, perm = self._perm_cache
    if cached_epoch != epoch:
      perm = sampling.epoch_permutation(self.seed, epoch, len(self.keys))
      self._perm_cache = (epoch, perm)
    return perm

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    epoch = step // self.steps_per_epoch
    if self.train:
      pos = sampling.train_positions(self.seed, step, len(self.keys), self.global_batch,
                                     self._permutation(epoch))
      mask = None
    else:
      pos, mask = sampling.eval_positions(step, len(self.keys), self.global_batch)
      mask = mask[self.rows]
    keys = self.keys[pos[self.rows]]
    examples = self.source.read(keys)
    where = f"{self.source.name}/{self.source.split}"
    labels = np.asarray([int(ex["label"]) for ex in examples], np.int32)
    datasets.check_labels(labels, self.spec.num_classes, where, index=keys)
    if self.spec.train_augment == "random_resized_crop":
      images = self._resized_crops(examples, keys, epoch)
    else:
      images = np.empty((len(keys), *self.spec.image_shape), np.uint8)
      for i, (k, ex) in enumerate(zip(keys, examples)):
        img = datasets.as_image(ex["image"], f"{where} example {k}")
        datasets.check_image_shape(img, self.spec.image_shape, f"{where} example {k}")
        images[i] = img
      images = augment.augment_batch(images, self.spec, train=self.train, seed=self.seed,
                                     epoch=epoch, index=keys, xp=np,
                                     normalize_images=self.normalize)
    batch = {"image": images, "label": labels, "index": keys}
    if mask is not None:
      batch["mask"] = mask
    return batch

  def _resized_crops(self, examples, keys, epoch) -> np.ndarray:
    size = self.spec.image_shape[0]
    out = np.empty((len(keys), size, size, 3), np.uint8)
    for i, (k, ex) in enumerate(zip(keys, examples)):
      try:
        if self.train:
          rng = augment.example_rng(self.seed, epoch, k)
          out[i] = augment.random_resized_crop(ex["image"], rng, size, flip=self.spec.flip)
        else:
          out[i] = augment.resize_center_crop(ex["image"], size, self.spec.eval_resize)
      except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on a bad image
        raise datasets.BadDataError(f"Field 'image' of {self.source.name}/"
                                    f"{self.source.split} example {k} cannot be decoded: "
                                    f"{e}") from e
    if not self.normalize:
      return out
    return augment.normalize(out, self.spec.mean, self.spec.std, xp=np)


class HostIterator(sampling.StepIterator):
  """Iterator of this process's batches, resumable from `get_state()` (`sampling.StepIterator`).

  Attributes:
    steps_per_epoch: global steps per epoch (train: N // global_batch; eval: the number of
      batches that cover the split).
    num_examples: N, examples used (after any long-tail subsampling).
    index_size: examples in the whole split; every `index` is below it.
    global_batch: rows per global batch.
    local_batch: rows per batch in this process.
  """

  def __init__(self, batch_fn: BatchFn, *, num_steps: int | None, start_step: int = 0,
               worker_count: int = 0, read_threads: int = 1, prefetch: int = 2,
               fingerprint: dict[str, Any] | None = None):
    super().__init__(num_steps=num_steps, start_step=start_step, fingerprint=fingerprint)
    self._fn = batch_fn
    self._workers = worker_count
    self._threads = read_threads
    self._prefetch = prefetch
    self._it = None
    self.steps_per_epoch = batch_fn.steps_per_epoch
    self.num_examples = len(batch_fn.keys)
    self.index_size = len(batch_fn.source)
    self.global_batch = batch_fn.global_batch
    self.local_batch = batch_fn.rows.stop - batch_fn.rows.start

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of global step `step`, built here, synchronously (tests, debugging)."""
    return self._fn(step)

  def _build(self):
    import grain  # pylint: disable=g-import-not-at-top
    stop = sys.maxsize if self._num_steps is None else self._num_steps
    ds = grain.MapDataset.range(self._step, stop).map(self._fn)
    # Elements are whole batches: a few in flight per process is enough.
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self._threads, prefetch_buffer_size=max(self._prefetch, self._threads)))
    if self._workers > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        # grain 0.2.x reads one of its absl flags in mp_prefetch once JAX is imported, which
        # fails in programs that do not start with absl.app (google/grain#1355); their
        # flags keep their defaults either way.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers, per_worker_buffer_size=self._prefetch))
    return iter(ds)

  def _next_batch(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._build()
    return next(self._it)

  def _seek(self, step: int) -> None:
    self.close()  # grain's iterator runs from the old step: rebuilt at the next batch

  def close(self) -> None:
    """Stops grain's worker processes (also done on garbage collection)."""
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def host_iterator(name: str, split: str | None = None, data_dir: str | None = None, *,
                  global_batch: int, train: bool = True, seed: int = 0,
                  long_tail_factor: float | None = None, long_tail_seed: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  worker_count: int = 0, read_threads: int = 1, prefetch: int = 2,
                  start_step: int = 0, num_epochs: int | None = None,
                  normalize: bool = True, ds_spec: datasets.DatasetSpec | None = None,
                  source: datasets.Source | None = None) -> HostIterator:
  """The host pipeline of one split.

  Args:
    name: dataset name (`datasets.SPECS`).
    split: tfds split; default: the spec's train split if `train`, else its eval split.
    data_dir: tfds data dir (default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    global_batch: examples per global step, whatever the number of processes and devices.
    train: shuffle per epoch, augment, drop the last partial batch, run for `num_epochs`
      (None: forever); else in order, no augmentation, one pass with a padded last batch
      and a `mask`.
    seed: the data seed (epoch permutations and augmentation).
    long_tail_factor, long_tail_seed: long-tailed subset of the train split
      (`long_tail.long_tail_indices`); ignored for other splits.
    process_index, process_count: this process's share (default: JAX's).
    worker_count: grain worker processes that build batches (0: this process).
    read_threads: threads building batches in each process.
    prefetch: batches buffered per worker (or per process without workers).
    start_step: global step of the first batch (or use `set_state`).
    num_epochs: train for this many epochs (None: endless).
    normalize: False returns uint8 images (augmented, not normalised), a quarter of the
      bytes to move to the accelerator; normalise there with `jaxkd.data.normalize`.
    ds_spec: a spec overriding `spec(name)` (e.g. `spec("fashion_mnist", pad=2)`).
    source: read from this `datasets.Source` instead of opening the split (tests).

  Returns:
    A `HostIterator` of numpy batches; see `BatchFn` for their content.
  """
  ds_spec = ds_spec or datasets.spec(name)
  if split is None:
    split = ds_spec.train_split if train else ds_spec.eval_split
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  given = source
  if source is None:
    source = datasets.open_source(ds_spec.name, split, data_dir,
                                  raw_images=ds_spec.train_augment == "random_resized_crop")
  labels = np.zeros(len(source), np.int32)  # only the long-tailed subset needs them
  if long_tail_factor is not None and split == ds_spec.train_split:
    # With raw images, reading every label skips decoding every image.
    labels = datasets.read_labels(
        given if given is not None else
        datasets.open_source(ds_spec.name, split, data_dir, raw_images=True),
        ds_spec.num_classes)
  keys = datasets.select_examples(labels, split, ds_spec, long_tail_factor=long_tail_factor,
                                  seed=long_tail_seed)
  fn = BatchFn(source, ds_spec, keys, global_batch=global_batch, train=train, seed=seed,
               process_index=process_index, process_count=process_count,
               normalize=normalize)
  if train:
    num_steps = None if num_epochs is None else num_epochs * fn.steps_per_epoch
  else:
    num_steps = fn.steps_per_epoch
  fingerprint = {"dataset": ds_spec.name, "split": split, "seed": seed,
                 "global_batch": global_batch, "num_examples": len(keys), "train": train}
  return HostIterator(fn, num_steps=num_steps, start_step=start_step,
                      worker_count=worker_count, read_threads=read_threads,
                      prefetch=prefetch, fingerprint=fingerprint)
