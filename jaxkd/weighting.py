"""Per-example sample weights for reweighted knowledge distillation.

Each function returns weights w of the logits' leading shape `[...]`, with no gradient
(`stop_gradient`), to pass as `weights=` to `jaxkd.losses.kd_loss` / `dkd_loss` or to any
per-example divergence of your own through `jaxkd.losses.weighted_mean`. A weighting is
orthogonal to the base loss (docs/METHODS.md#composing-a-base-and-a-weighting): ER-KD = KD ×
`teacher_entropy_weights`, ER-DKD = DKD × the same, EA-KD = KD × `adaptive_entropy_weights`,
IPWD = KD × `inverse_propensity_weights`.

`normalize=None` keeps the weights as the papers define them; `normalize="mean"` divides them
by their (masked) batch mean, so that the loss keeps plain KD's scale.

A sibling of `jaxkd.losses`: both import only the private `jaxkd._logits`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxkd import _logits
from jaxkd._logits import Array

__all__ = [
    "NORMALIZE_OPTIONS",
    "ESTIMATORS",
    "ENTROPY_MODES",
    "entropy",
    "teacher_entropy_weights",
    "adaptive_entropy_weights",
    "standardize_logits",
    "inverse_propensity_weights",
]

NORMALIZE_OPTIONS = (None, "mean")
ESTIMATORS = ("likelihood_ratio", "loss_ratio")
ENTROPY_MODES = ("per_example", "batch_mean")


def _finish(w: jax.Array, normalize: str | None, where: Array | None,
            max_weight: float | None = None) -> jax.Array:
  """The one tail of every weighting: w / masked mean(w) if asked, then min(w, max_weight).

  The clip comes after the normalisation, so `max_weight` bounds the weights the loss sees.
  Weights never carry gradient.
  """
  if normalize == "mean":
    w = w / _logits.masked_mean(w, where)
  if max_weight is not None:
    w = jnp.minimum(w, max_weight)
  return jax.lax.stop_gradient(w)


def _logits_and_mask(logits: Array, where: Array | None, name: str) -> jax.Array:
  """Logits without gradient, excluded rows zeroed; still in their own dtype.

  The upcast to float32 happens inside each sweep (`_logits.sum_exp` etc.): a float32 copy of
  bfloat16 logits, shared by several sweeps, would be written to memory.
  """
  _logits.check_class_axis(logits, name)
  _logits.check_leading(where, jnp.shape(logits)[:-1], "where")
  return _logits.mask_rows(jax.lax.stop_gradient(jnp.asarray(logits)), where)


def entropy(logits: Array, *, temperature: float = 1.0) -> jax.Array:
  """Per-example Shannon entropy (natural log) of softmax(z/τ).

    H_i = −Σ_c p_ic log p_ic = log Z_i − Σ_c e_ic u_ic / Z_i,
    u = z/τ − max(z/τ),  e = exp(u),  Z = Σ_c e_c

  computed without the log of a softmax, in two sweeps of the raw logits (Z and Σ e·u, each
  its own reduction, nothing of shape `[..., C]` written); 0·log 0 = 0. The ER-KD reference
  clamps p at 1e-10 inside the log, which differs from this by less than C · 1e-10 · 23.

  Args:
    logits: `[..., C]`.
    temperature: τ > 0.

  Returns:
    `[...]` float32 in [0, ln C].
  """
  _logits.check_class_axis(logits, "logits")
  _logits.check_positive(temperature, "temperature")
  z = jnp.asarray(logits)
  m = _logits.raw_row_max(z)
  temperature = jnp.asarray(temperature, m.dtype)
  total = _logits.sum_exp(z, m, temperature)
  return jnp.log(total) - _logits.exp_moment(z, m, temperature) / total


def teacher_entropy_weights(teacher_logits: Array, *, temperature: float = 4.0,
                            normalize: str | None = None, where: Array | None = None,
                            mode: str = "per_example") -> jax.Array:
  """ER-KD weights: the teacher's softened entropy (docs/METHODS.md#er-kd).

    w_i = H(softmax(z^t_i / τ′)),  τ′ = 4 by default, independent of the KD temperature

  Not normalised and not clipped unless asked, as in the reference code (range [0, ln C]).

  Args:
    teacher_logits: `[..., C]`.
    temperature: τ′ > 0, the entropy temperature.
    normalize: None or "mean".
    where: boolean `[...]` of kept examples (for the batch mean), or None.
    mode: "per_example" (the paper's intent), or "batch_mean": every example gets the batch
      mean entropy, which reproduces the reference ER-DKD code, where a `[B]` loss times a
      `[B, 1]` entropy broadcasts to `[B, B]` and its mean is mean(H) · mean(L)
      (docs/METHODS.md#er-kd). Use it only for bit-faithful comparisons.

  Returns:
    `[...]` float32, no gradient.

  References:
    Su et al., `Knowledge From the Dark Side: Entropy-Reweighted Knowledge Distillation for
    Balanced Knowledge Transfer <https://arxiv.org/abs/2311.13621v1>`_, arXiv 2311.13621 v1,
    2023, §3
  """
  _logits.check_option(normalize, NORMALIZE_OPTIONS, "normalize")
  _logits.check_option(mode, ENTROPY_MODES, "mode")
  z = _logits_and_mask(teacher_logits, where, "teacher_logits")
  w = entropy(z, temperature=temperature)
  if mode == "batch_mean":
    w = jnp.broadcast_to(_logits.masked_mean(w, where), w.shape)
  return _finish(w, normalize, where)


def adaptive_entropy_weights(teacher_logits: Array, student_logits: Array, *,
                             temperature: float = 3.0,
                             entropy_upper_bound: float | None = None,
                             normalize: str | None = None,
                             where: Array | None = None) -> jax.Array:
  """EA-KD weights from teacher and student entropies (docs/METHODS.md#ea-kd).

    w_i = ½ · H^t_i(t) · (1 + H^s_i(t) / H_ub),  t = 3, student logits detached

  Args:
    teacher_logits, student_logits: `[..., C]`, same shape.
    temperature: t > 0, the entropy temperature (3 on CIFAR, 2 in the ImageNet configs).
    entropy_upper_bound: H_ub > 0; None means ln C, the true maximum. The reference CIFAR
      KD/DKD code uses the literal 100.
    normalize: None or "mean".
    where: boolean `[...]` or None.

  Returns:
    `[...]` float32, no gradient.

  References:
    Su et al., `EA-KD: Entropy-based Adaptive Knowledge Distillation
    <https://arxiv.org/abs/2311.13621>`_, arXiv 2311.13621 v2/v3, ICCV 2025
  """
  _logits.check_logits_pair(teacher_logits, student_logits, "teacher_logits", "student_logits")
  _logits.check_option(normalize, NORMALIZE_OPTIONS, "normalize")
  num_classes = jnp.shape(teacher_logits)[-1]
  h_ub = math.log(num_classes) if entropy_upper_bound is None else entropy_upper_bound
  if num_classes < 2 and entropy_upper_bound is None:
    raise ValueError("adaptive_entropy_weights needs C ≥ 2 classes for the default H_ub = ln C.")
  _logits.check_positive(h_ub, "entropy_upper_bound")
  zt = _logits_and_mask(teacher_logits, where, "teacher_logits")
  zs = _logits_and_mask(student_logits, where, "student_logits")
  h_t = entropy(zt, temperature=temperature)
  h_s = entropy(zs, temperature=temperature)
  return _finish(0.5 * h_t * (1.0 + h_s / h_ub), normalize, where)


def _centered_scale(z: jax.Array, eps: float, m: jax.Array | None = None) -> jax.Array:
  """std_c(z) + eps per row (unbiased), `[..., 1]`, from sweeps of Σd and Σd².

  d = z − m: shifting by a value of the row (the row maximum, or the label's logit; `[..., 1]`)
  keeps the one-pass variance Σd²/(C−1) − (Σd)²/(C(C−1)) well conditioned in float32.
  """
  c = z.shape[-1]
  m = _logits.raw_row_max(z) if m is None else m
  s1 = _logits.row_sum(z, m, 1)[..., None]
  s2 = _logits.row_sum(z, m, 2)[..., None]
  var = jnp.maximum(s2 - s1 * s1 / c, 0.0) / max(c - 1, 1)
  return jnp.sqrt(var) + eps


def standardize_logits(logits: Array, *, eps: float = 1e-7) -> jax.Array:
  """Per-example z-score over the class axis: (z − mean_c z) / (std_c z + eps).

  The unbiased standard deviation, as in logit standardisation, which is also what the EA-KD
  code uses. `[..., C]` -> `[..., C]` float32.

  References:
    Sun et al., `Logit Standardization in Knowledge Distillation
    <https://arxiv.org/abs/2403.01427>`_, CVPR 2024
  """
  z = _logits.as_float32(logits)
  return (z - jnp.mean(z, axis=-1, keepdims=True)) / _centered_scale(logits, eps)


# Up to this many classes, z-scores of one row differ by at most sqrt(2(C − 1)) ≤ 64: for the
# unbiased standard deviation σ of C values, max − min ≤ σ · sqrt(2(C − 1)) (equality with one
# value at each end and the rest midway), so Σ_c exp of z-score differences stays finite.
_LABEL_SHIFT_MAX_CLASSES = 2048


def _standardized_log_likelihood(logits: jax.Array, labels: jax.Array,
                                 standardize: bool) -> jax.Array:
  """log softmax(std(z))_y per example (or of z itself without standardisation).

  The mean cancels inside a softmax, and so does any shift k: with s = std + eps,
    log softmax(std(z))_y = (z_y − k)/s − log Σ_c exp((z_c − k)/s).
  For standardised logits of at most `_LABEL_SHIFT_MAX_CLASSES` classes, k = z_y (the label's
  own logit, a gather of `[...]` values): every exponent is at most 64, and the variance sums
  shift by z_y too, so no row maximum is needed, one sweep of the logits fewer. Otherwise k
  is the row max (the exponents of raw logits, or of many classes, are unbounded).
  """
  z_y = _logits.as_float32(_logits.take_label(logits, labels))
  if standardize and logits.shape[-1] <= _LABEL_SHIFT_MAX_CLASSES:
    k = z_y[..., None]
    scale = _centered_scale(logits, 1e-7, k)
    return -jnp.log(_logits.sum_exp(logits, k, scale, ceiling=80.0))
  m = _logits.raw_row_max(logits)
  scale = _centered_scale(logits, 1e-7, m) if standardize else jnp.ones((), m.dtype)
  lse = jnp.log(_logits.sum_exp(logits, m, scale))
  return ((z_y - m[..., 0]) / scale[..., 0] if standardize else z_y - m[..., 0]) - lse


def inverse_propensity_weights(kd_logits: Array, ce_logits: Array, labels: Array, *,
                               estimator: str = "likelihood_ratio", standardize: bool = True,
                               normalize: str | None = None, max_weight: float | None = None,
                               where: Array | None = None) -> jax.Array:
  """IPWD weights, 1 / P(machine domain | x, y) (docs/METHODS.md#ipwd).

  A reconstruction: no official code exists and the paper's method section could not be read;
  docs/METHODS.md#the-ipwd-reconstruction gives the evidence for and against each reading. The
  student carries two heads on shared features: the main head f, trained with CE + KD (its
  likelihood of the label stands for the machine domain, the teacher's knowledge), and an
  auxiliary head g trained with CE only (the human domain). With z-scored logits at τ = 1,
  q_kd = softmax(std(f))_y and q_ce = softmax(std(g))_y:

    "likelihood_ratio" (default): P(machine | x, y) = q_kd / (q_kd + q_ce),
                                  w = 1 / P = 1 + q_ce / q_kd
    "loss_ratio":                 w = 1 + CE_ce / CE_kd = 1 + log q_ce / log q_kd
                                  (the literal reading of the only detailed secondary source)

  Examples the teacher's knowledge under-represents (the KD head fits them worse than the CE
  head does) get larger weights; both estimators give w ≥ 1.

  Args:
    kd_logits: the main (KD-trained) head's logits `[..., C]`.
    ce_logits: the auxiliary (CE-only) head's logits `[..., C]`.
    labels: integer `[...]`.
    estimator: "likelihood_ratio" or "loss_ratio".
    standardize: z-score each head's logits over classes first (the ablation of the paper
      calls this crucial).
    normalize: None or "mean" (divide by the masked batch mean, applied before `max_weight`).
    max_weight: if given, weights are clipped to at most this value (after `normalize`).
    where: boolean `[...]` or None.

  Returns:
    `[...]` float32, no gradient.

  References:
    Niu et al., `Respecting Transfer Gap in Knowledge Distillation
    <https://proceedings.neurips.cc/paper_files/paper/2022/hash/89b0e466b46292ce0bfe53618aadd3de-Abstract-Conference.html>`_,
    NeurIPS 2022
  """
  _logits.check_logits_pair(kd_logits, ce_logits, "kd_logits", "ce_logits")
  _logits.check_labels(labels, kd_logits)
  _logits.check_option(estimator, ESTIMATORS, "estimator")
  _logits.check_option(normalize, NORMALIZE_OPTIONS, "normalize")
  if max_weight is not None:
    _logits.check_positive(max_weight, "max_weight")
  f = _logits_and_mask(kd_logits, where, "kd_logits")
  g = _logits_and_mask(ce_logits, where, "ce_logits")
  labels = _logits.mask_labels(labels, where)
  log_q_kd = _standardized_log_likelihood(f, labels, standardize)
  log_q_ce = _standardized_log_likelihood(g, labels, standardize)
  if estimator == "likelihood_ratio":
    w = 1.0 + jnp.exp(log_q_ce - log_q_kd)
  else:
    # CE_kd = −log q_kd can reach 0 for a perfectly fitted example; the floor keeps w finite.
    w = 1.0 + (-log_q_ce) / jnp.maximum(-log_q_kd, 1e-12)
  return _finish(w, normalize, where, max_weight)
