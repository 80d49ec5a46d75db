"""The training objective: a base loss × a sample weighting, plus cross-entropy.

    L = w_CE · CE(f, y) + w_KD · ramp(epoch) · base(f, teacher; w)   [+ CE(g, y) for IPWD]

base ∈ {"ce", "kd", "dkd"}, weighting ∈ {"none", "entropy", "adaptive_entropy",
"inverse_propensity"}: any weighting composes with any distillation base
(docs/METHODS.md#composing-a-base-and-a-weighting). The named methods are presets of these
fields (`METHODS`). In one-stage self-distillation (PS-KD, docs/METHODS.md#self-distillation)
the soft targets are the model's own predictions from the previous epoch.

`objective()` is the one entry point of the train step: it owns everything that depends on
the training progress (DKD's warm-up, PS-KD's α_t, the epoch at which IPW starts), computed
from the step count. Every function here is pure and traced inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses, weighting

__all__ = ["BASES", "WEIGHTINGS", "TARGETS", "METHODS", "LossConfig", "Objective",
           "loss_config", "sample_weights", "dkd_ramp", "pskd_alpha", "distillation_loss",
           "self_distillation_loss", "objective"]

BASES = ("ce", "kd", "dkd")
WEIGHTINGS = ("none", "entropy", "adaptive_entropy", "inverse_propensity")
# Where the soft targets of a run come from: none (supervised training), a frozen teacher
# (two-stage distillation), or the model's own previous predictions (self-distillation).
TARGETS = ("labels", "teacher", "self")

# Named methods: (base loss, weighting). Their numeric defaults are set by
# `jaxkd.config.apply_method` (docs/METHODS.md#recipes).
METHODS = {
    "ce": ("ce", "none"),
    "kd": ("kd", "none"),
    "erkd": ("kd", "entropy"),
    "eakd": ("kd", "adaptive_entropy"),
    "ipwd": ("kd", "inverse_propensity"),
    "dkd": ("dkd", "none"),
    "erdkd": ("dkd", "entropy"),
    "eadkd": ("dkd", "adaptive_entropy"),
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Every number of the loss. Defaults: the CIFAR-100 KD recipe (docs/METHODS.md#kd)."""
  base: str = "kd"
  weighting: str = "none"
  ce_weight: float = 0.1
  kd_weight: float = 0.9
  temperature: float = 4.0
  # DKD (docs/METHODS.md#dkd): α, β per pair, warm-up min(epoch / warmup, 1), epochs from 1.
  dkd_alpha: float = 1.0
  dkd_beta: float = 8.0
  dkd_warmup_epochs: float = 20.0
  # False: the staircase over whole epochs of the reference code. True: a linear ramp per
  # step, for runs of a few epochs (the quickstart), where the staircase would jump to full
  # strength at once.
  dkd_warmup_per_step: bool = False
  # ER-KD (docs/METHODS.md#er-kd): entropy temperature τ′, independent of τ;
  # "batch_mean" reproduces the reference ER-DKD, which broadcasts the batch mean.
  entropy_temperature: float = 4.0
  entropy_mode: str = "per_example"
  # EA-KD (docs/METHODS.md#ea-kd): entropy temperature t and H_ub (None = ln C).
  adaptive_temperature: float = 3.0
  entropy_upper_bound: float | None = None
  # IPWD (docs/METHODS.md#the-ipwd-reconstruction).
  ipw_estimator: str = "likelihood_ratio"
  ipw_standardize: bool = True
  ipw_max_weight: float | None = None
  # The auxiliary CE head's gradient into the backbone is stopped by default: the head
  # estimates the propensity, it does not train the features.
  aux_head_stop_gradient: bool = True
  normalize: str | None = None
  label_smoothing: float = 0.0

  @property
  def needs_aux_head(self) -> bool:
    return self.weighting == "inverse_propensity"

  @property
  def needs_teacher(self) -> bool:
    return self.base != "ce"

  def validate(self) -> None:
    if self.base not in BASES:
      raise ValueError(f"loss.base must be one of {BASES}, got {self.base!r}.")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
    if self.base == "ce" and self.weighting != "none":
      raise ValueError("loss.weighting needs a distillation base (kd or dkd), got base 'ce'.")
    for name in ("temperature", "entropy_temperature", "adaptive_temperature"):
      if not getattr(self, name) > 0:
        raise ValueError(f"loss.{name} must be positive, got {getattr(self, name)!r}.")
    if self.dkd_warmup_epochs < 0:
      raise ValueError(f"loss.dkd_warmup_epochs must be ≥ 0, got {self.dkd_warmup_epochs!r}.")
    if self.normalize not in weighting.NORMALIZE_OPTIONS:
      raise ValueError(f"loss.normalize must be one of {weighting.NORMALIZE_OPTIONS}.")
    if self.ipw_estimator not in weighting.ESTIMATORS:
      raise ValueError(f"loss.ipw_estimator must be one of {weighting.ESTIMATORS}.")
    if self.entropy_mode not in weighting.ENTROPY_MODES:
      raise ValueError(f"loss.entropy_mode must be one of {weighting.ENTROPY_MODES}.")


