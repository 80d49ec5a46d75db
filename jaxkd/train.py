"""Training: the train state, the jitted sharded train and eval steps, and the loop.

Three modes (METHODS Part I, DESIGN "Training"):
  teacher       supervised training of any model (CE; its result is a teacher for `distill`);
  distill       two-stage KD: a frozen teacher, restored from an orbax checkpoint, runs in
                inference mode inside the same jitted step, under stop_gradient;
  self_distill  one-stage PS-KD: the model's own previous-epoch predictions, kept per example
                in the train state, are the soft targets; optionally with IPW weights.

One pure `train_step(state, batch, teacher_variables)` is jitted over a data-parallel mesh of
all devices (parameters replicated, batch sharded on its first axis, state donated). The
global batch is the recipe's; the results do not depend on the number of devices or processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxkd import checkpoint
from jaxkd import data as jdata
from jaxkd import models
from jaxkd import objectives
from jaxkd import sharding

MODES = ("teacher", "distill", "self_distill")


class TrainingDiverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is untouched."""


# ---------------------------------------------------------------------------------------------
# State and optimiser.


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; all of it is checkpointed.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: {"model": ..., "aux_head": ... (IPWD only)}, float32.
    batch_stats: the model's BatchNorm running statistics.
    opt_state: optax state.
    rng: uint32 [2], the run's key (per-step keys are folded from it with the step).
    nonfinite_step: int32, the first step whose loss was not finite (−1 while none was). Such
      a step leaves the state unchanged, so a checkpoint is never poisoned.
    predictions: self_distill only: float32 [index_size, C], the last softmax prediction for
      every training example (zeros before it was first seen); None otherwise.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  predictions: Any = None


