"""The pure, jit-able core of training: state, static step configuration, train and eval steps.

    cfg = make_step_config(model="resnet8x4", num_classes=100, objective=Objective(),
                           optimizer=OptimizerConfig(), steps_per_epoch=781, num_epochs=240,
                           teacher_model="resnet32x4")
    state = init_train_state(cfg, jax.random.key(0), image_shape=(32, 32, 3), feature_dim=256)
    state, metrics = jax.jit(functools.partial(train_step, cfg))(state, batch, teacher_vars)

Nothing here reads data, files or configs, so benchmarks and tests build a step from this
module alone. Several students train in one program: `seeds_train_step` maps one objective
over S seeds (state and batch with a leading seed axis), and `sweep_train_step` runs M
objectives × S seeds from one teacher forward per seed's batch; the trainer always uses the
latter, M = S = 1 included.
How data flows through a step: docs/DESIGN.md#a-training-step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import models
from jaxkd import objectives
from jaxkd import optim

__all__ = ["TrainState", "StepConfig", "make_step_config", "init_train_state", "train_step",
           "eval_step", "map_seeds", "seeds_train_step", "seeds_eval_step", "sweep_train_step",
           "teacher_logits", "train_step_on",
           "default_seeds_per_vmap", "model_variables", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; all of it is checkpointed.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: {"model": ..., "aux_head": ... (IPWD only)}, float32.
    batch_stats: the model's BatchNorm running statistics.
    opt_state: optax state.
    nonfinite_step: int32, the first step whose loss was not finite (−1 while none was). Such
      a step leaves the state unchanged, so a checkpoint is never poisoned.
    predictions: self-distillation only: float32 [index_size, C], the last softmax prediction
      of every training example (zeros before it was first seen); None otherwise.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array
  predictions: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static pieces a train step closes over (hashable: bind it with functools.partial)."""
  model: nn.Module
  objective: objectives.Objective
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  steps_per_epoch: int
  num_epochs: int
  num_classes: int
  aux_head: nn.Module | None = None
  teacher: nn.Module | None = None


def make_step_config(*, model: str, num_classes: int, objective: objectives.Objective,
                     optimizer: optim.OptimizerConfig, steps_per_epoch: int, num_epochs: int,
                     teacher_model: str | None = None, dtype: str = "float32") -> StepConfig:
  """The StepConfig of a student `model` (and `teacher_model` when distilling)."""
  compute_dtype = DTYPES[dtype]
  tx, schedule = optim.make_optimizer(optimizer, steps_per_epoch, num_epochs)
  teacher = None
  if objective.targets == "teacher":
    if not teacher_model:
      raise ValueError("distilling from a teacher needs teacher_model.")
    teacher = models.create(teacher_model, num_classes, dtype=compute_dtype)
  return StepConfig(
      model=models.create(model, num_classes, dtype=compute_dtype), objective=objective,
      tx=tx, schedule=schedule, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
      num_classes=num_classes,
      aux_head=models.AuxHead(num_classes) if objective.loss.needs_aux_head else None,
      teacher=teacher)


def init_train_state(cfg: StepConfig, key: jax.Array, image_shape, feature_dim: int,
                     index_size: int = 0) -> TrainState:
  """A fresh TrainState from `key` (pure: jit it; vmap it over keys for several seeds)."""
  k_model, k_aux = jax.random.split(key)
  variables = cfg.model.init(k_model, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = {"model": variables["params"]}
  if cfg.aux_head is not None:
    params["aux_head"] = cfg.aux_head.init(k_aux, jnp.zeros((1, feature_dim)))["params"]
  predictions = None
  if cfg.objective.targets == "self":
    predictions = jnp.zeros((index_size, cfg.num_classes), jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=cfg.tx.init(params),
                    nonfinite_step=jnp.full((), -1, jnp.int32), predictions=predictions)


def teacher_logits(teacher: nn.Module, teacher_variables: Any, images: jax.Array) -> jax.Array:
  """The frozen teacher's logits [B, C] on `images` [B, H, W, C] (inference mode, no gradient)."""
  with jax.named_scope("teacher"):
    return jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False))


def _soft_targets(cfg: StepConfig, state: TrainState, batch, teacher_out):
  """The teacher's logits (`teacher_out`), the previous-epoch predictions, or None
  (supervised)."""
  targets = cfg.objective.targets
  if targets == "teacher":
    return teacher_out
  if targets == "self":
    previous = state.predictions[batch["index"]]
    unseen = jnp.sum(previous, axis=-1, keepdims=True) <= 0
    return jnp.where(unseen, jax.nn.one_hot(batch["label"], cfg.num_classes), previous)
  return None


