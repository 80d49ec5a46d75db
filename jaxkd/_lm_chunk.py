"""Private per-chunk math of `jaxkd.lm`: one chunk of tokens' logits, `[C, V]`, at a time.

Not public API. Every function here sees the float32 logits of a chunk of C tokens over the
whole vocabulary V and returns per-token values `[C]` or the gradient of the loss with respect
to the student's chunk logits, `[C, V]`; `jaxkd.lm` walks the chunks and never holds more.

The divergences act on *bins*: for a dense teacher every class is its own bin (`[C, V]`); for
a top-k teacher the bins are the k stored classes plus one tail bin holding the rest of the
vocabulary (`[C, k + 1]`). Log-probabilities may be −inf (an empty bin); the convention
0 · log 0 = 0 is kept explicitly, so an empty bin contributes nothing and no NaN appears.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def lse(u: jax.Array, axis: int = -1) -> jax.Array:
  """log Σ exp(u) over `axis`, stable, −inf for an all −inf row (no NaN)."""
  m = jnp.max(u, axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  return jnp.log(jnp.sum(jnp.exp(u - m), axis=axis)) + jnp.squeeze(m, axis)


def log_softmax(z: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """(log softmax(z/τ), lse(z/τ)) over the last axis."""
  u = z / temperature
  total = lse(u)
  return u - total[..., None], total


def _plogp_ratio(la: jax.Array, lb: jax.Array) -> jax.Array:
  """Σ_j a_j (log a_j − log b_j) from log-probabilities, with 0 · anything = 0."""
  a = jnp.exp(la)
  return jnp.sum(jnp.where(a > 0, a * (la - lb), 0.0), axis=-1)


def _log_mixture(lt: jax.Array, ls: jax.Array, beta: float) -> jax.Array:
  """log m,  m = β p_t + (1 − β) p_s (the JSD midpoint), from the two log-probabilities."""
  return jnp.logaddexp(math.log(beta) + lt, math.log1p(-beta) + ls)


def kind_of(divergence: str, beta: float) -> str:
  """The divergence actually computed: JSD at β = 0 / 1 is forward / reverse KL (its limits)."""
  if divergence == "jsd" and beta == 0.0:
    return "forward_kl"
  if divergence == "jsd" and beta == 1.0:
    return "reverse_kl"
  return divergence


def divergence(lt: jax.Array, ls: jax.Array, kind: str, beta: float) -> jax.Array:
  """Per-token divergence `[C]` between teacher (lt) and student (ls) log-probabilities.

    forward_kl:  KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)
    reverse_kl:  KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t)
    jsd:         β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m),  m = β p_t + (1 − β) p_s
  """
  if kind == "forward_kl":
    return _plogp_ratio(lt, ls)
  if kind == "reverse_kl":
    return _plogp_ratio(ls, lt)
  lm = _log_mixture(lt, ls, beta)
  return beta * _plogp_ratio(lt, lm) + (1.0 - beta) * _plogp_ratio(ls, lm)


def bin_scores(lt: jax.Array, ls: jax.Array, kind: str, beta: float) -> tuple[jax.Array, jax.Array]:
  """(s, s̄) with ∂D/∂u_c = p_s,c · (s_bin(c) − s̄) for reverse KL and JSD (u = z_s / τ).

  Differentiating through the student softmax, ∂D/∂u_c = q_c (g_bin(c) − Σ_j q_j g_j) with
  g_j = ∂D/∂q_j; constants in g cancel, which leaves
    reverse_kl:  s = log q − log p_t,          s̄ = KL(q ‖ p_t)
    jsd:         s = (1 − β)(log q − log m),   s̄ = (1 − β) KL(q ‖ m)
  (for JSD, ∂D/∂q_j = (1 − β) log(q_j / m_j) exactly: the terms through m cancel).
  """
  if kind == "reverse_kl":
    s = ls - lt
    return s, _plogp_ratio(ls, lt)
  lm = _log_mixture(lt, ls, beta)
  return (1.0 - beta) * (ls - lm), (1.0 - beta) * _plogp_ratio(ls, lm)


def entropy(z: jax.Array, temperature: float) -> jax.Array:
  """H(softmax(z/τ)) per token, `[C]`, 0 · log 0 = 0."""
  lp, _ = log_softmax(z, temperature)
  return -jnp.sum(jnp.where(lp > -jnp.inf, jnp.exp(lp) * lp, 0.0), axis=-1)


def take(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x[c, ids[c, j]] for `[C, V]` x and `[C, k]` ids (ids already in range)."""
  return jnp.take_along_axis(x, ids, axis=-1)


