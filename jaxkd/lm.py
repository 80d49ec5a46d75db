"""Reweighted distillation at language-model scale: the lm_head and the KD loss fused, in chunks.

`distill_loss` takes the student's and the teacher's final hidden states and their lm_head
kernels and returns the per-token reweighted distillation loss without ever holding the
`[N, V]` logits: it walks the tokens in chunks of `chunk_size`, and for each chunk forms the
`[chunk, V]` logits of both models, every per-token statistic the weightings need (entropies,
log-sum-exps, label log-probabilities, the divergence) and, when differentiated, the gradient of
the loss with respect to the chunk's student logits, which it turns at once into the chunk's
share of the hidden-state, kernel and bias gradients. Memory is O(chunk × V) whatever N is.

The gradient is computed inside the forward pass (a `jax.custom_vjp` whose forward returns it
as the residual), so a training step multiplies each lm_head once per direction: the matmul
work is 2·N·V·(H_t + 3·H_s), the floor for this loss. Weights computed from the chunk's own
statistics (ER-KD, EA-KD, none) need one pass; a user weighting given as a function of all the
tokens' statistics needs two (statistics, then gradients with the weights known).

`distill_loss_topk` is the same loss against a sparse teacher stored offline as its top-k
log-probabilities per token (docs/METHODS.md#language-models describes both).

Imports nothing of jaxkd but the private chunk math: copy `lm.py` and `_lm_chunk.py` to use it
elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _lm_chunk, _lm_pass

__all__ = ["DIVERGENCES", "WEIGHTINGS", "distill_loss", "distill_loss_topk"]

Array = Any
DIVERGENCES = _lm_chunk.DIVERGENCES
WEIGHTINGS = (None, "entropy", "adaptive_entropy")


# --------------------------------------------------------------------------------------------
# Input checks (trace time, shapes and Python scalars only).


def _check_number(value, name, low, high, *, open_low=False):
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}.") from None
  if not (low < v if open_low else low <= v) or not v <= high:
    bounds = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
    raise ValueError(f"{name} must lie in {bounds}, got {value!r}.")
  return v


def _check_hidden(hidden, kernel, name, vocab=None):
  hidden, kernel = jnp.asarray(hidden), jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"{name}_kernel must be [H, V] (a Dense kernel), got shape {kernel.shape}.")
  if hidden.ndim < 1 or hidden.shape[-1] != kernel.shape[0]:
    raise ValueError(f"{name}_hidden [..., H] must end in the kernel's H = {kernel.shape[0]}, "
                     f"got shape {hidden.shape} against {name}_kernel {kernel.shape}.")
  if vocab is not None and kernel.shape[1] != vocab:
    raise ValueError(f"{name}_kernel has V = {kernel.shape[1]} but the student's has V = "
                     f"{vocab}: both heads must share one vocabulary.")
  for dtype, what in ((hidden.dtype, "hidden"), (kernel.dtype, "kernel")):
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{name}_{what} must be floating point, got {dtype}.")
  return hidden, kernel


def _check_leading(x, lead, name, kind):
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.shape != lead:
    raise ValueError(f"{name} must have the hidden states' leading shape {lead}, got {x.shape}.")
  if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must hold integer token ids, got {x.dtype}.")
  if kind == "bool" and x.dtype != jnp.bool_:
    raise ValueError(f"{name} must be boolean (True = the token counts), got {x.dtype}.")
  return x


def _check_bias(bias, vocab, name):
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  if bias.shape != (vocab,):
    raise ValueError(f"{name} must be [V] = ({vocab},), got shape {bias.shape}.")
  return bias


def _make_spec(lead, vocab, chunk_size, *, temperature, divergence, beta, weighting,
               weighting_temperature, entropy_upper_bound, ce_weight, kd_weight, labels,
               sparse) -> _lm_pass.Spec:
  temperature = _check_number(temperature, "temperature", 0.0, math.inf, open_low=True)
  if temperature == math.inf:
    raise ValueError("temperature must be finite.")
  beta = _check_number(beta, "beta", 0.0, 1.0)
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
  if not (weighting in WEIGHTINGS or callable(weighting)):
    raise ValueError(f"weighting must be one of {WEIGHTINGS} or a function of the per-token "
                     f"statistics, got {weighting!r}.")
  tau = temperature if weighting_temperature is None else _check_number(
      weighting_temperature, "weighting_temperature", 0.0, 1e30, open_low=True)
  h_ub = math.log(vocab) if entropy_upper_bound is None else _check_number(
      entropy_upper_bound, "entropy_upper_bound", 0.0, math.inf, open_low=True)
  if weighting == "adaptive_entropy" and h_ub == 0:
    raise ValueError("adaptive_entropy needs V ≥ 2 for its default H_ub = ln V.")
  ce_weight = _check_number(ce_weight, "ce_weight", 0.0, math.inf)
  kd_weight = _check_number(kd_weight, "kd_weight", 0.0, math.inf)
  if ce_weight > 0 and labels is None:
    raise ValueError("ce_weight > 0 needs labels (the next-token ids).")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}.")
  num_chunks, chunk = _lm_pass.layout(math.prod(lead), int(chunk_size))
  return _lm_pass.Spec(tuple(lead), num_chunks, chunk, temperature, tau,
               _lm_chunk.kind_of(divergence, beta), beta, weighting, h_ub, ce_weight, kd_weight,
               sparse)



# --------------------------------------------------------------------------------------------
# Public API.

_LOSS_DOC = """
  The loss (the same for the dense and the top-k teacher):

    L = ce_weight · (1/N) Σ_i CE_i  +  kd_weight · τ² · (1/N) Σ_i w_i · D_i(τ)

  over the N tokens that `where` keeps, with
    CE_i = −log softmax(h^s_i W_s + b_s)_{y_i}                       (temperature 1)
    D_i(τ) = the divergence between p_t = softmax(z^t_i/τ) and p_s = softmax(z^s_i/τ):
      forward_kl  KL(p_t ‖ p_s)            (Hinton et al., 2015)
      reverse_kl  KL(p_s ‖ p_t)            (MiniLLM, Gu et al., ICLR 2024)
      jsd         β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m), m = β p_t + (1 − β) p_s
                  (generalized JSD, Agarwal et al., ICLR 2024); β = 0 and β = 1 are taken
                  as its limits, forward and reverse KL
    w_i = 1 (weighting=None);
          H(softmax(z^t_i/τ′))                                     ("entropy", ER-KD,
            Su et al., arXiv 2311.13621 v1);
          ½ H_t,i(τ′) · (1 + H_s,i(τ′)/H_ub), H_ub = ln V by default ("adaptive_entropy",
            EA-KD, Su et al., arXiv 2311.13621 v2/v3, ICCV 2025);
          or weighting(stats) for a function of the per-token statistics (below).
  τ′ = weighting_temperature (τ by default). Weights never carry gradient, the teacher gets
  none, and excluded tokens reach neither the value nor any gradient.

  Statistics (`return_stats=True`: a dict of float32 arrays of the tokens' shape `[...]`,
  without gradient; a weighting function receives the same dict without "weights"):
    divergence          D_i(τ), the chosen divergence
    teacher_entropy     H(p_t) at τ′           student_entropy     H(p_s) at τ′
    student_lse         log Σ_v exp(z^s_iv)    student_logp_label  log p_s(y_i) at 1
    teacher_lse         (dense only) log Σ_v exp(z^t_iv)
    teacher_logp_label  log p_t(y_i) at 1
    weights             w_i (0 on excluded tokens)
  The label entries are meaningful only when labels are given (otherwise id 0 stands in).