def learning_rate_schedule(base_lr: float, milestones, decay: float, steps_per_epoch: int,
                           warmup_epochs: float = 0.0, *, kind: str = "step",
                           total_steps: int | None = None):
  """The learning rate per optimizer step.

  "step" (mdistiller/RepDistiller): lr = base · decay^k, k = #milestones < epoch. Epochs count
  from 1 and a milestone epoch still uses the previous rate: with (150, 180, 210) the rate
  drops at the start of epochs 151, 181 and 211.
  "cosine": base · ½(1 + cos(π · step / total_steps)), for short runs (the quickstart).
  Both with an optional linear warm-up over `warmup_epochs` (0 in the published recipes).
  """
  if kind not in ("step", "cosine"):
    raise ValueError(f"optimizer.schedule must be 'step' or 'cosine', got {kind!r}.")
  boundaries = jnp.asarray([m * steps_per_epoch for m in milestones] or [np.iinfo(np.int32).max])
  warmup_steps = warmup_epochs * steps_per_epoch

  def schedule(count):
    if kind == "step":
      lr = base_lr * decay ** jnp.sum(count >= boundaries)
    else:
      lr = base_lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count / total_steps, 1.0)))
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, (count + 1) / warmup_steps)
    return lr

  return schedule


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int):
  """SGD with momentum and L2 weight decay on every parameter, as PyTorch's SGD applies it
  (g + wd·p, then the momentum buffer), and the learning-rate schedule."""
  if opt.name != "sgd":
    raise ValueError(f"optimizer.name must be 'sgd', got {opt.name!r}.")
  schedule = learning_rate_schedule(
      opt.lr, tuple(opt.milestones), opt.decay, steps_per_epoch, opt.get("warmup_epochs", 0.0),
      kind=opt.get("schedule", "step"), total_steps=num_epochs * steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                   optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  return tx, schedule


class AuxHead(nn.Module):
  """IPWD's auxiliary linear classifier on the penultimate features (trained by CE only)."""
  num_classes: int

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes, name="fc")(features.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Steps.


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The static pieces a train step closes over."""
  model: nn.Module
  loss: objectives.LossConfig
  mode: str
  tx: optax.GradientTransformation
  schedule: Any
  steps_per_epoch: int
  num_epochs: int
  num_classes: int
  aux_head: nn.Module | None = None
  teacher: nn.Module | None = None
  pskd_alpha: float = 0.8
  ipw_start_epoch: int = 1


def train_step(fns: StepFns, state: TrainState, batch: dict[str, jax.Array],
               teacher_variables: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch. Pure; jit it with `fns` bound.

  Args:
    fns: static configuration.
    state: the train state (donated).
    batch: {"image": float32 [B, H, W, C] normalised, "label": int32 [B], "index": int32 [B]}.
    teacher_variables: the frozen teacher's {"params", "batch_stats"} (distill), else None.

  Returns:
    (new state, the scalar metrics of this step).
  """
  images, labels = batch["image"], batch["label"]
  epoch = state.step // fns.steps_per_epoch + 1                # counted from 1
  teacher_logits = previous = None
  # The named scopes label every op of the step in profiles (benchmarks/profile_step.py).
  if fns.mode == "distill":
    with jax.named_scope("teacher"):
      teacher_logits = jax.lax.stop_gradient(
          fns.teacher.apply(teacher_variables, images, train=False))
  elif fns.mode == "self_distill":
    previous = state.predictions[batch["index"]]
    unseen = jnp.sum(previous, axis=-1, keepdims=True) <= 0
    previous = jnp.where(unseen, jax.nn.one_hot(labels, fns.num_classes), previous)

  def loss_fn(params):
    with jax.named_scope("student"):
      (logits, features), updates = fns.model.apply(
          {"params": params["model"], "batch_stats": state.batch_stats}, images, train=True,
          return_features=True, mutable=["batch_stats"])
    aux_logits = None
    if fns.aux_head is not None:
      if fns.loss.aux_head_stop_gradient:
        features = jax.lax.stop_gradient(features)
      with jax.named_scope("aux_head"):
        aux_logits = fns.aux_head.apply({"params": params["aux_head"]}, features)
    with jax.named_scope("loss"):
      return _objective(fns, state, epoch, logits, teacher_logits, previous, labels,
                        aux_logits, updates["batch_stats"])

  (loss, (metrics, batch_stats, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  with jax.named_scope("optimizer"):
    updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  with jax.named_scope("finite_guard"):
    new_state = _keep_if_finite(fns, state, batch, loss, params, batch_stats, opt_state, logits)
  metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics["lr"] = fns.schedule(state.step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return new_state, metrics


def _objective(fns: StepFns, state: TrainState, epoch, logits, teacher_logits, previous,
               labels, aux_logits, batch_stats):
  """The loss of `train_step` and its auxiliaries (metrics, new BN statistics, logits)."""
  if fns.mode == "self_distill":
    alpha = objectives.pskd_alpha(fns.pskd_alpha, epoch, fns.num_epochs)
    loss, metrics = objectives.self_distillation_loss(
        fns.loss, logits, previous, labels, alpha=alpha,
        use_ipw=epoch >= fns.ipw_start_epoch, aux_logits=aux_logits)
  else:
    ramp_epoch = ((state.step + 1) / fns.steps_per_epoch if fns.loss.dkd_warmup_per_step
                  else epoch)
    loss, metrics = objectives.distillation_loss(
        fns.loss, logits, teacher_logits, labels, epoch=ramp_epoch, aux_logits=aux_logits)
  return loss, (metrics, batch_stats, logits)


def _keep_if_finite(fns: StepFns, state: TrainState, batch, loss, params, batch_stats,
                    opt_state, logits) -> TrainState:
  """The next state, or the current one (with the step recorded) if the step went non-finite.

  A non-finite loss leaves the state as it was: the loop stops with a clear error, and no
  checkpoint ever holds NaNs. The parameters are checked too, because the loss can still be
  finite on the step whose update overflows them.
  """
  finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  predictions = state.predictions
  if fns.mode == "self_distill":
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
    predictions = keep(predictions.at[batch["index"]].set(probs), predictions)
  return state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step,
                               state.nonfinite_step),
      predictions=predictions)


def eval_step(model: nn.Module, num_classes: int, variables: Any,
              batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over a batch of: top-1/top-5 hits, CE, examples, per-class hits and counts.

  Padding rows (`mask` False) count nowhere.
  """
  logits = model.apply(variables, batch["image"], train=False)
  labels = batch["label"]
  mask = batch.get("mask", jnp.ones(labels.shape, bool))
  # The label's rank in lax.top_k's order (larger logit first, ties to the lower class):
  # per-example arithmetic that stays sharded over the batch, where top_k would make XLA
  # gather all the logits on every device first.
  true_logit = jnp.take_along_axis(logits, labels[:, None], -1)
  classes = jnp.arange(logits.shape[-1])
  ahead = (logits > true_logit) | ((logits == true_logit) & (classes < labels[:, None]))
  rank = jnp.sum(ahead, axis=-1)
  hit1 = (rank == 0) & mask
  hit5 = (rank < min(5, num_classes)) & mask
  ce = jax.nn.logsumexp(logits, axis=-1) - true_logit[:, 0]
  return {
      "top1": jnp.sum(hit1), "top5": jnp.sum(hit5), "count": jnp.sum(mask),
      "ce": jnp.sum(jnp.where(mask, ce, 0.0)),
      "class_hits": jax.ops.segment_sum(hit1.astype(jnp.int32), labels, num_classes),
      "class_count": jax.ops.segment_sum(mask.astype(jnp.int32), labels, num_classes),
  }


def summarize_eval(sums: dict[str, np.ndarray]) -> dict[str, Any]:
  """Percentages from accumulated eval sums; per-class recall as a list (NaN: no examples)."""
  n = max(int(sums["count"]), 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = 100.0 * sums["class_hits"] / sums["class_count"]
  return {"top1": 100.0 * float(sums["top1"]) / n, "top5": 100.0 * float(sums["top5"]) / n,
          "ce": float(sums["ce"]) / n, "count": int(sums["count"]),
          "per_class_recall": [None if math.isnan(r) else round(float(r), 4) for r in recall]}


# ---------------------------------------------------------------------------------------------
# Metric writer: JSON lines always, TensorBoard when tensorboardX is there.


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`), process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.active:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      pass

  def write(self, step: int, scalars: dict[str, Any], prefix: str = "") -> None:
    if not self.active:
      return
    row = {"step": int(step), **{prefix + k: v for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(prefix + k, v, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


# ---------------------------------------------------------------------------------------------
# The experiment: everything built from a config.


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _loss_fields(config) -> dict[str, Any]:
  fields = dict(config.loss)
  if config.mode == "teacher":
    fields.update(base="ce", weighting="none", ce_weight=1.0)
  return fields


def make_step_fns(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int,
                  teacher_model: str | None = None) -> StepFns:
  """The static pieces of the train step for `config` (no data, no variables needed)."""
  loss = objectives.loss_config(_loss_fields(config))
  dtype = _dtype(config.dtype)
  tx, schedule = make_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)
  teacher = None
  if config.mode == "distill":
    teacher = models.create(teacher_model or config.teacher.model, num_classes, dtype=dtype)
  return StepFns(
      model=models.create(config.model, num_classes, dtype=dtype), loss=loss, mode=config.mode,
      tx=tx, schedule=schedule, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs,
      num_classes=num_classes, aux_head=AuxHead(num_classes) if loss.needs_aux_head else None,
      teacher=teacher, pskd_alpha=config.self_distill.alpha_final,
      ipw_start_epoch=config.self_distill.ipw_start_epoch)


def init_train_state(fns: StepFns, key: jax.Array, image_shape, feature_dim: int,
                     index_size: int = 0) -> TrainState:
  """A fresh TrainState from `key` (pure: jit it, vmap it over keys for several seeds)."""
  k_model, k_aux = jax.random.split(key)
  variables = fns.model.init(k_model, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = {"model": variables["params"]}
  if fns.aux_head is not None:
    params["aux_head"] = fns.aux_head.init(k_aux, jnp.zeros((1, feature_dim)))["params"]
  predictions = None
  if fns.mode == "self_distill":
    predictions = jnp.zeros((index_size, fns.num_classes), jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=fns.tx.init(params),
                    rng=key, nonfinite_step=jnp.full((), -1, jnp.int32), predictions=predictions)


def map_seeds(fn: Callable, xs: Any, seeds_per_vmap: int | None = None) -> Any:
  """`fn` applied to each slice of `xs` along its leading seed axis S, results stacked.

  Seeds are vectorised `seeds_per_vmap` at a time (`jax.vmap`: a convolution whose weights
  carry the seed axis becomes one grouped convolution with that many groups), and the chunks
  follow one another in the same program. None or S: all seeds in one vmap, which fills a
  large accelerator; 1: S ungrouped copies of the step, for devices where grouped
  convolutions are slow (XLA:CPU, see benchmarks/results/train-*.md).

  The chunks are unrolled rather than looped (`lax.map`): XLA:CPU compiles the convolutions
  inside a loop body with its generic emitter, about 25x slower than in straight-line code
  (benchmarks/results/profile-*.md). Compile time grows with the number of chunks.
  """
  num_seeds = jax.tree.leaves(xs)[0].shape[0]
  if seeds_per_vmap is None or seeds_per_vmap >= num_seeds:
    return jax.vmap(fn)(xs)
  chunks = []
  for start in range(0, num_seeds, seeds_per_vmap):
    chunk = jax.tree.map(lambda x, s=start: x[s:s + seeds_per_vmap], xs)
    chunks.append(jax.vmap(fn)(chunk))
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *chunks)


def multi_seed_train_step(fns: StepFns, state: TrainState, batch: dict[str, jax.Array],
                          teacher_variables: Any, seeds_per_vmap: int | None = None):
  """`train_step` over independent runs: state and batch carry a leading seed axis S (each
  seed its own initialisation and data order); the teacher is shared. See `map_seeds` for
  `seeds_per_vmap`."""
  step = lambda args: train_step(fns, *args, teacher_variables)
  return map_seeds(step, (state, batch), seeds_per_vmap)


def default_seeds_per_vmap(num_seeds: int, platform: str) -> int:
  """All seeds in one vmap on accelerators; one at a time on CPU, where XLA runs grouped
  convolutions several times slower per FLOP than ungrouped ones."""
  return 1 if platform == "cpu" else num_seeds


class _StackedDeviceBatches:
  """Train batches of several seeds, [S, B, ...], from ONE device-resident copy of the data.

  Seed i is the single-seed pipeline with seed `seeds[i]`: the same permutation rule and the
  same hashed augmentation, so run i of a multi-seed run sees exactly the batches of a
  single-seed run with that seed.
  """

  def __init__(self, arrays, ds_spec, *, mesh, global_batch, seeds, index_size):
    self.seeds = tuple(int(s) for s in seeds)
    self.num_examples = len(arrays["label"])
    self.index_size = index_size
    self.steps_per_epoch = jdata.steps_per_epoch(self.num_examples, global_batch)
    self._data = jdata.place_dataset(arrays, mesh)
    self._repl = sharding.replicated(mesh)
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))

    def batches(data, perms, step_in_epoch, epoch, seeds):
      one = lambda perm, seed: jdata.device_batch(data, perm, step_in_epoch, epoch,
                                                  ds_spec=ds_spec, global_batch=global_batch,
                                                  seed=seed)
      return jax.vmap(one)(perms, seeds)

    self._fn = jax.jit(batches, out_shardings=out)
    self._seed_array = jnp.asarray(self.seeds, jnp.int32)
    self._step, self._perm_epoch, self._perms = 0, -1, None

  def __next__(self):
    epoch, s = divmod(self._step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      perms = np.stack([jdata.epoch_permutation(seed, epoch, self.num_examples)
                        for seed in self.seeds])
      self._perms = jax.make_array_from_callback(perms.shape, self._repl, lambda i: perms[i])
      self._perm_epoch = epoch
    self._step += 1
    return self._fn(self._data, self._perms, jnp.int32(s), jnp.int32(epoch), self._seed_array)

  def get_state(self):
    return {"step": self._step, "seeds": list(self.seeds), "num_examples": self.num_examples}

  def set_state(self, state):
    if list(state.get("seeds", self.seeds)) != list(self.seeds):
      raise ValueError(f"checkpointed seeds {state['seeds']} differ from {list(self.seeds)}.")
    self._step = int(state["step"])


class _StackedHostBatches:
  """Several seeds' host pipelines, stacked to [S, b, ...] on this process."""

  def __init__(self, iterators, mesh):
    self.iterators = iterators
    self.steps_per_epoch = iterators[0].steps_per_epoch
    self.index_size = iterators[0].index_size
    self._sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    stacked = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    return {k: jax.make_array_from_process_local_data(self._sharding, v)
            for k, v in stacked.items()}

  def get_state(self):
    return {"seeds": [it.get_state() for it in self.iterators]}

  def set_state(self, state):
    for it, st in zip(self.iterators, state["seeds"], strict=True):
      it.set_state(st)


class Experiment:
  """Builds data, models, optimizer and step functions from a (validated) config.

  With `config.num_seeds = S > 1`, S independent runs (seeds `config.seed + i`: their own
  initialisation and data order, each at the recipe's batch size) train in one jitted step
  over a train state stacked along a leading seed axis; `config.seeds_per_vmap` of them are
  vectorised together (0: `default_seeds_per_vmap`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    sharding.avoid_cpu_collective_deadlocks()
    self.mesh = sharding.make_mesh(devices)
    self.num_seeds = int(config.get("num_seeds", 1))
    self.seeds = [config.seed + i for i in range(self.num_seeds)]
    self.seeds_per_vmap = (config.get("seeds_per_vmap", 0) or default_seeds_per_vmap(
        self.num_seeds, self.mesh.devices.flat[0].platform))
    sharding.check_global_batch(config.batch_size, self.mesh)
    self._build_data()
    self.teacher_variables, teacher_name = self._restore_teacher()
    self.fns = make_step_fns(config, self.num_classes, self.steps_per_epoch, teacher_name)
    self.model, self.teacher = self.fns.model, self.fns.teacher

  @property
  def multi_seed(self) -> bool:
    return self.num_seeds > 1

  # -- data -----------------------------------------------------------------------------------

  def _build_data(self):
    c = self.config.dataset
    self.ds_spec = jdata.spec(c.name, **dict(c.get("spec_overrides", {})))
    self.num_classes = self.ds_spec.num_classes
    data_dir = jdata.ensure_prepared(c.name, c.data_dir)
    self.device_resident = (c.input == "device" or (c.input == "auto"
                                                     and self.ds_spec.fits_on_device))
    batch = self.config.batch_size
    lt = dict(long_tail_factor=c.get("long_tail_factor"), long_tail_seed=c.get("long_tail_seed", 0))
    if self.device_resident:
      source = jdata.open_source(c.name, self.ds_spec.train_split, data_dir)
      arrays = jdata.load_arrays(c.name, self.ds_spec.train_split, source=source,
                                 long_tail_factor=lt["long_tail_factor"],
                                 seed=lt["long_tail_seed"])
      if self.multi_seed:
        self.train_iter = _StackedDeviceBatches(arrays, self.ds_spec, mesh=self.mesh,
                                                global_batch=batch, seeds=self.seeds,
                                                index_size=len(source))
      else:
        self.train_iter = jdata.DeviceResidentLoader(
            arrays, self.ds_spec, global_batch=batch, mesh=self.mesh, seed=self.config.seed,
            index_size=len(source))
    else:
      iterators = [jdata.host_iterator(c.name, data_dir=data_dir, train=True, global_batch=batch,
                                       seed=seed, ds_spec=self.ds_spec,
                                       worker_count=c.num_workers, **lt)
                   for seed in self.seeds]
      self.train_iter = (_StackedHostBatches(iterators, self.mesh) if self.multi_seed
                         else iterators[0])
    eval_batch = self.config.eval_batch_size
    sharding.check_global_batch(eval_batch, self.mesh)
    if self.device_resident:
      eval_arrays = jdata.load_arrays(c.name, self.ds_spec.eval_split, data_dir)
      self.eval_iter_fn = lambda: jdata.device_loader(
          c.name, mesh=self.mesh, train=False, global_batch=eval_batch, ds_spec=self.ds_spec,
          arrays=eval_arrays)
    else:
      self.eval_iter_fn = lambda: jdata.host_iterator(
          c.name, data_dir=data_dir, train=False, global_batch=eval_batch, ds_spec=self.ds_spec,
          worker_count=c.num_workers)
    self.steps_per_epoch = self.train_iter.steps_per_epoch
    self.total_steps = self.config.num_epochs * self.steps_per_epoch
    if self.config.get("max_steps"):
      self.total_steps = min(self.total_steps, self.config.max_steps)

  def next_train_batch(self) -> dict[str, jax.Array]:
    batch = next(self.train_iter)
    if self.device_resident or self.multi_seed:
      return batch
    return jdata.shard_batch(batch, self.mesh)

  def eval_batches(self):
    it = self.eval_iter_fn()
    try:
      for batch in it:
        yield batch if self.device_resident else jdata.shard_batch(batch, self.mesh)
    finally:
      if hasattr(it, "close"):
        it.close()

  # -- models ---------------------------------------------------------------------------------

  def _restore_teacher(self):
    c = self.config
    if c.mode != "distill":
      return None, None
    variables, meta = checkpoint.restore_model_variables(os.path.abspath(c.teacher.checkpoint))
    name = meta.get("model", c.teacher.model)
    if c.teacher.model and models.spec(name).name != models.spec(c.teacher.model).name:
      raise ValueError(f"teacher checkpoint {c.teacher.checkpoint} holds a {name}, but "
                       f"config.teacher.model is {c.teacher.model}.")
    return sharding.put_replicated(variables, self.mesh), name

  def init_state(self) -> TrainState:
    """A fresh state (stacked over seeds for several), born replicated on the mesh."""
    init = functools.partial(init_train_state, self.fns,
                             image_shape=self.ds_spec.image_shape,
                             feature_dim=models.feature_dim(self.config.model),
                             index_size=self.train_iter.index_size)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in self.seeds])
    if self.multi_seed:
      init = jax.vmap(init)
    else:
      keys = keys[0]
    return jax.jit(init, out_shardings=sharding.replicated(self.mesh))(keys)

  # -- compiled steps -------------------------------------------------------------------------

  @functools.cached_property
  def p_train_step(self):
    repl = sharding.replicated(self.mesh)
    step = functools.partial(train_step, self.fns)
    if self.multi_seed:
      step = functools.partial(multi_seed_train_step, self.fns,
                               seeds_per_vmap=self.seeds_per_vmap)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))

  @functools.cached_property
  def p_eval_step(self):
    fn = functools.partial(eval_step, self.model, self.num_classes)
    if self.multi_seed:
      one = fn
      fn = lambda variables, batch: map_seeds(lambda v: one(v, batch), variables,
                                              self.seeds_per_vmap)
    return jax.jit(fn, out_shardings=sharding.replicated(self.mesh))

  @functools.cached_property
  def p_teacher_eval_step(self):
    return jax.jit(functools.partial(eval_step, self.teacher, self.num_classes),
                   out_shardings=sharding.replicated(self.mesh))

  def evaluate(self, variables, step_fn=None) -> list[dict[str, Any]] | dict[str, Any]:
    """Eval summary of `variables` (a list, one per seed, for a multi-seed model)."""
    multi = step_fn is None and self.multi_seed
    step_fn = step_fn or self.p_eval_step
    sums = None
    for batch in self.eval_batches():
      out = step_fn(variables, batch)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    if multi:
      return [summarize_eval(jax.tree.map(lambda x, i=i: x[i], sums))
              for i in range(self.num_seeds)]
    return summarize_eval(sums)


def model_variables(state: TrainState) -> dict[str, Any]:
  """The deployable model's variables (no auxiliary head)."""
  return {"params": state.params["model"], "batch_stats": state.batch_stats}


# ---------------------------------------------------------------------------------------------
# The loop.


def _versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {}
  for pkg in ("jaxkd", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
              "tensorflow-datasets", "grain"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def _save_run_info(config, workdir: str, exp: Experiment) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  info = {"versions": _versions(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count(),
          "global_batch": config.batch_size, "steps_per_epoch": exp.steps_per_epoch,
          "total_steps": exp.total_steps, "device_resident_input": exp.device_resident,
          "python": sys.version.split()[0]}
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f, indent=1)


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class _Progress:
  """A progress bar with images/s (compile excluded) and ETA on process 0's terminal."""

  def __init__(self, total: int, initial: int, batch: int, enabled: bool):
    self.batch = batch
    self.bar = None
    if enabled and jax.process_index() == 0:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)
      except ImportError:
        pass
    self.t0 = self.s0 = None

  def update(self, step: int, postfix: dict[str, Any] | None = None) -> float | None:
    """Advances to `step`; returns images/s since the first (compiled) step, if known."""
    now = time.perf_counter()
    if self.t0 is None:
      self.t0, self.s0 = now, step
      rate = None
    else:
      rate = (step - self.s0) * self.batch / max(now - self.t0, 1e-9)
    if self.bar is not None:
      self.bar.n = step
      if rate is not None:
        left = (self.bar.total - step) * self.batch / max(rate, 1e-9)
        self.bar.set_postfix({"img/s": f"{rate:,.0f}", "eta": f"{left/60:.1f}min",
                              **(postfix or {})}, refresh=False)
      self.bar.refresh()
    return rate

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _seed_slice(tree, i: int | None):
  return tree if i is None else jax.tree.map(lambda x: x[i], tree)


def _record_eval(summary: dict[str, Any], result: dict[str, Any], epoch: int, step: int) -> bool:
  """Adds an evaluation to a run's summary; returns whether it is the best so far."""
  summary["history"].append({"epoch": epoch, "step": step, "top1": result["top1"],
                             "top5": result["top5"]})
  summary["last"] = result
  best = summary["best_top1"] is None or result["top1"] > summary["best_top1"]
  if best:
    summary["best_top1"], summary["best_epoch"], summary["best"] = result["top1"], epoch, result
  return best


def _mean_std(values: list[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def describe(summary: dict[str, Any]) -> str:
  """One line: best and last top-1 (mean ± std over seeds for a multi-seed run)."""
  if summary.get("num_seeds", 1) > 1:
    b, l = summary["best_top1"], summary["last_top1"]
    return (f"best top-1 {b['mean']:.2f} ± {b['std']:.2f}%, last {l['mean']:.2f} ± "
            f"{l['std']:.2f}% over {summary['num_seeds']} seeds")
  return (f"best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']}), last "
          f"{summary['last_top1']:.2f}%")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir` and returns its summary.

  The summary (also `workdir/summary.json`): best and last top-1/top-5, the best epoch,
  per-class recall of the last and best evaluations (also `eval_last.json`,
  `eval_best.json`), the teacher's accuracy, images/s. With `num_seeds` > 1: one such
  summary per seed under "seeds" (files `eval_last_seed{i}.json`, ...), and the mean ± std
  of best and last top-1 over seeds; each seed's model is exported to `model_seed{i}`.

  `devices` (default: all) builds the mesh from a subset, for tests and benchmarks.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  exp = Experiment(config, workdir, devices)
  seeds = list(range(exp.num_seeds)) if exp.multi_seed else [None]
  suffix = lambda i: "" if i is None else f"_seed{i}"
  _save_run_info(config, workdir, exp)
  writer = MetricWriter(workdir)
  manager = checkpoint.run_manager(os.path.join(workdir, "checkpoints"),
                                       keep=config.checkpoint.keep,
                                       async_save=not sharding.multi_device_cpu())
  state = exp.init_state()
  runs = [{"seed": config.seed + (i or 0), "best_top1": None, "best_epoch": None,
           "history": []} for i in seeds]
  teacher = None
  latest = manager.latest_step()
  if latest is not None:
    state, meta = checkpoint.restore_run(manager, latest, state)
    runs, teacher = meta["runs"], meta.get("teacher")
    exp.train_iter.set_state(meta["data"])
    print(f"Resumed from {manager.directory}/{latest}.", flush=True)
  start = int(np.max(state.step))

  if exp.teacher is not None and teacher is None:
    teacher = {k: v for k, v in exp.evaluate(exp.teacher_variables,
                                             exp.p_teacher_eval_step).items()
               if k != "per_class_recall"}
    writer.write(start, teacher, prefix="teacher/")
    print(f"Teacher top-1 {teacher['top1']:.2f}%", flush=True)

  def first_nonfinite() -> int | None:
    bad = np.asarray(jax.device_get(state.nonfinite_step)).reshape(-1)
    bad = bad[bad >= 0]
    return int(bad.min()) if bad.size else None

  def save(step: int, *, block: bool = False):
    if first_nonfinite() is not None:
      return
    checkpoint.save_run(manager, step, state, {"data": exp.train_iter.get_state(),
                                                   "runs": runs, "teacher": teacher})
    if block:
      manager.wait_until_finished()

  def check_finite():
    bad = first_nonfinite()
    if bad is not None:
      manager.wait_until_finished()
      last = manager.latest_step()
      where = (f"the last good checkpoint is {manager.directory}/{last} (intact); restart with "
               f"the same --workdir to resume from it after fixing the cause (e.g. a lower "
               f"learning rate)" if last is not None else "no checkpoint had been written yet")
      raise TrainingDiverged(f"The loss became NaN or inf at step {bad}; {where}.")

  def evaluate(done: int):
    epoch = math.ceil(done / exp.steps_per_epoch)
    results = exp.evaluate(model_variables(state))
    results = results if exp.multi_seed else [results]
    for i, run, result in zip(seeds, runs, results):
      best = _record_eval(run, result, epoch, done)
      _write_json(os.path.join(workdir, f"eval_last{suffix(i)}.json"), {"epoch": epoch, **result})
      if best:
        _write_json(os.path.join(workdir, f"eval_best{suffix(i)}.json"), {"epoch": epoch, **result})
    scalars = {k: float(np.mean([r[k] for r in results])) for k in ("top1", "top5", "ce")}
    if exp.multi_seed:
      scalars.update({f"top1_seed{i}": r["top1"] for i, r in zip(seeds, results)})
    writer.write(done, scalars, prefix="eval/")

  every = config.checkpoint.every_steps or exp.steps_per_epoch
  log_every = max(1, config.log_every_steps)
  progress = _Progress(exp.total_steps, start, config.batch_size * exp.num_seeds,
                       config.progress_bar)
  interrupted = False
  previous_handler = signal.getsignal(signal.SIGINT)

  def on_sigint(signum, frame):  # Ctrl-C: finish the step in flight, save, exit.
    nonlocal interrupted
    if interrupted:  # a second Ctrl-C aborts at once
      signal.signal(signal.SIGINT, previous_handler)
      raise KeyboardInterrupt
    interrupted = True

  single_process = jax.process_count() == 1
  if single_process:
    signal.signal(signal.SIGINT, on_sigint)
  rate, pending = None, []
  try:
    for step in range(start, exp.total_steps):
      state, metrics = exp.p_train_step(state, exp.next_train_batch(), exp.teacher_variables)
      pending.append(metrics)
      done = step + 1
      if done % log_every == 0 or done == exp.total_steps:
        fetched = jax.device_get(pending)
        scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        pending = []
        check_finite()
        rate = progress.update(done, {"loss": f"{scalars['loss']:.3f}"})
        if rate is not None:
          scalars["images_per_sec"] = rate
        writer.write(done, scalars, prefix="train/")
      epoch_end = done % exp.steps_per_epoch == 0
      if done == exp.total_steps or (
          epoch_end and (done // exp.steps_per_epoch) % config.eval_every_epochs == 0):
        check_finite()
        evaluate(done)
      if done % every == 0 or done == exp.total_steps:
        save(done)
      if interrupted:
        break
  except KeyboardInterrupt:
    interrupted = True
  finally:
    if single_process:
      signal.signal(signal.SIGINT, previous_handler)
    progress.close()

  if interrupted:
    step = int(np.max(state.step))
    if manager.latest_step() != step:
      save(step, block=True)
    manager.wait_until_finished()
    writer.close()
    print(f"Interrupted: saved step {step} in {manager.directory}; rerun with the same "
          f"--workdir to resume.", flush=True)
    raise KeyboardInterrupt
  manager.wait_until_finished()
  manager.close()
  check_finite()
  # The deployable model (params + BN statistics), in the converter's format: what a later
  # `distill` run names as its teacher.
  for i in seeds:
    checkpoint.save_model_variables(
        os.path.join(workdir, f"model{suffix(i)}"), _seed_slice(model_variables(state), i),
        model=models.spec(config.model).name, num_classes=exp.num_classes,
        source=f"jaxkd run {workdir}{suffix(i)}", overwrite=True)
  for run in runs:
    run["last_top1"] = run["last"]["top1"] if "last" in run else None
  if exp.multi_seed:
    final = {"seeds": runs, "best_top1": _mean_std([r["best_top1"] for r in runs]),
             "last_top1": _mean_std([r["last_top1"] for r in runs])}
  else:
    final = dict(runs[0])
  final.update(teacher=teacher, images_per_sec=rate, steps=int(np.max(state.step)),
               model=config.model, mode=config.mode, method=config.get("method"),
               num_seeds=exp.num_seeds)
  _write_json(os.path.join(workdir, "summary.json"), final)
  writer.close()
  return final