def train_step(cfg: StepConfig, state: TrainState, batch: dict[str, jax.Array],
               teacher_variables: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of one student on a global batch. Pure; jit it with `cfg` bound.

  Args:
    cfg: static configuration.
    state: the train state (donate it).
    batch: {"image": float32 [B, H, W, C] normalised, "label": int32 [B], "index": int32 [B]}.
    teacher_variables: the frozen teacher's {"params", "batch_stats"} (distillation), else None.

  Returns:
    (new state, the metrics of this step): scalars, and for a weighted objective also
    "weights" float32 [B] (the per-example sample weights) and "weight_labels" int32 [B],
    which the trainer's diagnostics collect instead of averaging.
  """
  out = None
  if cfg.objective.targets == "teacher":
    out = teacher_logits(cfg.teacher, teacher_variables, batch["image"])
  return train_step_on(cfg, state, batch, out)


def train_step_on(cfg: StepConfig, state: TrainState, batch: dict[str, jax.Array],
                  teacher_out: jax.Array | None) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` given the teacher's logits [B, C] (`teacher_logits`; None unless the
  objective distils from a teacher), so that several students share one teacher forward."""
  labels = batch["label"]
  # The named scopes label every op of the step in profiles (benchmarks/bench_profile_step.py).
  soft_targets = _soft_targets(cfg, state, batch, teacher_out)

  def loss_fn(params):
    with jax.named_scope("student"):
      (logits, features), updates = cfg.model.apply(
          {"params": params["model"], "batch_stats": state.batch_stats}, batch["image"],
          train=True, return_features=True, mutable=["batch_stats"])
    aux_logits = None
    if cfg.aux_head is not None:
      if cfg.objective.loss.aux_head_stop_gradient:
        features = jax.lax.stop_gradient(features)
      with jax.named_scope("aux_head"):
        aux_logits = cfg.aux_head.apply({"params": params["aux_head"]}, features)
    with jax.named_scope("loss"):
      loss, metrics = objectives.objective(
          cfg.objective, logits, soft_targets, labels, step=state.step,
          steps_per_epoch=cfg.steps_per_epoch, num_epochs=cfg.num_epochs,
          aux_logits=aux_logits)
    return loss, (metrics, updates["batch_stats"], logits)

  (loss, (metrics, batch_stats, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  with jax.named_scope("optimizer"):
    updates, opt_state = cfg.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  with jax.named_scope("finite_guard"):
    # Every floating leaf of the new state: an overflowing update can leave the loss and
    # the parameters finite and put inf into a BatchNorm variance or the momentum.
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, batch_stats, opt_state))
         if jnp.issubdtype(x.dtype, jnp.inexact)]))
    predictions = state.predictions
    if cfg.objective.targets == "self":
      probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
      predictions = predictions.at[batch["index"]].set(probs)
    new_state = _keep_if_finite(finite, state, params=params, batch_stats=batch_stats,
                                opt_state=opt_state, predictions=predictions)
  metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics["lr"] = cfg.schedule(state.step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  if "weights" in metrics:
    metrics["weight_labels"] = labels
  return new_state, metrics


def _keep_if_finite(finite: jax.Array, state: TrainState, **new: Any) -> TrainState:
  """The state with `new` fields if the step was finite, else unchanged with the step recorded.

  A non-finite step leaves the state as it was, so the loop stops with a clear error and no
  checkpoint ever holds NaNs. The caller checks the whole new state (parameters, BatchNorm
  statistics, optimizer state), because the loss can be finite on the step whose update
  overflows them.
  """
  # A student that diverged earlier stays frozen at its last finite state: in a run of several
  # students, the others go on (the loop reports it).
  finite = finite & (state.nonfinite_step < 0)
  keep = lambda n, o: jnp.where(finite, n, o)
  kept = {k: jax.tree.map(keep, v, getattr(state, k)) for k, v in new.items()}
  return state.replace(
      step=state.step + 1,
      nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step,
                               state.nonfinite_step),
      **kept)


