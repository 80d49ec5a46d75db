"""Per-example distillation divergences and their reductions.

Pure functions of logits, safe under `jit`, `vmap`, `grad` and sharding. Every per-example
function reduces over the last (class) axis only and keeps every leading axis, so `[B, C]`
classifier logits and `[B, L, V]` token logits work alike. Math runs in float32 whatever the
input dtype (bfloat16 in, float32 out). Reductions take `where=`, a boolean mask over the
leading axes; excluded rows may hold anything (padding, ±inf) without reaching the result or
its gradient.

This module imports nothing else of jaxkd: copy it into your own code if you like.

Notation (METHODS.md Part I): z logits, τ temperature, p(τ) = softmax(z/τ),
KL_i(τ) = Σ_c p^t_ic (log p^t_ic − log p^s_ic) with 0·log 0 = 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = Any  # jax.Array or anything jnp.asarray accepts.


# --------------------------------------------------------------------------------------------
# Input checks. They run on shapes and Python scalars only, so they fire at trace time, before
# any computation, and cost nothing inside a compiled step.


def as_float32(x: Array) -> jax.Array:
  """Promotes to at least float32 (bf16/f16 in -> f32 math; f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_positive(value: Any, name: str) -> None:
  """Raises ValueError if a concrete scalar `value` is not a finite positive number.

  Traced values (e.g. a learnable temperature) cannot be checked at trace time and pass.
  """
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a positive number, got {value!r}.") from e
  if not v > 0 or v == float("inf"):
    raise ValueError(f"{name} must be a finite positive number, got {value!r}.")


def check_logits_pair(a: Array, b: Array, name_a: str, name_b: str) -> None:
  """Two logits arrays must have the same shape with at least one (class) axis."""
  if jnp.ndim(a) < 1 or jnp.shape(a)[-1] < 1:
    raise ValueError(f"{name_a} must have a class axis (last axis), got shape {jnp.shape(a)}.")
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and "
        f"{jnp.shape(b)}.")


def check_labels(labels: Array, logits: Array, name: str = "labels") -> None:
  """Integer labels of shape `logits.shape[:-1]`."""
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(
        f"{name} must have shape {jnp.shape(logits)[:-1]} (the logits' leading axes), got "
        f"{jnp.shape(labels)}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{name} must be integer class indices, got dtype {jnp.result_type(labels)}.")


def check_leading(x: Array | None, leading_shape: tuple[int, ...], name: str) -> None:
  """`x` (a per-example array such as weights or a where-mask) matches the leading shape."""
  if x is not None and jnp.shape(x) != tuple(leading_shape):
    raise ValueError(
        f"{name} must have shape {tuple(leading_shape)} (the per-example shape), got "
        f"{jnp.shape(x)}.")


def mask_rows(logits: Array, where: Array | None) -> jax.Array:
  """Replaces the logits of rows that `where` excludes by zeros.

  Excluded rows may hold ±inf or NaN (padding tokens, dropped examples). Multiplying their loss
  by zero would still give NaN (0·inf) and NaN gradients, so they are replaced before any math
  (the "double where" rule for safe gradients).
  """
  if where is None:
    return logits
  return jnp.where(jnp.asarray(where, bool)[..., None], logits, jnp.zeros((), logits.dtype))


# --------------------------------------------------------------------------------------------
# Building blocks.


def row_max(z: jax.Array) -> jax.Array:
  """max over the last axis, keepdims, as a constant for autodiff; 0 for all −inf rows.

  Every log-sum-exp here is written lse(z) = log Σ exp(z − m) + m with this m; the identity
  holds for any m, so m carries no gradient (on both sides of it).
  """
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  return jnp.where(jnp.isfinite(m), m, 0.0)


def scaled_shift(z: jax.Array, temperature: Any = 1.0) -> jax.Array:
  """u = (z − max z) / τ: the logits at temperature τ shifted to a row maximum of 0.

  max(z/τ) = max(z)/τ for τ > 0, so one maximum of the raw logits serves every temperature
  and every function of the same logits (XLA computes it once): KD at τ = 4, ER-KD's entropy
  at τ′ = 4, EA-KD's at t = 3 share a single sweep.
  """
  return (z - row_max(z)) / temperature


