"""Private chunk layout and fused pass of `jaxkd.lm`: the scan over chunks and its custom VJP.

Not public API. `fused(spec, student, teacher, labels, valid, kept)` returns (loss, statistics) and,
differentiated, the gradients with respect to the student's (hidden, kernel, bias) that the
forward pass computed chunk by chunk (`jaxkd.lm` states the loss).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxkd import _lm_chunk


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one call: shapes, the chunk layout and the loss settings."""
  lead_shape: tuple[int, ...]
  num_chunks: int
  chunk: int
  temperature: float
  weighting_temperature: float
  kind: str
  beta: float
  weighting: str | Callable | None
  entropy_upper_bound: float
  ce_weight: float
  kd_weight: float
  sparse: bool

  @property
  def num_tokens(self) -> int:
    return math.prod(self.lead_shape)




# --------------------------------------------------------------------------------------------
# The chunk layout. Token i goes to chunk i mod n at position i div n: each chunk is strided
# over the whole token axis, so when tokens are sharded over devices every chunk is too, and
# every device works on every chunk.


def to_chunks(x: jax.Array, spec: Spec, fill=0) -> jax.Array:
  """`[N, ...]` -> `[n, C, ...]`, padded with `fill` to n · C tokens."""
  return jnp.swapaxes(to_strided(x, spec, fill), 0, 1)


def to_strided(x: jax.Array, spec: Spec, fill=0) -> jax.Array:
  """`[N, ...]` -> `[C, n, ...]`, padded: chunk j is `[:, j]`. A reshape of the tokens in
  their own order (no copy), for the hidden states, which the pass slices chunk by chunk."""
  pad = spec.num_chunks * spec.chunk - x.shape[0]
  if pad:
    x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
  return x.reshape((spec.chunk, spec.num_chunks) + x.shape[1:])


def from_chunks(x: jax.Array, spec: Spec) -> jax.Array:
  """`[n, C]` -> the leading shape `[...]`, padding dropped."""
  return jnp.swapaxes(x, 0, 1).reshape(-1)[: spec.num_tokens].reshape(spec.lead_shape)


def from_strided(x: jax.Array, spec: Spec) -> jax.Array:
  """`[C, n, ...]` -> `[N, ...]`, padding dropped."""
  return x.reshape((-1,) + x.shape[2:])[: spec.num_tokens]