def eval_step(model: nn.Module, num_classes: int, variables: Any,
              batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over a batch of: top-1/top-5 hits, CE, examples, per-class hits and counts; and
  per example, under "examples", the maximum softmax probability ("confidence" float32 [B]),
  the top-1 hit ("correct" bool [B]) and "mask" [B], for calibration (ECE, AURC).

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
  # max softmax = exp(max z − logsumexp z), in float32: no [B, C] probabilities are formed.
  z = logits.astype(jnp.float32)
  confidence = jnp.exp(jnp.max(z, axis=-1) - jax.nn.logsumexp(z, axis=-1))
  return {
      "examples": {"confidence": confidence, "correct": rank == 0, "mask": mask},
      "top1": jnp.sum(hit1), "top5": jnp.sum(hit5), "count": jnp.sum(mask),
      "ce": jnp.sum(jnp.where(mask, ce, 0.0)),
      "class_hits": jax.ops.segment_sum(hit1.astype(jnp.int32), labels, num_classes),
      "class_count": jax.ops.segment_sum(mask.astype(jnp.int32), labels, num_classes),
  }


def map_seeds(fn: Callable, xs: Any, seeds_per_vmap: int | None = None) -> Any:
  """`fn` applied to each slice of `xs` along its leading seed axis S, results stacked.

  Seeds are vectorised `seeds_per_vmap` at a time (`jax.vmap`: a convolution whose weights
  carry the seed axis becomes one grouped convolution with that many groups), and the chunks
  follow one another in the same program. None or ≥ S: all seeds in one vmap, which fills a
  large accelerator; 1: S plain copies of the step (no vmap), for devices where grouped
  convolutions are slow (XLA:CPU, docs/NOTES.md#multi-seed-layout-on-cpu).

  The chunks are unrolled rather than looped (`lax.map`): XLA:CPU compiles the convolutions
  inside a loop body with a generic emitter, many times slower than in straight-line code.
  """
  num_seeds = jax.tree.leaves(xs)[0].shape[0]
  size = num_seeds if seeds_per_vmap is None else max(1, min(seeds_per_vmap, num_seeds))

  def apply(chunk):
    if size == 1:  # one seed: the plain single-student program
      out = fn(jax.tree.map(lambda x: x[0], chunk))
      return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(fn)(chunk)

  if size == num_seeds:
    return apply(xs)
  chunks = [apply(jax.tree.map(lambda x, s=start: x[s:s + size], xs))
            for start in range(0, num_seeds, size)]
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *chunks)


def seeds_train_step(cfg: StepConfig, state: TrainState, batch: dict[str, jax.Array],
                     teacher_variables: Any, seeds_per_vmap: int | None = None):
  """`train_step` over S students: state and batch `[S, B, ...]` carry a leading seed axis
  (each seed its own initialisation and data order); the teacher is shared. See `map_seeds`."""
  step = lambda args: train_step(cfg, *args, teacher_variables)
  return map_seeds(step, (state, batch), seeds_per_vmap)


def sweep_train_step(cfgs: tuple[StepConfig, ...], states: tuple[TrainState, ...],
                     batch: dict[str, jax.Array], teacher_variables: Any,
                     seeds_per_vmap: int | None = None):
  """One step of a sweep: M objectives (`cfgs`, one student architecture) × S seeds.

  `states[m]` is member m's state with a leading seed axis S; `batch` is `[S, B, ...]`, one
  data order per seed, shared by every objective (so that method differences within a seed
  are paired). The teacher runs once per seed's batch and its logits feed every member that
  distils, instead of once per member. Returns (new states, metrics) as M-tuples of
  `[S, ...]` pytrees. A single run is the sweep of one member.
  """
  teacher = next((c.teacher for c in cfgs if c.teacher is not None), None)
  logits = None
  if teacher is not None:
    logits = map_seeds(lambda b: teacher_logits(teacher, teacher_variables, b["image"]),
                       batch, seeds_per_vmap)
  out = []
  for cfg, state in zip(cfgs, states):
    shared = logits if cfg.objective.targets == "teacher" else None
    out.append(map_seeds(lambda args, cfg=cfg: train_step_on(cfg, *args),
                         (state, batch, shared), seeds_per_vmap))
  return tuple(o[0] for o in out), tuple(o[1] for o in out)


def seeds_eval_step(model: nn.Module, num_classes: int, variables: Any,
                    batch: dict[str, jax.Array], seeds_per_vmap: int | None = None):
  """`eval_step` of S models (variables with a leading seed axis) on one batch `[B, ...]`."""
  return map_seeds(lambda v: eval_step(model, num_classes, v, batch), variables, seeds_per_vmap)


def default_seeds_per_vmap(num_seeds: int, platform: str) -> int:
  """All seeds in one vmap on accelerators; one at a time on CPU, where XLA runs grouped
  convolutions several times slower per FLOP than ungrouped ones."""
  return 1 if platform == "cpu" else num_seeds


def model_variables(state: TrainState) -> dict[str, Any]:
  """The deployable model's variables (no auxiliary head)."""
  return {"params": state.params["model"], "batch_stats": state.batch_stats}