def shifted_logsumexp(z: jax.Array, temperature: Any = 1.0) -> tuple[jax.Array, jax.Array]:
  """Returns (u, lse) with u = scaled_shift(z, τ) and lse = log Σ exp(u), both float32.

  log softmax(z/τ) = u − lse, elementwise and without cancellation against the max.
  """
  u = scaled_shift(z, temperature)
  return u, jnp.log(jnp.sum(jnp.exp(u), axis=-1))


def expectation(p: jax.Array, v: jax.Array) -> jax.Array:
  """Σ_c p_c · v_c over the last axis, with the convention 0 · (±inf) = 0."""
  return jnp.sum(jnp.where(p > 0, p * v, 0.0), axis=-1)


def softmax_moments(u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For shifted logits u (max 0): Z = Σ exp(u) and Σ exp(u)·u, from ONE exp per element.

  Both sums read the same exp(u), so XLA computes them in a single sweep over memory; the
  entropy of softmax(u) is log Z − (Σ e·u)/Z without a second pass to form p = e/Z first.
  """
  e = jnp.exp(u)
  return jnp.sum(e, axis=-1), expectation(e, u)


@jax.custom_vjp
def _kl_shifted(us: jax.Array, ut: jax.Array) -> jax.Array:
  """KL(softmax(ut) ‖ softmax(us)) per row, for scaled logits already shifted to max 0.

  With e = exp(u) and Z = Σ e (row sums):
    KL = Σ_c e^t_c (u^t_c − u^s_c) / Z^t + log Z^s − log Z^t,
  one sweep that accumulates Z^s, Z^t and the cross term together. The gradient is written
  in closed form (`_kl_shifted_bwd`): one more sweep, instead of autodiff's replay of the
  log-softmax on both sides.
  """
  return _kl_shifted_fwd(us, ut)[0]


def _kl_shifted_fwd(us, ut):
  es, et = jnp.exp(us), jnp.exp(ut)
  zs, zt = jnp.sum(es, axis=-1), jnp.sum(et, axis=-1)
  kl = expectation(et, ut - us) / zt + jnp.log(zs) - jnp.log(zt)
  return kl, (us, ut, zs, zt, kl)


def _kl_shifted_bwd(res, g):
  # dKL/dus_c = p^s_c − p^t_c ;  dKL/dut_c = p^t_c (log p^t_c − log p^s_c − KL).
  us, ut, zs, zt, kl = res
  log_ps = us - jnp.log(zs)[..., None]
  log_pt = ut - jnp.log(zt)[..., None]
  ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
  g = g[..., None]
  d_us = g * (ps - pt)
  d_ut = jnp.where(pt > 0, g * pt * (log_pt - log_ps - kl[..., None]), 0.0)
  return d_us, d_ut


_kl_shifted.defvjp(_kl_shifted_fwd, _kl_shifted_bwd)


# --------------------------------------------------------------------------------------------
# Per-example losses.


def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, natural log.

  CE_i = −Σ_c q_ic log softmax(z_i)_c with q = (1 − ε)·onehot(y) + ε/C (ε = label_smoothing).

  Args:
    logits: `[..., C]`.
    labels: integer class indices `[...]` (the logits' leading shape), or a probability
      vector per example `[..., C]` (soft targets, e.g. PS-KD's; `label_smoothing` then must
      be 0).
    label_smoothing: ε in [0, 1).

  Returns:
    `[...]` float32.
  """
  logits = as_float32(logits)
  if not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
  u, lse = shifted_logsumexp(logits)
  if jnp.shape(labels) == jnp.shape(logits) and jnp.issubdtype(
      jnp.result_type(labels), jnp.floating):
    if label_smoothing:
      raise ValueError("label_smoothing must be 0 with soft (probability) labels.")
    q = as_float32(labels)
    return jnp.sum(q, axis=-1) * lse - expectation(q, u)
  check_labels(labels, logits)
  u_y = jnp.take_along_axis(u, jnp.asarray(labels)[..., None], axis=-1)[..., 0]
  ce = lse - u_y
  if label_smoothing:
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - jnp.mean(u, axis=-1))
  return ce


