"""Independent float64 NumPy references for the loss and weighting formulas.

Written straight from the formulas of docs/METHODS.md, with none of jaxkd's tricks
(no shifted log-sum-exp sharing, no closed-form gradients): plain log-softmax in float64.
"""

import numpy as np

# −inf − (−inf) appears for classes masked on both sides; xlogy_sum drops those terms.
np.seterr(invalid="ignore", divide="ignore")


def log_softmax(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(z - m)
  return z - m - np.log(np.sum(e, axis=-1, keepdims=True))


def softmax(z):
  return np.exp(log_softmax(z))


def xlogy_sum(p, v):
  """Σ p·v over the last axis with 0·anything = 0."""
  return np.sum(np.where(p > 0, p * v, 0.0), axis=-1)


def cross_entropy(z, y, label_smoothing=0.0):
  logp = log_softmax(z)
  c = z.shape[-1]
  q = np.eye(c)[y] * (1 - label_smoothing) + label_smoothing / c
  return -np.sum(q * logp, axis=-1)


def kl(zs, zt, T=1.0):
  ls, lt = log_softmax(np.asarray(zs, np.float64) / T), log_softmax(np.asarray(zt, np.float64) / T)
  return xlogy_sum(np.exp(lt), lt - ls)


def entropy(z, T=1.0):
  lp = log_softmax(np.asarray(z, np.float64) / T)
  return -xlogy_sum(np.exp(lp), lp)


def dkd(zs, zt, y, alpha=1.0, beta=8.0, T=4.0):
  """DKD per example: α·TCKD + β·NCKD, τ² inside (Zhao et al. 2022)."""
  zs, zt = np.asarray(zs, np.float64) / T, np.asarray(zt, np.float64) / T
  c = zs.shape[-1]
  onehot = np.eye(c, dtype=bool)[y]
  def log_bins(z):  # log of (p_y, Σ_{c≠y} p_c), in log space so that 1 − p_y ≈ 0 stays exact
    lp = log_softmax(z)
    other = np.where(onehot, -np.inf, lp)
    m = other.max(-1)
    return np.stack([np.sum(np.where(onehot, lp, 0.0), -1),
                     m + np.log(np.sum(np.exp(other - m[..., None]), -1))], -1)
  lbs, lbt = log_bins(zs), log_bins(zt)
  tckd = xlogy_sum(np.exp(lbt), lbt - lbs)
  ls = log_softmax(np.where(onehot, -np.inf, zs))
  lt = log_softmax(np.where(onehot, -np.inf, zt))
  nckd = xlogy_sum(np.exp(lt), lt - ls)
  return T**2 * (alpha * tckd + beta * nckd)


def weighted_mean(values, weights=None, where=None):
  values = np.asarray(values, np.float64)
  w = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
  keep = np.ones(values.shape, bool) if where is None else np.asarray(where, bool)
  return np.sum(np.where(keep, w * values, 0.0)) / max(keep.sum(), 1)


def masked_mean(x, where=None):
  return weighted_mean(x, None, where)


def standardize(z, eps=1e-7):
  z = np.asarray(z, np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + eps)


def ipw(kd_logits, ce_logits, y, estimator="likelihood_ratio", standardize_logits=True,
        normalize=None, max_weight=None, where=None):
  f, g = np.asarray(kd_logits, np.float64), np.asarray(ce_logits, np.float64)
  if standardize_logits:
    f, g = standardize(f), standardize(g)
  lq_kd = np.take_along_axis(log_softmax(f), y[..., None], -1)[..., 0]
  lq_ce = np.take_along_axis(log_softmax(g), y[..., None], -1)[..., 0]
  if estimator == "likelihood_ratio":
    q_kd, q_ce = np.exp(lq_kd), np.exp(lq_ce)
    propensity = q_kd / (q_kd + q_ce)        # P(machine | x, y) with equal domain priors
    w = 1.0 / propensity
  else:
    w = 1.0 + (-lq_ce) / (-lq_kd)
  if normalize == "mean":
    w = w / masked_mean(w, where)
  if max_weight is not None:
    w = np.minimum(w, max_weight)
  return w