def scatter(base: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
  """base with base[c, ids[c, j]] = values[c, j]; ids ≥ V are dropped."""
  rows = jnp.arange(base.shape[0])[:, None]
  return base.at[rows, ids].set(values, mode="drop")


def label_terms(zs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lse(z_s), log p_s(y)) at temperature 1, `[C]` each: the CE term is −log p_s(y)."""
  total = lse(zs)
  return total, take(zs, labels[:, None])[:, 0] - total


def ce_grad(zs: jax.Array, student_lse: jax.Array, labels: jax.Array) -> jax.Array:
  """∂CE/∂z_s = softmax(z_s) − onehot(y), `[C, V]`."""
  p = jnp.exp(zs - student_lse[:, None])
  return p - jax.nn.one_hot(labels, zs.shape[-1], dtype=p.dtype)


# --------------------------------------------------------------------------------------------
# A dense teacher: every class is a bin.


def dense_terms(zs, zt, labels, *, temperature, weighting_temperature, kind, beta):
  """Per-token statistics `{name: [C]}` of a chunk with dense teacher logits zt `[C, V]`."""
  ls, _ = log_softmax(zs, temperature)
  lt, _ = log_softmax(zt, temperature)
  student_lse, student_logp_label = label_terms(zs, labels)
  teacher_lse, teacher_logp_label = label_terms(zt, labels)
  return {
      "divergence": divergence(lt, ls, kind, beta),
      "teacher_entropy": entropy(zt, weighting_temperature),
      "student_entropy": entropy(zs, weighting_temperature),
      "teacher_lse": teacher_lse,
      "student_lse": student_lse,
      "teacher_logp_label": teacher_logp_label,
      "student_logp_label": student_logp_label,
  }


def dense_grad(zs, zt, *, temperature, kind, beta):
  """∂D/∂z_s `[C, V]`, dense teacher: forward KL (p_s − p_t)/τ; else p_s (s − s̄)/τ."""
  ls, _ = log_softmax(zs, temperature)
  lt, _ = log_softmax(zt, temperature)
  q = jnp.exp(ls)
  if kind == "forward_kl":
    return (q - jnp.exp(lt)) / temperature
  s, s_bar = bin_scores(lt, ls, kind, beta)
  return jnp.where(q > 0, q * (s - s_bar[:, None]), 0.0) / temperature


# --------------------------------------------------------------------------------------------
# A sparse (top-k) teacher: k stored classes and one tail bin.


def topk_bins(zs, ids, valid, logprobs, temperature):
  """Student and teacher log-probabilities on the bins, and what the gradient needs.

  Returns (ls_full `[C, V]`, ls_bins, lt_bins, lb `[C, k + 1]`, member `[C, V]` bool,
  drop_ids `[C, k]`: invalid ids replaced by V), lb the teacher's bins at temperature 1, with the
  student's bins exact from the full vocabulary: log q_j for the stored ids, and for the tail
  log Σ_{c ∉ ids} q_c (−inf when every class is stored).
  """
  vocab = zs.shape[-1]
  drop_ids = jnp.where(valid, ids, vocab)
  member = scatter(jnp.zeros(zs.shape, bool), drop_ids, jnp.ones(ids.shape, bool))
  ls_full, _ = log_softmax(zs, temperature)
  ls_tail = lse(jnp.where(member, -jnp.inf, ls_full))
  ls_top = jnp.where(valid, take(ls_full, jnp.where(valid, ids, 0)), -jnp.inf)
  ls_bins = jnp.concatenate([ls_top, ls_tail[:, None]], axis=-1)
  lb = teacher_bins(logprobs, valid, tail_exists=~jnp.all(member, axis=-1))
  lt_bins, _ = log_softmax(lb, temperature)
  return ls_full, ls_bins, lt_bins, lb, member, drop_ids


def teacher_bins(logprobs, valid, tail_exists):
  """Teacher log-masses `[C, k + 1]` at temperature 1: stored log-probs and the tail.

  The tail r = 1 − Σ_valid exp(logprob), clamped at 0; an invalid id's stored mass is left in
  the tail. Where no class lies outside the stored ids, r is rounding error and is dropped.
  """
  top = jnp.where(valid, logprobs, -jnp.inf)
  # r = (1 − p_max) − Σ_others p, with 1 − p_max = −expm1(log p_max): for a confident teacher
  # 1 − Σ p would cancel down to float32 rounding (r ~ 1e-5 known to ~1%); this keeps r to
  # float32's relative precision.
  is_max = jax.nn.one_hot(jnp.argmax(top, axis=-1), top.shape[-1], dtype=bool)
  p_max = jnp.max(top, axis=-1)
  others = jnp.sum(jnp.where(is_max, 0.0, jnp.exp(top)), axis=-1)
  r = jnp.maximum(-jnp.expm1(p_max) - others, 0.0)
  r = jnp.where(tail_exists, r, 0.0)
  tail = jnp.where(r > 0, jnp.log(jnp.where(r > 0, r, 1.0)), -jnp.inf)
  return jnp.concatenate([top, tail[:, None]], axis=-1)


def topk_terms(zs, ids, valid, logprobs, labels, *, temperature, weighting_temperature,
               kind, beta):
  """Per-token statistics of a chunk with a top-k teacher (see `dense_terms`).

  The teacher's entropy is that of its k + 1 bins tempered at τ′; its log-probability of the
  label is the stored one when the label is among the ids, else the tail's (an upper bound).
  """
  _, ls_bins, lt_bins, lb, _, _ = topk_bins(zs, ids, valid, logprobs, temperature)
  student_lse, student_logp_label = label_terms(zs, labels)
  hit = valid & (ids == labels[:, None])
  teacher_logp_label = jnp.where(jnp.any(hit, -1),
                                 jnp.sum(jnp.where(hit, logprobs, 0.0), -1), lb[:, -1])
  return {
      "divergence": divergence(lt_bins, ls_bins, kind, beta),
      "teacher_entropy": entropy(lb, weighting_temperature),
      "student_entropy": entropy(zs, weighting_temperature),
      "student_lse": student_lse,
      "teacher_logp_label": teacher_logp_label,
      "student_logp_label": student_logp_label,
  }


def topk_grad(zs, ids, valid, logprobs, *, temperature, kind, beta):
  """∂D/∂z_s `[C, V]` for a top-k teacher: p_s,c (s_bin(c) − s̄)/τ, the bins scattered back.

  Forward KL in closed form: (q_c − P_c)/τ, where P_c is the teacher's mass of c's bin shared
  within the bin in proportion to the student (p_j for a stored class; p_tail · q_c / q_tail
  in the tail), which stays finite when q_tail underflows.
  """
  ls_full, ls_bins, lt_bins, _, member, drop_ids = topk_bins(zs, ids, valid, logprobs, temperature)
  q = jnp.exp(ls_full)
  if kind == "forward_kl":
    p_bins = jnp.exp(lt_bins)
    ls_tail = ls_bins[:, -1:]
    in_tail = ~member & (ls_tail > -jnp.inf)
    share = p_bins[:, -1:] * jnp.exp(ls_full - jnp.where(in_tail, ls_tail, 0.0))
    tail_share = jnp.where(in_tail, share, 0.0)
    target = scatter(tail_share, drop_ids, p_bins[:, :-1])
    return (q - target) / temperature
  s, s_bar = bin_scores(lt_bins, ls_bins, kind, beta)
  per_class = scatter(jnp.broadcast_to(s[:, -1:], zs.shape), drop_ids, s[:, :-1])
  return jnp.where(q > 0, q * (per_class - s_bar[:, None]), 0.0) / temperature