def kl_divergence(student_logits: Array, teacher_logits: Array, *,
                  temperature: float = 1.0) -> jax.Array:
  """Per-example KL(p^t(τ) ‖ p^s(τ)), Hinton et al. 2015; METHODS Part I §1.

  KL_i = Σ_c p^t_ic (log p^t_ic − log p^s_ic), p(τ) = softmax(z/τ), computed from log-softmax
  on both sides (never the log of a softmax), 0·log 0 = 0. Not multiplied by τ².

  Args:
    student_logits: `[..., C]`.
    teacher_logits: `[..., C]`, same shape. Differentiable too (for mutual learning); wrap it
      in `jax.lax.stop_gradient` for a frozen teacher.
    temperature: τ > 0 (may be traced, e.g. a learnable temperature).

  Returns:
    `[...]` float32, ≥ 0.
  """
  check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  check_positive(temperature, "temperature")
  us = scaled_shift(as_float32(student_logits), temperature)
  ut = scaled_shift(as_float32(teacher_logits), temperature)
  return _kl_shifted(us, ut)


def _target_split(u: jax.Array, lse: jax.Array, onehot: jax.Array):
  """For shifted logits u: (log p_y, log Σ_{c≠y} p_c, lse of the non-target classes)."""
  log_p_target = jnp.sum(jnp.where(onehot, u, 0.0), axis=-1) - lse
  masked = jnp.where(onehot, -jnp.inf, u)
  m = row_max(masked)
  lse_other = jnp.log(jnp.sum(jnp.exp(masked - m), axis=-1)) + m[..., 0]
  return log_p_target, lse_other - lse, lse_other


def dkd_divergence(student_logits: Array, teacher_logits: Array, labels: Array, *,
                   alpha: float = 1.0, beta: float = 8.0,
                   temperature: float = 4.0) -> jax.Array:
  """Per-example decoupled KD, α·TCKD_i + β·NCKD_i (Zhao et al., CVPR 2022, Eq. 7).

  With p = softmax(z/τ) and y the label:
    TCKD_i = τ² · KL(b^t ‖ b^s), b = (p_y, 1 − p_y)                  (target vs rest)
    NCKD_i = τ² · KL(p̂^t ‖ p̂^s), p̂ = softmax over the classes c ≠ y (non-target)
  Both are computed in log space: log(1 − p_y) = lse_{c≠y}(z/τ) − lse(z/τ). The target class is
  removed exactly (mdistiller subtracts 1000 from its scaled logit, which agrees unless the
  logits span more than ~1000τ). The warm-up factor min(epoch/20, 1) and the batch mean belong
  to the training objective, not here.

  Args:
    student_logits, teacher_logits: `[..., C]`, C ≥ 2.
    labels: integer `[...]`.
    alpha, beta: weights of TCKD and NCKD.
    temperature: τ > 0.

  Returns:
    `[...]` float32.
  """
  check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  if jnp.shape(student_logits)[-1] < 2:
    raise ValueError("dkd_divergence needs at least 2 classes.")
  check_labels(labels, student_logits)
  check_positive(temperature, "temperature")
  onehot = jax.nn.one_hot(labels, jnp.shape(student_logits)[-1], dtype=bool)
  us, lse_s = shifted_logsumexp(as_float32(student_logits), temperature)
  ut, lse_t = shifted_logsumexp(as_float32(teacher_logits), temperature)
  ly_s, lo_s, lse_other_s = _target_split(us, lse_s, onehot)
  ly_t, lo_t, lse_other_t = _target_split(ut, lse_t, onehot)
  py_t, po_t = jnp.exp(ly_t), jnp.exp(lo_t)
  tckd = (jnp.where(py_t > 0, py_t * (ly_t - ly_s), 0.0)
          + jnp.where(po_t > 0, po_t * (lo_t - lo_s), 0.0))
  # Non-target distribution: log p̂_c = u_c − lse_other, so the KL is
  # Σ_{c≠y} p̂^t_c (u^t_c − u^s_c) + lse_other^s − lse_other^t.
  p_hat_t = jnp.where(onehot, 0.0, jnp.exp(ut - lse_other_t[..., None]))
  nckd = expectation(p_hat_t, ut - us) + lse_other_s - lse_other_t
  return temperature**2 * (alpha * tckd + beta * nckd)


