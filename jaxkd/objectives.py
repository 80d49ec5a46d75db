"""The training objective built from a config: base loss × sample weighting + cross-entropy.

    L = w_CE · CE(f, y) + w_KD · ramp(epoch) · base(f, teacher; weights)  [+ CE(g, y) for IPWD]

base ∈ {"ce" (none), "kd", "dkd"}, weighting ∈ {"none", "entropy", "adaptive_entropy",
"inverse_propensity"}; any weighting composes with any base (METHODS Part I §3). The named
methods are presets of these fields (`METHODS`). For one-stage self-distillation (PS-KD,
METHODS Part I §6) the "teacher" is the model's own previous-epoch prediction.

Every function here is pure and traced inside the jitted train step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses, weighting

BASES = ("ce", "kd", "dkd")
WEIGHTINGS = ("none", "entropy", "adaptive_entropy", "inverse_propensity")

# Named methods: (base loss, weighting). Their numeric defaults come from the configs.
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
  """Every number of the objective. Defaults: the CIFAR-100 KD recipe (METHODS Part I §1)."""
  base: str = "kd"
  weighting: str = "none"
  ce_weight: float = 0.1
  kd_weight: float = 0.9
  temperature: float = 4.0
  # DKD (Zhao et al. 2022): per-pair beta, warm-up min(epoch / warmup, 1), epochs from 1.
  dkd_alpha: float = 1.0
  dkd_beta: float = 8.0
  dkd_warmup_epochs: float = 20.0
  # False: mdistiller's staircase min(epoch / warmup, 1) with whole epochs counted from 1.
  # True: a linear ramp per step, for runs of a few epochs (the quickstart).
  dkd_warmup_per_step: bool = False
  # ER-KD: entropy temperature tau' (4, independent of tau); "batch_mean" = reference ER-DKD.
  entropy_temperature: float = 4.0
  entropy_mode: str = "per_example"
  # EA-KD: entropy temperature t and H_ub (None = ln C).
  adaptive_temperature: float = 3.0
  entropy_upper_bound: float | None = None
  # IPWD (reconstruction, METHODS Part II §4.3).
  ipw_estimator: str = "likelihood_ratio"
  ipw_standardize: bool = True
  ipw_max_weight: float | None = None
  # The auxiliary CE head's gradient into the backbone is stopped by default.
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


def sample_weights(cfg: LossConfig, logits: jax.Array, teacher_logits: jax.Array,
                   labels: jax.Array, aux_logits: jax.Array | None,
                   where: jax.Array | None = None) -> jax.Array | None:
  """The per-example weights of `cfg.weighting` (None for "none"); no gradient."""
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
  """DKD's warm-up factor min(epoch / warmup, 1) (Zhao et al. 2022, as mdistiller applies it).

  `epoch` counts from 1: a whole number for the staircase, or the fractional epoch
  (steps done / steps per epoch) when `dkd_warmup_per_step`; the caller passes the right one.
  """
  if cfg.base != "dkd" or cfg.dkd_warmup_epochs == 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / cfg.dkd_warmup_epochs, 1.0)


def distillation_loss(cfg: LossConfig, logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array, *, epoch: jax.Array, aux_logits: jax.Array | None = None,
                      where: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Two-stage objective for a batch: returns (scalar loss, metrics).

  Args:
    cfg: the objective.
    logits: the student's main head `[B, C]` (deployed and evaluated).
    teacher_logits: the frozen teacher's `[B, C]` (ignored for base "ce").
    labels: `[B]` int.
    epoch: the current epoch counted from 1 (DKD warm-up).
    aux_logits: IPWD's auxiliary CE head `[B, C]`, or None.
    where: `[B]` bool of real (non-padding) examples, or None.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  ce = losses.weighted_mean(
      losses.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing), where=where)
  metrics = {"ce": ce}
  loss = cfg.ce_weight * ce
  w = sample_weights(cfg, logits, teacher_logits, labels, aux_logits, where)
  if w is not None:
    metrics["weight_mean"] = losses.weighted_mean(w, where=where)
    metrics["weight_max"] = jnp.max(jnp.where(where, w, -jnp.inf) if where is not None else w)
  if cfg.base == "kd":
    kd = losses.kd_loss(logits, teacher_logits, temperature=cfg.temperature, weights=w,
                        where=where)
    metrics["kd"] = kd
    loss = loss + cfg.kd_weight * kd
  elif cfg.base == "dkd":
    dkd = losses.dkd_loss(logits, teacher_logits, labels, alpha=cfg.dkd_alpha, beta=cfg.dkd_beta,
                          temperature=cfg.temperature, weights=w, where=where)
    metrics["dkd"] = dkd
    loss = loss + cfg.kd_weight * dkd_ramp(cfg, epoch) * dkd
  if aux_logits is not None:
    aux_ce = losses.weighted_mean(losses.cross_entropy(aux_logits, labels), where=where)
    metrics["aux_ce"] = aux_ce
    loss = loss + aux_ce
  metrics["loss"] = loss
  return loss, metrics


def pskd_alpha(alpha_final: float, epoch: jax.Array, num_epochs: int) -> jax.Array:
  """PS-KD's α_t = α_T · epoch / epochs (Kim et al., ICCV 2021), epoch counted from 1."""
  return alpha_final * jnp.asarray(epoch, jnp.float32) / num_epochs


def self_distillation_loss(cfg: LossConfig, logits: jax.Array, previous_probs: jax.Array,
                           labels: jax.Array, *, alpha: jax.Array, use_ipw: jax.Array,
                           aux_logits: jax.Array | None = None,
                           where: jax.Array | None = None
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One-stage PS-KD objective, optionally with IPW on the soft part (METHODS Part I §6).

    L_i = (1 − α_t) · CE(f_i, y_i) + α_t · w_i · CE(f_i, p_prev,i)   [+ CE(g_i, y_i)]

  The target (1 − α_t)·onehot + α_t·p_prev of PS-KD, split so that the IPW weight w_i
  multiplies only the self-teacher part; w_i = 1 while `use_ipw` is false (before the start
  epoch) or without an auxiliary head.

  Args:
    previous_probs: `[B, C]` the model's own softmax predictions for these examples from the
      previous epoch (one-hot labels before the first epoch has finished).
    alpha: α_t, a scalar.
    use_ipw: bool scalar; whether the IPW weights are on at this epoch.
  """
  previous_probs = jax.lax.stop_gradient(previous_probs)
  hard = losses.cross_entropy(logits, labels)
  soft = losses.cross_entropy(logits, previous_probs)
  metrics = {"ce": losses.weighted_mean(hard, where=where),
             "self_kd": losses.weighted_mean(soft, where=where)}
  w = None
  if aux_logits is not None and cfg.weighting == "inverse_propensity":
    w = weighting.inverse_propensity_weights(
        logits, aux_logits, labels, estimator=cfg.ipw_estimator,
        standardize=cfg.ipw_standardize, normalize=cfg.normalize,
        max_weight=cfg.ipw_max_weight, where=where)
    w = jnp.where(use_ipw, w, jnp.ones_like(w))
    metrics["weight_mean"] = losses.weighted_mean(w, where=where)
  loss = ((1.0 - alpha) * metrics["ce"]
          + alpha * losses.weighted_mean(soft, w, where=where))
  if aux_logits is not None:
    metrics["aux_ce"] = losses.weighted_mean(losses.cross_entropy(aux_logits, labels), where=where)
    loss = loss + metrics["aux_ce"]
  metrics["loss"] = loss
  return loss, metrics

