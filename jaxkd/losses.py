"""Per-example distillation divergences and their reductions.

Pure functions of logits, safe under `jit`, `vmap`, `grad` and sharding. Every per-example
function reduces over the last (class) axis only and keeps every leading axis, so `[B, C]`
classifier logits and `[B, L, V]` token logits work alike. Math runs in float32 whatever the
input dtype (bfloat16 in, float32 out). Reductions take `where=`, a boolean mask over the
leading axes; excluded rows may hold anything (padding, ±inf) without reaching the result or
its gradient (docs/DESIGN.md#numerics-of-the-loss-layer).

This module imports only the private `jaxkd._logits`: copy the two files into your own code
if you like.

Notation (docs/METHODS.md#notation): z logits, τ temperature, p(τ) = softmax(z/τ),
KL_i(τ) = Σ_c p^t_ic (log p^t_ic − log p^s_ic) with 0·log 0 = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _logits
from jaxkd._logits import Array

__all__ = [
    "cross_entropy",
    "kl_divergence",
    "dkd_divergence",
    "weighted_mean",
    "kd_loss",
    "dkd_loss",
]


# --------------------------------------------------------------------------------------------
# The KL sweeps with a closed-form gradient.


@jax.custom_vjp
def _kl_rows(zs: jax.Array, zt: jax.Array, ms: jax.Array, mt: jax.Array,
             temperature: jax.Array) -> jax.Array:
  """KL(softmax(u^t) ‖ softmax(u^s)) per row, u = (z − m)/τ with m the `[..., 1]` row max.

  With e = exp(u) and Z = Σ e (row sums):
    KL = Σ_c e^t_c (u^t_c − u^s_c) / Z^t + log Z^s − log Z^t,
  three isolated sweeps of the raw logits (Z^s, Z^t, the cross term; `_logits.sum_exp`,
  `_logits.kl_cross`) that write nothing of shape `[..., C]`. The gradient is written in
  closed form (`_kl_rows_bwd`): one more sweep that recomputes both softmaxes from the raw
  logits, instead of autodiff's replay of the log-softmax on both sides. The row maxima carry
  no gradient (KL does not depend on them); τ gets its own.
  """
  return _kl_rows_fwd(zs, zt, ms, mt, temperature)[0]


def _kl_rows_fwd(zs, zt, ms, mt, temperature):
  sum_s = _logits.sum_exp(zs, ms, temperature)
  sum_t = _logits.sum_exp(zt, mt, temperature)
  cross = _logits.kl_cross(zs, zt, ms, mt, temperature)
  kl = cross / sum_t + jnp.log(sum_s) - jnp.log(sum_t)
  return kl, (zs, zt, ms, mt, temperature, sum_s, sum_t, kl)


def _kl_rows_bwd(res, g):
  # dKL/dus_c = p^s_c − p^t_c ;  dKL/dut_c = p^t_c (log p^t_c − log p^s_c − KL) ;
  # du/dz = 1/τ ;  du/dτ = −u/τ.
  zs, zt, ms, mt, temperature, sum_s, sum_t, kl = res
  us = (_logits.as_float32(zs) - ms) / temperature
  ut = (_logits.as_float32(zt) - mt) / temperature
  log_ps = us - jnp.log(sum_s)[..., None]
  log_pt = ut - jnp.log(sum_t)[..., None]
  ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
  g = g[..., None]
  d_us = g * (ps - pt)
  d_ut = jnp.where(pt > 0, g * pt * (log_pt - log_ps - kl[..., None]), 0.0)
  # Only a traced temperature keeps this sum alive; XLA drops it otherwise.
  d_tau = -(_logits.expectation(jnp.abs(d_us), jnp.sign(d_us) * us)
            + _logits.expectation(jnp.abs(d_ut), jnp.sign(d_ut) * ut)) / temperature
  d_tau = jnp.sum(d_tau).reshape(jnp.shape(temperature)).astype(jnp.result_type(temperature))
  return ((d_us / temperature).astype(zs.dtype), (d_ut / temperature).astype(zt.dtype),
          jnp.zeros_like(ms), jnp.zeros_like(mt), d_tau)


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd)


def _kl_shifted(us: jax.Array, ut: jax.Array) -> jax.Array:
  """`_kl_rows` of scaled logits already shifted to a row maximum of 0 (m = 0, τ = 1)."""
  zero = jnp.zeros(jnp.shape(us)[:-1] + (1,), jnp.result_type(us))
  return _kl_rows(us, ut, zero, zero, jnp.ones((), jnp.result_type(us)))


# --------------------------------------------------------------------------------------------
# Per-example losses.


def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0,
                  where: Array | None = None) -> jax.Array:
  """Per-example softmax cross-entropy, natural log.

    CE_i = −Σ_c q_ic log softmax(z_i)_c,  q = (1 − ε)·onehot(y) + ε/C  (ε = label_smoothing)

  Args:
    logits: `[..., C]`.
    labels: integer class indices `[...]` (the logits' leading shape), or a probability
      vector per example `[..., C]` (soft targets, e.g. PS-KD's; `label_smoothing` then must
      be 0).
    label_smoothing: ε in [0, 1).
    where: bool `[...]`, or None: rows it excludes are 0 and may hold ±inf or NaN in logits
      and labels without reaching the values or the gradients of the rows kept.

  Returns:
    `[...]` float32.
  """
  logits = _logits.mask_rows(_logits.as_float32(logits), where)
  if not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
  u, lse = _logits.shifted_logsumexp(logits)
  if jnp.shape(labels) == jnp.shape(logits) and jnp.issubdtype(
      jnp.result_type(labels), jnp.floating):
    if label_smoothing:
      raise ValueError("label_smoothing must be 0 with soft (probability) labels.")
    q = _logits.mask_rows(_logits.as_float32(labels), where)
    ce = jnp.sum(q, axis=-1) * lse - _logits.expectation(q, u)
  else:
    _logits.check_labels(labels, logits)
    ce = lse - _logits.take_label(u, _logits.mask_labels(labels, where))
    if label_smoothing:
      ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - jnp.mean(u, axis=-1))
  return ce if where is None else jnp.where(jnp.asarray(where, bool), ce, 0.0)


def kl_divergence(student_logits: Array, teacher_logits: Array, *,
                  temperature: float = 1.0) -> jax.Array:
  """Per-example KL(p^t(τ) ‖ p^s(τ)), the divergence of Hinton et al.'s KD.

    KL_i = Σ_c p^t_ic (log p^t_ic − log p^s_ic),  p(τ) = softmax(z/τ)

  computed from log-softmax on both sides (never the log of a softmax), 0·log 0 = 0, in three
  sweeps of the raw logits that write nothing of shape `[..., C]`, with a closed-form
  gradient (one more sweep). Not multiplied by τ² (docs/METHODS.md#kd).

  Args:
    student_logits: `[..., C]`.
    teacher_logits: `[..., C]`, same shape. Differentiable too (for mutual learning); wrap it
      in `jax.lax.stop_gradient` for a frozen teacher.
    temperature: τ > 0 (may be traced, e.g. a learnable temperature).

  Returns:
    `[...]` float32, ≥ 0.

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015
  """
  _logits.check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _logits.check_positive(temperature, "temperature")
  zs, zt = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  dtype = jnp.promote_types(jnp.promote_types(zs.dtype, zt.dtype), jnp.float32)
  return _kl_rows(zs, zt, _logits.raw_row_max(zs), _logits.raw_row_max(zt),
                  jnp.asarray(temperature, dtype))


def _target_split(u: jax.Array, lse: jax.Array, onehot: jax.Array):
  """For shifted logits u: (log p_y, log Σ_{c≠y} p_c, lse of the non-target classes)."""
  log_p_target = jnp.sum(jnp.where(onehot, u, 0.0), axis=-1) - lse
  masked = jnp.where(onehot, -jnp.inf, u)
  m = _logits.row_max(masked)
  lse_other = jnp.log(jnp.sum(jnp.exp(masked - m), axis=-1)) + m[..., 0]
  return log_p_target, lse_other - lse, lse_other


def dkd_divergence(student_logits: Array, teacher_logits: Array, labels: Array, *,
                   alpha: float = 1.0, beta: float = 8.0,
                   temperature: float = 4.0) -> jax.Array:
  """Per-example decoupled KD, α·TCKD_i + β·NCKD_i (Zhao et al. 2022, Eq. 7).

  With p = softmax(z/τ) and y the label:

    TCKD_i = τ² · KL(b^t ‖ b^s),  b = (p_y, 1 − p_y)                  (target vs rest)
    NCKD_i = τ² · KL(p̂^t ‖ p̂^s),  p̂ = softmax over the classes c ≠ y (non-target)

  Both are computed in log space: log(1 − p_y) = lse_{c≠y}(z/τ) − lse(z/τ). The target class is
  removed exactly (mdistiller subtracts 1000 from its scaled logit, which agrees unless the
  logits span more than ~1000τ): it is set to −max_float once per side, so the non-target max,
  Σ exp and KL cross term are the isolated sweeps of `kd_loss`, and the student's gradient is
  written in closed form (`_dkd_rows_bwd`). The warm-up factor min(epoch/20, 1) and the batch mean belong
  to the training objective, not here (docs/METHODS.md#dkd).

  Args:
    student_logits, teacher_logits: `[..., C]`, C ≥ 2.
    labels: integer `[...]`.
    alpha, beta: weights of TCKD and NCKD.
    temperature: τ > 0.

  Returns:
    `[...]` float32.

  References:
    Zhao et al., `Decoupled Knowledge Distillation <https://arxiv.org/abs/2203.08679>`_,
    CVPR 2022
  """
  _logits.check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  if jnp.shape(student_logits)[-1] < 2:
    raise ValueError("dkd_divergence needs at least 2 classes.")
  _logits.check_labels(labels, student_logits)
  _logits.check_positive(temperature, "temperature")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return _dkd_rows(_logits.as_float32(student_logits), _logits.as_float32(teacher_logits),
                   jnp.asarray(labels), f32(alpha), f32(beta), f32(temperature))


def _dkd_composed(zs, zt, labels, alpha, beta, temperature):
  """`dkd_divergence` by plain jnp on materialised shifted logits: the reference whose autodiff
  gives `_dkd_rows` its teacher and temperature gradients."""
  onehot = jax.nn.one_hot(labels, jnp.shape(zs)[-1], dtype=bool)
  us, lse_s = _logits.shifted_logsumexp(zs, temperature)
  ut, lse_t = _logits.shifted_logsumexp(zt, temperature)
  ly_s, lo_s, lse_other_s = _target_split(us, lse_s, onehot)
  ly_t, lo_t, lse_other_t = _target_split(ut, lse_t, onehot)
  tckd = _binary_kl(ly_t, lo_t, ly_s, lo_s)
  # Non-target distribution: log p̂_c = u_c − lse_other, so the KL is
  # Σ_{c≠y} p̂^t_c (u^t_c − u^s_c) + lse_other^s − lse_other^t.
  p_hat_t = jnp.where(onehot, 0.0, jnp.exp(ut - lse_other_t[..., None]))
  nckd = _logits.expectation(p_hat_t, ut - us) + lse_other_s - lse_other_t
  return temperature**2 * (alpha * tckd + beta * nckd)


def _binary_kl(ly_t, lo_t, ly_s, lo_s):
  """KL(b^t ‖ b^s) of b = (p_y, 1 − p_y) from their logs, with 0 · log 0 = 0 (DKD's TCKD)."""
  py_t, po_t = jnp.exp(ly_t), jnp.exp(lo_t)
  return (jnp.where(py_t > 0, py_t * (ly_t - ly_s), 0.0)
          + jnp.where(po_t > 0, po_t * (lo_t - lo_s), 0.0))


def _non_target(z, labels, temperature):
  """z with the label's logit at −max_float, its row max m_o `[..., 1]` (the non-target max),
  Z_o = Σ_{c≠y} exp((z − m_o)/τ), log p_y and log(1 − p_y) of softmax(z/τ).

  −max_float rather than −inf: its exp is 0 all the same, and forward-mode autodiff (a
  Hessian) through the sweeps multiplies (z − m)/τ by τ's zero tangent, which −inf would make
  NaN (for τ < 1 the quotient still overflows to −inf). A row whose only finite logit is the
  target gets NCKD = 0 (an empty non-target distribution) instead of NaN.
  """
  u_y = _logits.take_label(z, labels) / temperature
  z_o = jnp.put_along_axis(z, labels[..., None], -np.finfo(np.float32).max, axis=-1,
                           inplace=False)
  m_o = _logits.raw_row_max(z_o)
  sum_o = _logits.sum_exp(z_o, m_o, temperature)
  lse_o = jnp.log(sum_o) + m_o[..., 0] / temperature
  lse = jnp.logaddexp(lse_o, u_y)
  return z_o, m_o, sum_o, u_y - lse, lse_o - lse


@jax.custom_vjp
def _dkd_rows(zs, zt, labels, alpha, beta, temperature):
  """α·TCKD + β·NCKD per row (τ² inside); float32 logits, float32 scalars."""
  return _dkd_rows_fwd(zs, zt, labels, alpha, beta, temperature)[0]


def _dkd_rows_fwd(zs, zt, labels, alpha, beta, temperature):
  zs_o, ms_o, sum_s, ly_s, lo_s = _non_target(zs, labels, temperature)
  zt_o, mt_o, sum_t, ly_t, lo_t = _non_target(zt, labels, temperature)
  tckd = _binary_kl(ly_t, lo_t, ly_s, lo_s)
  # NCKD = Σ_{c≠y} p̂^t_c (u^t_c − u^s_c) + log Z^s_o − log Z^t_o, u = (z − m_o)/τ, p̂^t = e^t/Z^t_o.
  cross = _logits.kl_cross(zs_o, zt_o, ms_o, mt_o, temperature)
  nckd = cross / sum_t + jnp.log(sum_s) - jnp.log(sum_t)
  out = temperature**2 * (alpha * tckd + beta * nckd)
  return out, (zs, zt, labels, alpha, beta, temperature, ms_o, mt_o, sum_s, sum_t, ly_s, ly_t,
               tckd, nckd)


def _dkd_rows_bwd(res, g):
  # With b = (p_y, 1 − p_y), p̂ the non-target softmax and G = g·τ² (times 1/τ for du/dz):
  #   c ≠ y: ∂/∂u^s_c = G·[p̂^s_c (α(p^t_y − p^s_y) + β) − β p̂^t_c],  c = y: G·α(p^s_y − p^t_y).
  # p̂ is computed from the raw logits (its value at y, possibly inf, is then overwritten).
  zs, zt, labels, alpha, beta, temperature, ms_o, mt_o, sum_s, sum_t, ly_s, ly_t, tckd, nckd = res
  py_s, py_t = jnp.exp(ly_s), jnp.exp(ly_t)
  scale = g * temperature
  a = (scale * (alpha * (py_t - py_s) + beta) / sum_s)[..., None]
  b = (scale * beta / sum_t)[..., None]
  d_zs = a * jnp.exp((zs - ms_o) / temperature) - b * jnp.exp((zt - mt_o) / temperature)
  d_zs = jnp.put_along_axis(d_zs, labels[..., None], (scale * alpha * (py_s - py_t))[..., None],
                            axis=-1, inplace=False)
  # The teacher's and τ's gradients (rarely needed; XLA drops them unless used) are autodiff's
  # of the composed reference.
  _, vjp = jax.vjp(lambda zt_, t_: _dkd_composed(zs, zt_, labels, alpha, beta, t_),
                   zt, temperature)
  d_zt, d_tau = vjp(g)
  t2 = temperature**2
  return (d_zs, d_zt, np.zeros(jnp.shape(labels), jax.dtypes.float0),
          jnp.sum(g * t2 * tckd), jnp.sum(g * t2 * nckd), d_tau)


_dkd_rows.defvjp(_dkd_rows_fwd, _dkd_rows_bwd)


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
  values = _logits.as_float32(values)
  _logits.check_leading(weights, values.shape, "weights")
  _logits.check_leading(where, values.shape, "where")
  if weights is not None:
    values = values * _logits.as_float32(weights)
  return _logits.masked_mean(values, where)


def kd_loss(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0,
            weights: Array | None = None, where: Array | None = None) -> jax.Array:
  """Sample-weighted Hinton KD loss, τ² · (1/N) Σ_i w_i · KL_i(τ).

  Plain KD with `weights=None`; ER-KD, EA-KD and IPWD with the weights of `jaxkd.weighting`
  (docs/METHODS.md#composing-a-base-and-a-weighting). The gradient with respect to the student
  logits is w_i · τ · (p^s_i − p^t_i) / N.

  Args:
    student_logits, teacher_logits: `[..., C]`.
    temperature: τ > 0.
    weights: per-example weights `[...]` (treated as constants) or None.
    where: boolean `[...]` of the examples to keep, or None.

  Returns:
    float32 scalar.

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015
  """
  _logits.check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _logits.check_leading(where, jnp.shape(student_logits)[:-1], "where")
  kl = kl_divergence(_logits.mask_rows(student_logits, where),
                     _logits.mask_rows(teacher_logits, where), temperature=temperature)
  if weights is not None:
    weights = jax.lax.stop_gradient(weights)
  return temperature**2 * weighted_mean(kl, weights, where=where)


def dkd_loss(student_logits: Array, teacher_logits: Array, labels: Array, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             weights: Array | None = None, where: Array | None = None) -> jax.Array:
  """Sample-weighted DKD loss, (1/N) Σ_i w_i (α·TCKD_i + β·NCKD_i) (τ² inside, as DKD has it).

  ER-DKD with `weights=teacher_entropy_weights(...)` (docs/METHODS.md#er-kd). Arguments as
  `dkd_divergence` and `weighted_mean`.

  References:
    Zhao et al., `Decoupled Knowledge Distillation <https://arxiv.org/abs/2203.08679>`_,
    CVPR 2022
  """
  _logits.check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _logits.check_labels(labels, student_logits)
  _logits.check_leading(where, jnp.shape(student_logits)[:-1], "where")
  per_example = dkd_divergence(_logits.mask_rows(student_logits, where),
                               _logits.mask_rows(teacher_logits, where),
                               _logits.mask_labels(labels, where),
                               alpha=alpha, beta=beta, temperature=temperature)
  if weights is not None:
    weights = jax.lax.stop_gradient(weights)
  return weighted_mean(per_example, weights, where=where)