def layout(num_tokens: int, chunk_size: int) -> tuple[int, int]:
  """(n, C): the fewest chunks of at most `chunk_size` tokens, as even as possible."""
  num_chunks = max(1, -(-num_tokens // chunk_size))
  return num_chunks, max(1, -(-num_tokens // num_chunks))


def with_tokens(spec: Spec, lead_shape: tuple[int, ...], chunk_size: int) -> Spec:
  """`spec` for another set of tokens (one device's share)."""
  num_chunks, chunk = layout(math.prod(lead_shape), chunk_size)
  return dataclasses.replace(spec, lead_shape=lead_shape, num_chunks=num_chunks, chunk=chunk)


# --------------------------------------------------------------------------------------------
# One pass over the chunks.


def _logits(hidden, kernel, bias):
  z = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  return z if bias is None else z + bias.astype(jnp.float32)


def _chunk_terms(spec, zs, teacher_chunk, labels):
  opts = dict(temperature=spec.temperature, weighting_temperature=spec.weighting_temperature,
              kind=spec.kind, beta=spec.beta)
  if spec.sparse:
    ids, valid_ids, logprobs = teacher_chunk
    return _lm_chunk.topk_terms(zs, ids, valid_ids, logprobs, labels, **opts)
  return _lm_chunk.dense_terms(zs, teacher_chunk, labels, **opts)


def _chunk_grad(spec, zs, teacher_chunk):
  opts = dict(temperature=spec.temperature, kind=spec.kind, beta=spec.beta)
  if spec.sparse:
    ids, valid_ids, logprobs = teacher_chunk
    return _lm_chunk.topk_grad(zs, ids, valid_ids, logprobs, **opts)
  return _lm_chunk.dense_grad(zs, teacher_chunk, **opts)


def _local_weights(spec: Spec, stats: dict) -> jax.Array:
  """The named weightings, from each token's own statistics."""
  if spec.weighting == "entropy":  # ER-KD: w = H_t(τ′)
    return stats["teacher_entropy"]
  if spec.weighting == "adaptive_entropy":  # EA-KD: w = ½ H_t (1 + H_s / H_ub)
    h_s = stats["student_entropy"]
    return 0.5 * stats["teacher_entropy"] * (1.0 + h_s / spec.entropy_upper_bound)
  return jnp.ones_like(stats["divergence"])


# --------------------------------------------------------------------------------------------
# How the matmuls are laid out. On XLA:CPU a matmul runs in YNNPACK in its inputs' 16-bit dtype
# only if both operands are row-major with the contraction on the lhs's last and the rhs's first
# axis; any other matmul XLA computes in float32 on float32 copies of its operands, and hoists
# the copy of a loop-invariant operand out of the loop: a float32 kernel, twice the kernel's
# own bytes, for `∂L/∂z · Wᵀ`. XLA:CPU also computes 16-bit slices and transposes in float32,
# and hoists those conversions out of the loop too (float32 copies of the hidden states). So on
# CPU the 16-bit hidden states and kernel are moved (transposed, sliced, updated) as their
# uint16 bits, and both gradient matmuls get row-major operands: the kernel transposed once,
# `[V, H]`, and the hidden states once, `[n, H, C]`. A matmul's output is never added into
# its destination in place on CPU either, so the kernel gradient is accumulated in blocks of
# rows (a `fori_loop`, whose body XLA cannot reorder), each block's matmul output at most the
# size of a chunk's logits instead of the whole float32 kernel.


@dataclasses.dataclass(frozen=True)
class _Layout:
  bits: bool  # move 16-bit arrays as uint16 (XLA:CPU)
  blocks: int  # row blocks of the kernel-gradient accumulation

  @staticmethod
  def of(dtype, hidden_size: int, chunk: int) -> "_Layout":
    if jax.default_backend() != "cpu" or jnp.dtype(dtype).itemsize != 2:
      # The matmuls take transposed operands as they are and accumulate into the carry
      # (cuBLAS; on XLA:CPU, Eigen's float32 matmul with the addition fused into it).
      return _Layout(False, 1)
    blocks = max(1, min(8, hidden_size // max(chunk, 1)))
    while hidden_size % blocks:
      blocks -= 1
    return _Layout(True, blocks)

  def to_bits(self, x):
    """A 16-bit float array as its uint16 bits (XLA:CPU), anything else unchanged."""
    if not self.bits or x.dtype.itemsize != 2:
      return x
    # The barrier keeps XLA from moving the bitcast back across the slice or transpose.
    return jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(x, jnp.uint16))

  def from_bits(self, x, dtype):
    if x.dtype != jnp.uint16:
      return x
    return jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(x), dtype)


def _pass(spec, student, teacher, labels, valid, kept, weights, *, grads):
  """Scans the chunks: per-token statistics `{name: [n, C]}` and, with grads, the gradients of
  Σ_i c_kd,i D_i + c_ce,i CE_i with respect to (hidden `[C, n, Hs]`, kernel, bias).

  student: (hidden `[C, n, Hs]` (`to_strided`), kernel, bias); teacher: dense (hidden
  `[C, n, Ht]`, kernel, bias), top-k (ids, log-probabilities) `[n, C, k]` (`to_chunks`).
  kept: the number of tokens the loss averages over (all devices' when sharded).
  weights: `[n, C]` given, or None to compute each chunk's from its own statistics.
  """
  hidden, kernel, bias = student
  compute = jnp.result_type(hidden.dtype, kernel.dtype)
  chunk, n, size = hidden.shape
  lay = _Layout.of(compute, size, chunk)
  h_bits = lay.to_bits(hidden.astype(compute))

  def chunk_of(x_bits, j, dtype, axis=1):
    return lay.from_bits(jax.lax.dynamic_index_in_dim(x_bits, j, axis, keepdims=False), dtype)

  if spec.sparse:
    t_xs = teacher
  else:
    t_bits, t_xs = lay.to_bits(teacher[0]), ()

  def teacher_logits(j, t_chunk):
    if spec.sparse:
      ids, logprobs = t_chunk
      vocab = kernel.shape[1]
      return ids, (ids >= 0) & (ids < vocab), logprobs.astype(jnp.float32)
    return _logits(chunk_of(t_bits, j, teacher[0].dtype), teacher[1], teacher[2])

  if grads and lay.bits:
    # [V, Hs], a row-major array of its own: the rhs of ∂L/∂z · Wᵀ.
    kernel_t = lay.from_bits(jnp.transpose(lay.to_bits(kernel.astype(compute))), compute)
    # [n, blocks, rows, C]: chunk j's hidden states transposed, in blocks of rows.
    rows = size // lay.blocks
    ht_bits = jnp.transpose(h_bits, (1, 2, 0)).reshape(n, lay.blocks, rows, chunk)

  def accumulate(d_kernel, h, j, gc):
    """d_kernel + h_jᵀ · gc, on XLA:CPU with 16-bit inputs one block of rows at a time."""
    if not lay.bits:
      return d_kernel + jnp.dot(h.T, gc, preferred_element_type=jnp.float32)
    ht_j = jax.lax.dynamic_index_in_dim(ht_bits, j, 0, keepdims=False)  # [blocks, rows, C]

    def block(b, d_kernel):
      ht = lay.from_bits(jax.lax.dynamic_index_in_dim(ht_j, b, 0, keepdims=False), compute)
      part = jax.lax.dynamic_slice_in_dim(d_kernel, b * rows, rows, axis=0)
      part = part + jnp.dot(ht, gc, preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(d_kernel, part, b * rows, axis=0)
    return jax.lax.fori_loop(0, lay.blocks, block, d_kernel)

  def body(carry, xs):
    j, t_chunk, y, ok, w = xs
    h = chunk_of(h_bits, j, compute)
    zs = _logits(h, kernel, bias)
    tc = teacher_logits(j, t_chunk)
    stats = _chunk_terms(spec, zs, tc, y)
    w = _local_weights(spec, stats) if w is None else w
    stats["weights"] = jnp.where(ok, w, 0.0)
    if not grads:
      return carry, stats
    g = jnp.zeros_like(zs)
    if spec.kd_weight > 0:
      c = spec.kd_weight * spec.temperature**2 * stats["weights"] / kept
      g = g + c[:, None] * _chunk_grad(spec, zs, tc)
    if spec.ce_weight > 0:
      g = g + (spec.ce_weight / kept) * _lm_chunk.ce_grad(zs, stats["student_lse"], y)
    g = jnp.where(ok[:, None], g, 0.0)
    d_kernel, d_bias, d_hidden = carry
    gc = g.astype(compute)
    kt = kernel_t if lay.bits else kernel.astype(compute).T  # else folded into the matmul
    dh = jnp.dot(gc, kt, preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_hidden = jax.lax.dynamic_update_index_in_dim(d_hidden, lay.to_bits(dh), j, axis=1)
    return (accumulate(d_kernel, h, j, gc), d_bias + jnp.sum(g, axis=0), d_hidden), stats

  xs = (jnp.arange(n), t_xs, labels, valid, weights)
  carry = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(kernel.shape[1:], jnp.float32),
           lay.to_bits(jnp.zeros(hidden.shape, hidden.dtype)))
  carry, stats = jax.lax.scan(body, carry if grads else (), xs)
  if not grads:
    return stats, None
  d_kernel, d_bias, d_hidden = carry
  return stats, (lay.from_bits(d_hidden, hidden.dtype), d_kernel.astype(kernel.dtype),
                 None if bias is None else d_bias.astype(bias.dtype))


def _loss(spec, stats, valid, kept):
  """ce_weight · (1/N) Σ_where CE + kd_weight · τ² · (1/N) Σ_where w_i D_i, N = kept."""
  total = 0.0
  if spec.kd_weight > 0:
    kd = jnp.where(valid, stats["weights"] * stats["divergence"], 0.0)
    total = total + spec.kd_weight * spec.temperature**2 * jnp.sum(kd) / kept
  if spec.ce_weight > 0:
    ce = jnp.where(valid, -stats["student_logp_label"], 0.0)
    total = total + spec.ce_weight * jnp.sum(ce) / kept
  return jnp.asarray(total, jnp.float32)


def _user_weights(spec, stats, valid):
  """A weighting function's weights `[n, C]` from the statistics in the leading shape."""
  shaped = {k: from_chunks(v, spec) for k, v in stats.items() if k != "weights"}
  w = jnp.asarray(spec.weighting(shaped), jnp.float32)
  if w.shape != spec.lead_shape:
    raise ValueError(f"the weighting function must return weights of the tokens' shape "
                     f"{spec.lead_shape}, got {w.shape}.")
  return jnp.where(valid, to_chunks(jax.lax.stop_gradient(w).reshape(-1), spec), 0.0)


def _forward(spec, student, teacher, labels, valid, kept, *, grads):
  weights = None
  if callable(spec.weighting):
    stats, _ = _pass(spec, student, teacher, labels, valid, kept, None, grads=False)
    weights = _user_weights(spec, stats, valid)
    if not grads:
      stats["weights"] = weights
      return (_loss(spec, stats, valid, kept), stats), None
  stats, d = _pass(spec, student, teacher, labels, valid, kept, weights, grads=grads)
  return (_loss(spec, stats, valid, kept), stats), d


def _fused_primal(spec, student, teacher, labels, valid, kept):
  return _forward(spec, student, teacher, labels, valid, kept, grads=False)[0]


def _fused_fwd(spec, student, teacher, labels, valid, kept):
  return _forward(spec, student, teacher, labels, valid, kept, grads=True)


def _fused_bwd(spec, d, cotangents):
  # The loss is a scalar, so its gradient is the forward's, scaled by the incoming cotangent.
  # The statistics are returned without gradient (the caller stops it): their cotangents are
  # zero. The teacher, labels and mask get none.
  del spec
  g = cotangents[0]
  return jax.tree.map(lambda x: (g * x).astype(x.dtype), d), None, None, None, None


fused = jax.custom_vjp(_fused_primal, nondiff_argnums=(0,))
fused.defvjp(_fused_fwd, _fused_bwd)

