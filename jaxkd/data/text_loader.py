"""Batches of packed text: {"tokens", "targets": int32 [B, L], "mask": bool [B, L]}.

    rows = text_builder.load_rows(path, "train")                      # int32 [R, L + 1]
    train = TextLoader(rows, global_batch=32, seed=0)                 # host, NumPy batches
    train = DeviceTextLoader(rows, global_batch=32, mesh=mesh, seed=0) # the rows on device
    batch = next(train); state = train.get_state(); train.set_state(state)
    evals = TextLoader(val_rows, global_batch=32, train=False)        # one ordered pass

Both follow the image pipelines' rule (`sampling`): train epoch e visits the R rows in the
order `epoch_permutation(seed, e, R)`, global step t is batch t mod K of epoch t div K with
K = R div B (the partial last batch dropped); eval reads rows in order, the last batch padded
with row 0 and masked out. A batch is `text.batch_fields` of its rows, with `mask` also
False on the padded rows of an eval batch. So the whole state is the next step
(`sampling.StepIterator`: `get_state()` is JSON, `set_state` continues bit-exactly and
refuses another pipeline's state), and the two loaders give the same batches.

Device-resident (`DeviceTextLoader`): the int32 rows are copied to every device once
(replicated, as `device.py` does for images and for the same reason: a batch draws rows from
the whole split); each step gathers its rows by index inside a jitted function, and the
batch comes out sharded over the mesh's data axis. The fortunes train split at L = 128 is
2.9 MB. `fits_on_device` says whether a split is small enough.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from jaxkd import sharding
from jaxkd.data import sampling
from jaxkd.data import text

FIELDS = ("tokens", "targets", "mask")
DEVICE_BYTES_LIMIT = 1 << 30  # 1 GiB per device copy


def fits_on_device(rows: np.ndarray, limit: int = DEVICE_BYTES_LIMIT) -> bool:
  """Whether a copy of `rows` per device stays under `limit` bytes."""
  return rows.nbytes <= limit


def _check_rows(rows) -> np.ndarray:
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[1] < 2 or not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f"rows must be packed integer token rows [R, L + 1] with L ≥ 1, got "
                     f"{rows.dtype} {rows.shape}.")
  return rows.astype(np.int32, copy=False)


def _fields(rows, real, pad_id, xp):
  """`text.batch_fields` of `rows`, the mask also off on rows that are not `real`."""
  batch = text.batch_fields(rows, pad_id, xp)
  batch["mask"] = batch["mask"] & real[:, None]
  return batch


class _TextSteps(sampling.StepIterator):
  """The step rule and state shared by both loaders; subclasses gather the rows."""

  def __init__(self, rows, *, global_batch: int, train: bool, seed: int, start_step: int,
               num_epochs: int | None, pad_id: int, fingerprint: dict | None):
    rows = _check_rows(rows)
    if not isinstance(global_batch, int) or global_batch < 1:
      raise ValueError(f"global_batch must be a positive int, got {global_batch!r}.")
    self.num_examples, self.seq_len = len(rows), rows.shape[1] - 1
    self.global_batch, self.train, self.seed, self.pad_id = global_batch, train, seed, pad_id
    if train:
      self.steps_per_epoch = sampling.steps_per_epoch(self.num_examples, global_batch)
      num_steps = None if num_epochs is None else num_epochs * self.steps_per_epoch
    else:
      self.steps_per_epoch = num_steps = sampling.eval_steps(self.num_examples, global_batch)
    super().__init__(num_steps=num_steps, start_step=start_step, fingerprint={
        "dataset": "text", "seed": seed, "global_batch": global_batch,
        "num_examples": self.num_examples, "seq_len": self.seq_len, "train": train,
        **(fingerprint or {})})
    self._perm_epoch, self._perm = -1, None

  def positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(row positions int32 [B], real bool [B]) of global step `step`."""
    if not self.train:
      return sampling.eval_positions(step, self.num_examples, self.global_batch)
    epoch, s = divmod(int(step), self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = sampling.epoch_permutation(self.seed, epoch, self.num_examples)
      self._perm_epoch = epoch
    pos = self._perm[s * self.global_batch:(s + 1) * self.global_batch]
    return pos, np.ones(self.global_batch, bool)

  def _next_batch(self):
    return self.batch_at(self._step)

  def close(self) -> None:
    """Nothing to stop (as the image loaders' `close`)."""


class TextLoader(_TextSteps):
  """Host batches: NumPy dicts, or global `jax.Array`s sharded over `mesh` when given.

  Args:
    rows: int32 [R, L + 1] packed rows (`text_builder.load_rows`).
    global_batch: B rows per step.
    train: shuffled, endless (or `num_epochs`) batches; else one ordered, padded pass
      (`restart()` for another).
    seed: the data order's seed.
    mesh: shard each batch over its data axis (each process makes the whole global batch,
      which is small, and hands `sharding.shard_batch` its own rows); None keeps NumPy.
    start_step, num_epochs: where to start, and an end for train batches.
    pad_id: the padding id of the rows.
    fingerprint: extra fields a saved state must match (e.g. the dataset path).
  """

  def __init__(self, rows, *, global_batch: int, train: bool = True, seed: int = 0,
               mesh: Mesh | None = None, start_step: int = 0, num_epochs: int | None = None,
               pad_id: int = text.PAD_ID, fingerprint: dict | None = None):
    super().__init__(rows, global_batch=global_batch, train=train, seed=seed,
                     start_step=start_step, num_epochs=num_epochs, pad_id=pad_id,
                     fingerprint=fingerprint)
    self._rows = _check_rows(rows)
    self._mesh = mesh
    if mesh is not None:
      sharding.check_global_batch(global_batch, mesh)

  def batch_at(self, step: int) -> dict:
    """The batch of global step `step`."""
    pos, real = self.positions(step)
    batch = _fields(self._rows[pos], real, self.pad_id, np)
    if self._mesh is None:
      return batch
    rows = sampling.process_rows(self.global_batch, jax.process_index(), jax.process_count())
    return sharding.shard_batch({k: v[rows] for k, v in batch.items()}, self._mesh)


def device_text_batch(rows: jax.Array, perm: jax.Array, step_in_epoch, *, global_batch: int,
                      pad_id: int, batch_sharding: NamedSharding | None = None) -> dict:
  """Inside jit: train batch `step_in_epoch` of an epoch whose order is `perm` (int32 [R],
  on device), from `rows` ([R, L + 1], on device)."""
  pos = lax.dynamic_slice_in_dim(perm, step_in_epoch * global_batch, global_batch)
  if batch_sharding is not None:  # each device gathers only its own rows (device.take_batch)
    pos = lax.with_sharding_constraint(pos, batch_sharding)
  real = jnp.ones(global_batch, bool)
  return _fields(jnp.take(rows, pos, axis=0, mode="clip"), real, pad_id, jnp)


def device_eval_text_batch(rows: jax.Array, step, *, global_batch: int, pad_id: int) -> dict:
  """Inside jit: eval batch `step`, rows [step·B, (step+1)·B) in order, padded and masked."""
  pos = step * global_batch + jnp.arange(global_batch, dtype=jnp.int32)
  real = pos < rows.shape[0]
  pos = jnp.where(real, pos, 0)
  return _fields(jnp.take(rows, pos, axis=0, mode="clip"), real, pad_id, jnp)


class DeviceTextLoader(_TextSteps):
  """Device-resident batches: the rows replicated on `mesh`, gathered inside jit.

  Arguments as `TextLoader`, with `mesh` required; the batches equal `TextLoader`'s (as
  global `jax.Array`s sharded PartitionSpec(data_axis)). Nothing goes to the devices per
  step but the step number; the epoch's permutation goes once per epoch.
  """

  def __init__(self, rows, *, global_batch: int, mesh: Mesh, train: bool = True,
               seed: int = 0, start_step: int = 0, num_epochs: int | None = None,
               pad_id: int = text.PAD_ID, data_axis: str = sharding.DATA_AXIS,
               fingerprint: dict | None = None):
    super().__init__(rows, global_batch=global_batch, train=train, seed=seed,
                     start_step=start_step, num_epochs=num_epochs, pad_id=pad_id,
                     fingerprint=fingerprint)
    sharding.check_global_batch(global_batch, mesh)
    rows = _check_rows(rows)
    if not fits_on_device(rows):
      raise ValueError(f"{rows.nbytes / 2**20:.0f} MiB of rows is over the "
                       f"{DEVICE_BYTES_LIMIT >> 20} MiB per device of the device-resident "
                       f"path; use TextLoader.")
    self._mesh = mesh
    self._rows = sharding.put_replicated(rows, mesh)
    batch_sharding = NamedSharding(mesh, P(data_axis))
    if train:
      fn = functools.partial(device_text_batch, global_batch=global_batch, pad_id=pad_id,
                             batch_sharding=batch_sharding)
    else:
      fn = functools.partial(device_eval_text_batch, global_batch=global_batch, pad_id=pad_id)
    self._fn = jax.jit(fn, out_shardings=batch_sharding)
    self._device_perm_epoch, self._device_perm = -1, None

  def batch_at(self, step: int) -> dict:
    """The batch of global step `step`."""
    if not self.train:
      return self._fn(self._rows, jnp.int32(step))
    epoch, s = divmod(int(step), self.steps_per_epoch)
    if epoch != self._device_perm_epoch:
      self._device_perm = sharding.put_replicated(
          sampling.epoch_permutation(self.seed, epoch, self.num_examples), self._mesh)
      self._device_perm_epoch = epoch
    return self._fn(self._rows, self._device_perm, jnp.int32(s))
