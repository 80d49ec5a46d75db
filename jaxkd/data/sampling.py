"""Which examples make up each batch: the one rule both pipelines follow.

Train: epoch e visits the N examples in the order `epoch_permutation(seed, e, N)`; global
step t is batch t % S of epoch t // S, with S = N // global_batch (the last partial batch of
each epoch is dropped, so every step has the same shape). A global batch does not depend on
the number of processes or devices: process p of P reads rows [p*B/P, (p+1)*B/P) of it, and
devices split the rows further.

Eval: no shuffle; step t holds positions [t*B, (t+1)*B); the last batch is padded with
copies of position 0 and a `mask` marks the real rows, so every example is seen exactly once
and every batch has the same shape.

Positions are 0..N-1 in the examples used (the whole split or its long-tailed subset); the
pipelines map them to record keys in the tfds data source, which is what `index` reports.
"""

import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The visiting order of epoch `epoch`: int32 [n], a permutation of 0..n-1.

  numpy's `default_rng((seed, epoch))`, so each epoch's order is independent of the others'
  and can be computed on its own (resuming at any step needs no replay).
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}.")
  return np.random.default_rng((seed, epoch)).permutation(n).astype(np.int32)


def steps_per_epoch(n: int, global_batch: int) -> int:
  """Full batches per epoch: N // global_batch (drop remainder)."""
  if global_batch <= 0:
    raise ValueError(f"global_batch must be positive, got {global_batch}.")
  steps = n // global_batch
  if steps == 0:
    raise ValueError(f"global_batch {global_batch} is larger than the {n} examples.")
  return steps


def eval_steps(n: int, global_batch: int) -> int:
  """Batches that cover all N examples: ceil(N / global_batch)."""
  return -(-n // global_batch)


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of each global batch that process `process_index` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} is not divisible by the "
                     f"{process_count} processes.")
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_positions(seed: int, step: int, n: int, global_batch: int,
                    permutation: np.ndarray | None = None) -> np.ndarray:
  """Positions (int32 [global_batch]) of global train step `step`.

  `permutation`, if given, must be `epoch_permutation(seed, step // S, n)` (a cache).
  """
  spe = steps_per_epoch(n, global_batch)
  epoch, s = divmod(step, spe)
  perm = epoch_permutation(seed, epoch, n) if permutation is None else permutation
  return perm[s * global_batch:(s + 1) * global_batch]


def eval_positions(step: int, n: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions int32 [B], mask bool [B]) of eval step `step`; padding rows point at 0."""
  pos = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
  mask = pos < n
  return np.where(mask, pos, 0).astype(np.int32), mask


class StepIterator:
  """The resumable step/epoch state of a pipeline, shared by the host and device paths.

  A pipeline is a function of the global step (the rule above), so its whole state is the
  next step: `get_state()` is {'step': next global step, + the fingerprint}, JSON-able, and
  `set_state` continues from it after checking the fingerprint (what must match for the
  state to mean the same batches: dataset, split, seed(s), global batch, examples).
  Subclasses set `steps_per_epoch` and implement `_next_batch()`, the batch of `self.step`;
  they may override `_seek(step)`, called before the next step changes by `set_state` /
  `restart`.
  """

  steps_per_epoch: int

  def __init__(self, *, num_steps: int | None, start_step: int = 0,
               fingerprint: dict | None = None):
    self._num_steps = num_steps
    self._step = int(start_step)
    self._fingerprint = dict(fingerprint or {})

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._step

  @property
  def epoch(self) -> int:
    return self._step // self.steps_per_epoch

  def __len__(self) -> int:
    if self._num_steps is None:
      raise TypeError("An endless train pipeline has no length; pass num_epochs.")
    return self._num_steps

  def __iter__(self):
    return self

  def __next__(self):
    if self._num_steps is not None and self._step >= self._num_steps:
      raise StopIteration
    batch = self._next_batch()
    self._step += 1
    return batch

  def _next_batch(self):
    raise NotImplementedError

  def _seek(self, step: int) -> None:
    del step

  def restart(self, step: int = 0) -> None:
    """Continues at global step `step` (an eval pass: 0)."""
    self._seek(int(step))
    self._step = int(step)

  def get_state(self) -> dict:
    """JSON-serialisable: {'step': next global step, + what must match on restore}."""
    return {"step": self._step, **self._fingerprint}

  def set_state(self, state: dict) -> None:
    """Continues from `state` (from `get_state`, possibly of a run on the other path or with
    another number of processes or workers: the global batches are the same).

    Raises:
      ValueError: `state` belongs to another pipeline (a fingerprint field differs).
    """
    for k, v in self._fingerprint.items():
      if k in state and state[k] != v:
        raise ValueError(f"Data state has {k}={state[k]!r} but this pipeline has {k}={v!r}; "
                         "it belongs to another pipeline.")
    self.restart(int(state["step"]))