"""


def _prepare(student_hidden, student_kernel, labels, where, student_bias):
  hidden, kernel = _check_hidden(student_hidden, student_kernel, "student")
  lead = hidden.shape[:-1]
  vocab = kernel.shape[1]
  labels = _check_leading(labels, lead, "labels", "int")
  where = _check_leading(where, lead, "where", "bool")
  bias = _check_bias(student_bias, vocab, "student_bias")
  return hidden, kernel, bias, lead, vocab, labels, where


def _chunked(spec, flat, kernel, bias, tokens, fills, head, y, valid, kept):
  """The fused pass over `[N, ...]` token arrays; statistics back as `[N]`."""
  # Hidden states stay in token order ([C, n, H], a reshape); the rest goes chunk-major.
  lay = _lm_pass.to_chunks if spec.sparse else _lm_pass.to_strided
  chunked = tuple(lay(t, spec, f) for t, f in zip(tokens, fills)) + tuple(head)
  loss, stats = _lm_pass.fused(spec, (_lm_pass.to_strided(flat, spec), kernel, bias), chunked,
                               _lm_pass.to_chunks(y, spec), _lm_pass.to_chunks(valid, spec, False),
                               kept)
  return loss, {k: _lm_pass.from_chunks(v, spec).reshape(-1) for k, v in stats.items()}


def _token_axes(token_sharding, num_tokens):
  """(mesh, axis names, shard count) of the tokens' sharding, checked."""
  if not isinstance(token_sharding, jax.sharding.NamedSharding):
    raise ValueError(f"token_sharding must be a jax.sharding.NamedSharding whose spec shards "
                     f"the tokens' leading axis, got {token_sharding!r}.")
  axes = token_sharding.spec[0] if len(token_sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  if not axes:
    raise ValueError(f"token_sharding {token_sharding.spec} does not shard the leading axis; "
                     f"use e.g. NamedSharding(mesh, PartitionSpec('data')).")
  shards = math.prod(token_sharding.mesh.shape[a] for a in axes)
  if num_tokens % shards:
    raise ValueError(f"token_sharding splits the tokens over {shards} devices, but N = "
                     f"{num_tokens} tokens is not a multiple of {shards}: pad the batch.")
  return token_sharding.mesh, axes, shards


def _run(spec, hidden, kernel, bias, teacher_tokens, teacher_head, labels, where,
         return_stats, token_sharding, chunk_size):
  """Flattens and masks the tokens, runs the fused pass (per device with `token_sharding`),
  and returns the loss and, if asked, the statistics in the tokens' shape."""
  valid = jnp.ones(spec.num_tokens, bool) if where is None else where.reshape(-1)
  flat = hidden.reshape(-1, hidden.shape[-1])
  # Excluded rows are zeroed so that whatever they held (NaN, inf) reaches no chunk's logits.
  flat = jnp.where(valid[:, None], flat, jnp.zeros((), flat.dtype))
  y = jnp.zeros(spec.num_tokens, jnp.int32) if labels is None else labels.reshape(-1)
  y = jnp.where(valid, y, 0).astype(jnp.int32)
  tokens = tuple(t for t, _ in teacher_tokens)
  fills = tuple(f for _, f in teacher_tokens)
  if token_sharding is None:
    kept = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    loss, stats = _chunked(spec, flat, kernel, bias, tokens, fills, teacher_head, y, valid,
                           kept)
  else:
    mesh, axes, shards = _token_axes(token_sharding, spec.num_tokens)
    local_spec = _lm_pass.with_tokens(spec, (spec.num_tokens // shards,), chunk_size)

    def local(flat, kernel, bias, tokens, head, y, valid):
      kept = jnp.maximum(jax.lax.psum(jnp.sum(valid), axes), 1).astype(jnp.float32)
      loss, stats = _chunked(local_spec, flat, kernel, bias, tokens, fills, head, y, valid,
                             kept)
      return loss[None], stats
    rows, whole = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()
    # Each device walks its own tokens and returns its share of the loss; the kernel is
    # replicated, so its gradient is summed over devices once, when the shard_map transposes.
    parts, stats = jax.shard_map(
        local, mesh=mesh, in_specs=(rows, whole, whole, rows, whole, rows, rows),
        out_specs=(rows, rows), check_vma=False)(flat, kernel, bias, tokens,
                                                 tuple(teacher_head), y, valid)
    loss = jnp.sum(parts)
  if not return_stats:
    return loss
  return loss, {k: jax.lax.stop_gradient(v.reshape(spec.lead_shape)) for k, v in stats.items()}


def distill_loss(student_hidden: Array, student_kernel: Array, teacher_hidden: Array,
                 teacher_kernel: Array, labels: Array | None = None, *,
                 temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                 weighting: str | Callable | None = None,
                 weighting_temperature: float | None = None,
                 entropy_upper_bound: float | None = None,
                 ce_weight: float = 0.0, kd_weight: float = 1.0, where: Array | None = None,
                 student_bias: Array | None = None, teacher_bias: Array | None = None,
                 chunk_size: int = 1024, return_stats: bool = False,
                 token_sharding: jax.sharding.NamedSharding | None = None):
  """The lm_head and a per-token reweighted KD loss, fused, chunked over tokens.

  Args:
    student_hidden: `[..., Hs]` final hidden states (any float dtype; bf16 typical).
    student_kernel: `[Hs, V]` the student's lm_head (a flax Dense kernel; for a tied head,
      the embedding matrix transposed).
    teacher_hidden: `[..., Ht]`, the same leading shape; frozen (no gradient).
    teacher_kernel: `[Ht, V]`, the same V.
    labels: integer `[...]` next-token ids, for the CE term and the label statistics.
    temperature: τ > 0 of the divergence.
    divergence: "forward_kl", "reverse_kl" or "jsd".
    beta: β in [0, 1] of "jsd".
    weighting: None, "entropy", "adaptive_entropy", or a function `stats -> [...]` weights.
    weighting_temperature: τ′ > 0 of the entropies; None means τ.
    entropy_upper_bound: H_ub > 0 of "adaptive_entropy"; None means ln V.
    ce_weight, kd_weight: ≥ 0, the two terms' factors.
    where: boolean `[...]`, the tokens that count (padding and prompt masking), or None.
    student_bias, teacher_bias: `[V]` or None.
    chunk_size: tokens per chunk, C. Memory is O(C · V) float32 per live temporary; N need
      not be a multiple of C (the tokens are spread evenly over ⌈N / C⌉ chunks).
    return_stats: also return the per-token statistics.
    token_sharding: None, or the `NamedSharding` of the tokens' leading axis (e.g.
      `NamedSharding(mesh, PartitionSpec("data"))`, N a multiple of its device count): each
      device then walks only its own tokens, in chunks of `chunk_size`, and the kernel
      gradient is summed over devices once instead of once per chunk. A weighting function
      then sees one device's tokens at a time, flattened. Without it, sharded tokens still
      give the same value (GSPMD), each chunk spanning all devices.

  Returns:
    float32 scalar loss, and with `return_stats` the statistics dict.
  """ + _LOSS_DOC + """
  Matmuls take the inputs' dtype and accumulate in float32; every softmax, entropy and
  divergence is float32; the kernel gradient accumulates over chunks in float32. Pass the
  teacher's arrays as arguments of the jitted function, not as closure constants: XLA would
  try to constant-fold the teacher's `[chunk, V]` logits at compile time (minutes).
  """
  hidden, kernel, bias, lead, vocab, labels, where = _prepare(
      student_hidden, student_kernel, labels, where, student_bias)
  t_hidden, t_kernel = _check_hidden(teacher_hidden, teacher_kernel, "teacher", vocab)
  if t_hidden.shape[:-1] != lead:
    raise ValueError(f"teacher_hidden must have the student's leading shape {lead}, got "
                     f"{t_hidden.shape[:-1]} (shape {t_hidden.shape}).")
  t_bias = _check_bias(teacher_bias, vocab, "teacher_bias")
  spec = _make_spec(lead, vocab, chunk_size, temperature=temperature, divergence=divergence,
                    beta=beta, weighting=weighting, weighting_temperature=weighting_temperature,
                    entropy_upper_bound=entropy_upper_bound, ce_weight=ce_weight,
                    kd_weight=kd_weight, labels=labels, sparse=False)
  t_flat = jax.lax.stop_gradient(t_hidden.reshape(-1, t_hidden.shape[-1]))
  if where is not None:
    t_flat = jnp.where(where.reshape(-1)[:, None], t_flat, jnp.zeros((), t_flat.dtype))
  head = jax.lax.stop_gradient((t_kernel, t_bias))
  return _run(spec, hidden, kernel, bias, [(t_flat, 0)], head, labels, where, return_stats,
              token_sharding, chunk_size)


def distill_loss_topk(student_hidden: Array, student_kernel: Array, teacher_topk_ids: Array,
                      teacher_topk_logprobs: Array, labels: Array | None = None, *,
                      temperature: float = 1.0, divergence: str = "forward_kl",
                      beta: float = 0.5, weighting: str | Callable | None = None,
                      weighting_temperature: float | None = None,
                      entropy_upper_bound: float | None = None, ce_weight: float = 0.0,
                      kd_weight: float = 1.0, where: Array | None = None,
                      student_bias: Array | None = None, chunk_size: int = 1024,
                      return_stats: bool = False,
                      token_sharding: jax.sharding.NamedSharding | None = None):
  """`distill_loss` against a sparse teacher stored offline as its top-k log-probabilities.

  Args:
    teacher_topk_ids: integer `[..., k]`, the teacher's k stored classes per token, distinct
      within a token. An id outside [0, V) (e.g. −1 padding a shorter list) stands for no
      class: its stored probability is counted in the tail bin.
    teacher_topk_logprobs: `[..., k]` the teacher's log-probabilities of those classes at
      temperature 1 (log softmax of its logits, not renormalised over the k).
    Other arguments as `distill_loss`.

  The divergence is taken over k + 1 bins: the k stored classes and one tail bin holding the
  rest of the vocabulary. The teacher's tail mass is exact, r = 1 − Σ_k p_t (clamped at 0, and
  dropped when the k ids cover the whole vocabulary); the student's bins are exact too, its
  tail log Σ_{v ∉ ids} p_s,v computed over the full vocabulary in the same chunked pass. At a
  temperature τ the teacher's bins are softened as a distribution over the bins,
  p_j(τ) ∝ p_j^{1/τ}: exact for τ = 1 (and for any τ when the ids cover the vocabulary), and
  otherwise treating the tail as one class, since the stored outputs do not say how its mass is
  spread. "teacher_entropy" is that of the bins at τ′; "teacher_logp_label" is the stored
  log-probability when the label is among the ids, else the tail's (an upper bound); there is
  no "teacher_lse". With k = V this is `distill_loss` exactly.
  """ + _LOSS_DOC
  hidden, kernel, bias, lead, vocab, labels, where = _prepare(
      student_hidden, student_kernel, labels, where, student_bias)
  ids = _check_leading_k(teacher_topk_ids, lead, "teacher_topk_ids", vocab, integer=True)
  logprobs = _check_leading_k(teacher_topk_logprobs, lead, "teacher_topk_logprobs", vocab,
                              integer=False)
  if ids.shape != logprobs.shape:
    raise ValueError(f"teacher_topk_ids {ids.shape} and teacher_topk_logprobs "
                     f"{logprobs.shape} must have the same shape [..., k].")
  spec = _make_spec(lead, vocab, chunk_size, temperature=temperature, divergence=divergence,
                    beta=beta, weighting=weighting, weighting_temperature=weighting_temperature,
                    entropy_upper_bound=entropy_upper_bound, ce_weight=ce_weight,
                    kd_weight=kd_weight, labels=labels, sparse=True)
  k = ids.shape[-1]
  ids = jax.lax.stop_gradient(ids.reshape(-1, k).astype(jnp.int32))
  logprobs = jax.lax.stop_gradient(logprobs.reshape(-1, k).astype(jnp.float32))
  return _run(spec, hidden, kernel, bias, [(ids, -1), (logprobs, 0)], (), labels, where,
              return_stats, token_sharding, chunk_size)


def _check_leading_k(x, lead, name, vocab, *, integer):
  x = jnp.asarray(x)
  if x.ndim != len(lead) + 1 or x.shape[:-1] != lead:
    raise ValueError(f"{name} must be [..., k] with the hidden states' leading shape {lead}, "
                     f"got {x.shape}.")
  if not 1 <= x.shape[-1] <= vocab:
    raise ValueError(f"{name} must hold 1 ≤ k ≤ V = {vocab} classes per token, got "
                     f"k = {x.shape[-1]}.")
  if integer != jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be {'integer' if integer else 'floating point'}, got "
                     f"{x.dtype}.")
  return x