# --------------------------------------------------------------------------------------------
# Reductions.


def weighted_mean(values: Array, weights: Array | None = None, *,
                  where: Array | None = None) -> jax.Array:
  """The papers' sample-weighted batch mean, (1/N) Σ_i w_i L_i over the kept examples.

    weighted_mean = Σ_i where_i · w_i · L_i / Σ_i where_i

  N counts the examples `where` keeps (all of them without `where`); it is NOT Σ w (ER-KD,
  EA-KD and IPWD all divide by the batch size). Excluded entries never reach the result, even
  if they hold NaN or inf. With nothing kept the result is 0.

  Args:
    values: per-example losses `[...]`.
    weights: `[...]` or None (all ones).
    where: boolean `[...]` or None (keep all).

  Returns:
    float32 scalar.
  """
  values = as_float32(values)
  check_leading(weights, values.shape, "weights")
  check_leading(where, values.shape, "where")
  if weights is not None:
    values = values * as_float32(weights)
  if where is None:
    return jnp.mean(values)
  where = jnp.asarray(where, bool)
  total = jnp.sum(jnp.where(where, values, 0.0))
  return total / jnp.maximum(jnp.sum(where), 1).astype(values.dtype)


def kd_loss(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0,
            weights: Array | None = None, where: Array | None = None) -> jax.Array:
  """Sample-weighted Hinton KD loss, τ² · (1/N) Σ_i w_i · KL_i(τ).

  Plain KD (Hinton et al. 2015) with `weights=None`; ER-KD, EA-KD and IPWD with the weights of
  `jaxkd.weighting` (ER-KD: arXiv 2311.13621 v1 §3; IPWD: Niu et al., NeurIPS 2022). The
  gradient with respect to the student logits is w_i · τ · (p^s_i − p^t_i) / N.

  Args:
    student_logits, teacher_logits: `[..., C]`.
    temperature: τ > 0.
    weights: per-example weights `[...]` (treated as constants) or None.
    where: boolean `[...]` of the examples to keep, or None.

  Returns:
    float32 scalar.
  """
  check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  check_leading(where, jnp.shape(student_logits)[:-1], "where")
  kl = kl_divergence(mask_rows(student_logits, where), mask_rows(teacher_logits, where),
                     temperature=temperature)
  if weights is not None:
    weights = jax.lax.stop_gradient(weights)
  return temperature**2 * weighted_mean(kl, weights, where=where)


def dkd_loss(student_logits: Array, teacher_logits: Array, labels: Array, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             weights: Array | None = None, where: Array | None = None) -> jax.Array:
  """Sample-weighted DKD loss, (1/N) Σ_i w_i (α·TCKD_i + β·NCKD_i) (τ² inside, as DKD has it).

  ER-DKD with `weights=teacher_entropy_weights(...)`. Arguments as `dkd_divergence` and
  `weighted_mean`.
  """
  check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  check_labels(labels, student_logits)
  check_leading(where, jnp.shape(student_logits)[:-1], "where")
  if where is not None:  # Excluded rows may carry any label (padding); keep the gather in range.
    labels = jnp.where(jnp.asarray(where, bool), labels, 0)
  per_example = dkd_divergence(mask_rows(student_logits, where), mask_rows(teacher_logits, where),
                               labels, alpha=alpha, beta=beta, temperature=temperature)
  if weights is not None:
    weights = jax.lax.stop_gradient(weights)
  return weighted_mean(per_example, weights, where=where)