def loss_config(fields: dict[str, Any]) -> LossConfig:
  """A validated LossConfig from a dict (e.g. `config.loss.to_dict()`); unknown keys fail."""
  known = {f.name for f in dataclasses.fields(LossConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown loss option(s) {unknown}; known: {sorted(known)}.")
  cfg = LossConfig(**fields)
  cfg.validate()
  return cfg


@dataclasses.dataclass(frozen=True)
class Objective:
  """A run's whole objective: the loss, where its soft targets come from, and its schedule.

  Attributes:
    loss: the loss numbers.
    targets: one of `TARGETS`.
    pskd_alpha_final: PS-KD's α_T (self-distillation).
    ipw_start_epoch: the first epoch (from 1) whose self-distillation loss is IPW-weighted.
  """
  loss: LossConfig = LossConfig()
  targets: str = "teacher"
  pskd_alpha_final: float = 0.8
  ipw_start_epoch: int = 1

  def validate(self) -> None:
    self.loss.validate()
    if self.targets not in TARGETS:
      raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}.")
    if self.targets == "teacher" and not self.loss.needs_teacher:
      raise ValueError("distilling from a teacher needs a distillation loss (loss.base kd or "
                       "dkd).")
    if self.targets == "labels" and self.loss.base != "ce":
      raise ValueError(f"supervised training takes loss.base 'ce', got {self.loss.base!r}.")


def sample_weights(cfg: LossConfig, logits: jax.Array, teacher_logits: jax.Array | None,
                   labels: jax.Array, aux_logits: jax.Array | None,
                   where: jax.Array | None = None) -> jax.Array | None:
  """The per-example weights `[B]` of `cfg.weighting` (None for "none"); no gradient."""
  if cfg.weighting == "none":
    return None
  if cfg.weighting == "entropy":
    return weighting.teacher_entropy_weights(
        teacher_logits, temperature=cfg.entropy_temperature, normalize=cfg.normalize,
        where=where, mode=cfg.entropy_mode)
  if cfg.weighting == "adaptive_entropy":
    return weighting.adaptive_entropy_weights(
        teacher_logits, logits, temperature=cfg.adaptive_temperature,
        entropy_upper_bound=cfg.entropy_upper_bound, normalize=cfg.normalize, where=where)
  if aux_logits is None:
    raise ValueError("inverse_propensity weighting needs the auxiliary head's logits.")
  return weighting.inverse_propensity_weights(
      logits, aux_logits, labels, estimator=cfg.ipw_estimator, standardize=cfg.ipw_standardize,
      normalize=cfg.normalize, max_weight=cfg.ipw_max_weight, where=where)


def dkd_ramp(cfg: LossConfig, epoch: jax.Array) -> jax.Array:
  """DKD's warm-up factor min(epoch / warmup, 1), epoch counted from 1 (1 for other bases)."""
  if cfg.base != "dkd" or cfg.dkd_warmup_epochs == 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / cfg.dkd_warmup_epochs, 1.0)


def pskd_alpha(alpha_final: float, epoch: jax.Array, num_epochs: int) -> jax.Array:
  """PS-KD's α_t = α_T · epoch / epochs (Kim et al., ICCV 2021), epoch counted from 1."""
  return alpha_final * jnp.asarray(epoch, jnp.float32) / num_epochs


def _weight_metrics(w: jax.Array, where: jax.Array | None) -> dict[str, jax.Array]:
  """Batch mean and max of the weights, and the `[B]` weights themselves ("weights", not a
  scalar: the trainer's diagnostics collect them, docs/DESIGN.md#diagnostics)."""
  return {"weight_mean": losses.weighted_mean(w, where=where),
          "weight_max": jnp.max(w if where is None else jnp.where(where, w, -jnp.inf)),
          "weights": w}


def _add_aux_ce(loss, metrics, aux_logits, labels, where):
  """IPWD's auxiliary head is trained by its own plain CE, added to the loss."""
  if aux_logits is None:
    return loss
  metrics["aux_ce"] = losses.weighted_mean(
      losses.cross_entropy(aux_logits, labels, where=where), where=where)
  return loss + metrics["aux_ce"]


def distillation_loss(cfg: LossConfig, logits: jax.Array, teacher_logits: jax.Array | None,
                      labels: jax.Array, *, epoch: jax.Array, aux_logits: jax.Array | None = None,
                      where: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Two-stage objective of a batch (also plain CE for base "ce"): (scalar loss, metrics).

      L = w_CE · mean CE(f_i, y_i) + w_KD · ramp(epoch) · base(f, f_t; w) [+ mean CE(g_i, y_i)]

  Args:
    cfg: the loss.
    logits: the student's main head `[B, C]` (deployed and evaluated).
    teacher_logits: the frozen teacher's `[B, C]` (unused for base "ce").
    labels: `[B]` int.
    epoch: the DKD warm-up's epoch, counted from 1 (fractional for a per-step ramp).
    aux_logits: IPWD's auxiliary CE head `[B, C]`, or None.
    where: `[B]` bool of real (non-padding) examples, or None.
  """
  if teacher_logits is not None:
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
  ce = losses.weighted_mean(
      losses.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing, where=where),
      where=where)
  metrics = {"ce": ce}
  loss = cfg.ce_weight * ce
  w = sample_weights(cfg, logits, teacher_logits, labels, aux_logits, where)
  if w is not None:
    metrics.update(_weight_metrics(w, where))
  if cfg.base == "kd":
    metrics["kd"] = losses.kd_loss(logits, teacher_logits, temperature=cfg.temperature,
                                   weights=w, where=where)
    loss = loss + cfg.kd_weight * metrics["kd"]
  elif cfg.base == "dkd":
    metrics["dkd"] = losses.dkd_loss(logits, teacher_logits, labels, alpha=cfg.dkd_alpha,
                                     beta=cfg.dkd_beta, temperature=cfg.temperature, weights=w,
                                     where=where)
    loss = loss + cfg.kd_weight * dkd_ramp(cfg, epoch) * metrics["dkd"]
  loss = _add_aux_ce(loss, metrics, aux_logits, labels, where)
  metrics["loss"] = loss
  return loss, metrics


def self_distillation_loss(cfg: LossConfig, logits: jax.Array, previous_probs: jax.Array,
                           labels: jax.Array, *, alpha: jax.Array, use_ipw: jax.Array,
                           aux_logits: jax.Array | None = None,
                           where: jax.Array | None = None
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One-stage PS-KD objective, optionally IPW-weighted (docs/METHODS.md#self-distillation).

    L = (1 − α_t) · mean CE(f_i, y_i) + α_t · mean w_i · CE(f_i, p_prev,i)   [+ mean CE(g_i, y_i)]

  PS-KD's target (1 − α_t)·onehot + α_t·p_prev, split so that the IPW weight w_i multiplies
  only the self-teacher part; w_i = 1 while `use_ipw` is false (before the start epoch) or
  without inverse-propensity weighting.

  Args:
    previous_probs: `[B, C]` the model's own softmax predictions for these examples from the
      previous epoch (one-hot labels before the first epoch has finished).
    alpha: α_t, a scalar.
    use_ipw: bool scalar; whether the IPW weights are on at this epoch.
  """
  previous_probs = jax.lax.stop_gradient(previous_probs)
  hard = losses.cross_entropy(logits, labels, where=where)
  soft = losses.cross_entropy(logits, previous_probs, where=where)
  metrics = {"ce": losses.weighted_mean(hard, where=where),
             "self_kd": losses.weighted_mean(soft, where=where)}
  w = None
  if cfg.needs_aux_head and aux_logits is not None:
    w = sample_weights(cfg, logits, None, labels, aux_logits, where)
    w = jnp.where(use_ipw, w, jnp.ones_like(w))
    metrics.update(_weight_metrics(w, where))
  loss = (1.0 - alpha) * metrics["ce"] + alpha * losses.weighted_mean(soft, w, where=where)
  loss = _add_aux_ce(loss, metrics, aux_logits, labels, where)
  metrics["loss"] = loss
  return loss, metrics


def objective(obj: Objective, logits: jax.Array, soft_targets: jax.Array | None,
              labels: jax.Array, *, step: jax.Array, steps_per_epoch: int, num_epochs: int,
              aux_logits: jax.Array | None = None, where: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of optimizer step `step` (counted from 0): (scalar loss, metrics).

  Args:
    obj: the run's objective.
    logits: the student's `[B, C]`.
    soft_targets: the teacher's logits `[B, C]` ("teacher"), the previous-epoch
      probabilities `[B, C]` ("self"), or None ("labels").
    labels: `[B]` int.
    step: int scalar, optimizer steps done before this one.
    steps_per_epoch, num_epochs: the run's length; epoch = step // steps_per_epoch + 1.
    aux_logits: IPWD's auxiliary head `[B, C]`, or None.
    where: `[B]` bool of real examples, or None.
  """
  epoch = step // steps_per_epoch + 1
  if obj.targets == "self":
    return self_distillation_loss(
        obj.loss, logits, soft_targets, labels,
        alpha=pskd_alpha(obj.pskd_alpha_final, epoch, num_epochs),
        use_ipw=epoch >= obj.ipw_start_epoch, aux_logits=aux_logits, where=where)
  ramp_epoch = (step + 1) / steps_per_epoch if obj.loss.dkd_warmup_per_step else epoch
  return distillation_loss(obj.loss, logits, soft_targets, labels, epoch=ramp_epoch,
                           aux_logits=aux_logits, where=where)
