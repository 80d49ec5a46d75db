"""Pure, jit-able language-model steps: a teacher's next-token CE, distillation, evaluation.

    tx, schedule = make_optimizer(3e-4, warmup_steps=100, total_steps=2000)
    state = init_state(model, tx, jax.random.key(0), seq_len=128)
    step = jax.jit(functools.partial(teacher_step, model=model, tx=tx), donate_argnums=0)
    state, metrics = step(state, batch)            # batch: text_loader's tokens/targets/mask
    cfg = DistillConfig(method="erkd", temperature=1.0)
    step = jax.jit(functools.partial(distill_step, student=s, teacher=t, tx=tx, cfg=cfg),
                   donate_argnums=0)
    state, metrics = step(state, teacher_params, batch)
    sums = eval_sums(params, batch, model=s, teacher=t, teacher_params=tp, cfg=cfg)

No I/O, no data, no config: everything a step needs is in its arguments, and nothing of
shape [B, L, V] is ever materialised in training. Over the N tokens the mask keeps:

- **Teacher** (`teacher_loss`): L = (1/N) Σ_i −log softmax(h_i W + b)_{y_i}, by
  `chunked_cross_entropy`: a scan over chunks of C tokens whose body (the [C, V] logits, their
  log-sum-exp and the label's logit) is rematerialised in the backward pass, so memory is
  O(C · V) and the matmul work 4·N·V·H (forward, recompute, two gradients). Not
  `jaxkd.lm.distill_loss` with kd_weight = 0: that still needs a teacher and sweeps its
  [C, V] logits for statistics the CE does not use.
- **Distillation** (`distill_loss_fn`): `jaxkd.lm.distill_loss` of the student's hidden
  states and lm_head against the frozen teacher's (its forward under `stop_gradient`), with
  `where` = the loss mask and labels = the targets:
  L = ce_weight · mean CE + kd_weight · τ² · (1/N) Σ_i w_i · KL_i(τ), w_i = 1 (kd, Hinton et
  al., 2015), H_t,i(τ′) (erkd, "entropy", Su et al., arXiv 2311.13621 v1) or
  ½ H_t,i(τ′)(1 + H_s,i(τ′)/ln V) (eakd, "adaptive_entropy", v2/v3, ICCV 2025).
- **Evaluation** (`eval_sums`): sums over the kept tokens, for exact means over any number
  of batches: NLL, top-1 hits, the token count; with a teacher, KL(p_t ‖ p_s) at τ = 1 and,
  by the teacher's entropy H_t at τ = 1 in `num_buckets` equal bins of [0, ln V], the tokens,
  the student's NLL and the method's weights w_i per bin.

Optimiser (`make_optimizer`): AdamW (Loshchilov & Hutter, ICLR 2019) with a linear warm-up
and cosine decay to `end_ratio` · lr, weight decay on matrices only (not on norm scales),
global-norm clipping: the usual recipe for GPT-style models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import lm

__all__ = ["DistillConfig", "LMState", "METHODS", "chunked_cross_entropy", "distill_loss_fn",
           "distill_step", "eval_sums", "init_state", "make_optimizer", "teacher_loss",
           "teacher_step"]

METHODS = {"kd": None, "erkd": "entropy", "eakd": "adaptive_entropy"}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The distillation objective (hashable: a static argument of the jitted step).

  Attributes:
    method: "kd", "erkd" or "eakd" (`METHODS`).
    temperature: τ of the KL.
    weighting_temperature: τ′ of the entropies (None: τ).
    ce_weight, kd_weight: the two terms' factors.
    divergence: "forward_kl" (the papers'), "reverse_kl" or "jsd" (`jaxkd.lm`).
    chunk_size: tokens per chunk of the fused loss.
  """
  method: str = "kd"
  temperature: float = 1.0
  weighting_temperature: float | None = None
  ce_weight: float = 0.0
  kd_weight: float = 1.0
  divergence: str = "forward_kl"
  chunk_size: int = 1024

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}.")

  @property
  def weighting(self) -> str | None:
    return METHODS[self.method]


@flax.struct.dataclass
class LMState:
  """step (int32 scalar), params (the model's float32 parameters), opt_state."""
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(lr: float, *, warmup_steps: int, total_steps: int,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   clip_norm: float = 1.0, end_ratio: float = 0.1
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warm-up + cosine decay, decay on ≥ 2-D parameters, gradient clipping."""
  if not lr > 0:
    raise ValueError(f"lr must be positive, got {lr!r}.")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps must lie in [0, total_steps = {total_steps}), got "
                     f"{warmup_steps!r}.")
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps,
                                                end_value=lr * end_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                   optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                               mask=decay_mask))
  return tx, schedule


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               seq_len: int = 8) -> LMState:
  """Fresh parameters (float32) from `model.init` on zeros [1, seq_len], and their
  optimizer state."""
  params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return LMState(jnp.zeros((), jnp.int32), params, tx.init(params))


def _forward(model, params, tokens):
  """(hidden [B, L, H], kernel [H, V], bias or None) of `model` with `params`."""
  variables = {"params": params}
  kernel, bias = model.apply(variables, method="head")
  return model.apply(variables, tokens), kernel, bias


def _chunks(x, chunk, fill):
  """[N, ...] -> [ceil(N / chunk), chunk, ...], the tail filled with `fill`."""
  n = x.shape[0]
  pad = -n % chunk
  if pad:
    x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
  return x.reshape(-1, chunk, *x.shape[1:])


def chunked_cross_entropy(hidden, kernel, bias, labels, where, *, chunk_size: int = 1024):
  """(Σ_i where_i · CE_i, Σ_i where_i) with CE_i = −log softmax(h_i W + b)_{y_i}, float32.

  Args:
    hidden: `[..., H]`; kernel `[H, V]`; bias `[V]` or None.
    labels: integer `[...]`; where: boolean `[...]` (excluded tokens reach neither the sum
      nor any gradient: their hidden states are zeroed first).
    chunk_size: C, tokens per chunk; memory O(C · V).
  """
  h = hidden.reshape(-1, hidden.shape[-1])
  keep = where.reshape(-1)
  h = jnp.where(keep[:, None], h, jnp.zeros((), h.dtype))
  chunk = max(1, min(int(chunk_size), h.shape[0]))
  hs, ys, ks = (_chunks(h, chunk, 0), _chunks(labels.reshape(-1).astype(jnp.int32), chunk, 0),
                _chunks(keep, chunk, False))

  @jax.checkpoint
  def one(h_c, y_c, k_c):
    z = jnp.einsum("nh,hv->nv", h_c, kernel, preferred_element_type=jnp.float32)
    if bias is not None:
      z = z + bias.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(z - m), axis=-1)) + m[:, 0]
    z_y = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(k_c, lse - z_y, 0.0))

  def body(total, xs):
    return total + one(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ys, ks))
  return total, jnp.sum(keep).astype(jnp.float32)


def teacher_loss(params, batch, *, model: nn.Module, chunk_size: int = 1024):
  """The mean next-token CE over the batch's kept tokens (and that count)."""
  hidden, kernel, bias = _forward(model, params, batch["tokens"])
  total, count = chunked_cross_entropy(hidden, kernel, bias, batch["targets"], batch["mask"],
                                       chunk_size=chunk_size)
  return total / jnp.maximum(count, 1.0), count


def _apply(state, grads, tx):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return LMState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


def teacher_step(state: LMState, batch: dict, *, model: nn.Module,
                 tx: optax.GradientTransformation, chunk_size: int = 1024):
  """One AdamW step on the CE; metrics {loss, tokens, grad_norm}."""
  (loss, count), grads = jax.value_and_grad(teacher_loss, has_aux=True)(
      state.params, batch, model=model, chunk_size=chunk_size)
  metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}
  return _apply(state, grads, tx), metrics


def distill_loss_fn(params, teacher_params, batch, *, student: nn.Module,
                    teacher: nn.Module, cfg: DistillConfig, return_stats: bool = False):
  """`jaxkd.lm.distill_loss` of the student (`params`) against the frozen teacher."""
  t_hidden, t_kernel, t_bias = jax.lax.stop_gradient(
      _forward(teacher, teacher_params, batch["tokens"]))
  hidden, kernel, bias = _forward(student, params, batch["tokens"])
  return lm.distill_loss(hidden, kernel, t_hidden, t_kernel, batch["targets"],
                         temperature=cfg.temperature, divergence=cfg.divergence,
                         weighting=cfg.weighting,
                         weighting_temperature=cfg.weighting_temperature,
                         ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight,
                         where=batch["mask"], student_bias=bias, teacher_bias=t_bias,
                         chunk_size=cfg.chunk_size, return_stats=return_stats)


def distill_step(state: LMState, teacher_params, batch: dict, *, student: nn.Module,
                 teacher: nn.Module, tx: optax.GradientTransformation, cfg: DistillConfig):
  """One AdamW step of the student; metrics {loss, ce, kl, weight_mean, tokens, grad_norm}
  (ce and kl: token means of the student's CE and of the divergence at τ)."""
  def loss_fn(p):
    return distill_loss_fn(p, teacher_params, batch, student=student, teacher=teacher,
                           cfg=cfg, return_stats=True)
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  keep = batch["mask"]
  count = jnp.sum(keep).astype(jnp.float32)
  mean = lambda v: jnp.sum(jnp.where(keep, v, 0.0)) / jnp.maximum(count, 1.0)
  metrics = {"loss": loss, "ce": -mean(stats["student_logp_label"]),
             "kl": mean(stats["divergence"]), "weight_mean": mean(stats["weights"]),
             "tokens": count, "grad_norm": optax.tree.norm(grads)}
  return _apply(state, grads, tx), metrics


def _log_softmax_stats(z, y):
  """(log-probs [n, V], log p(y) [n]) of float32 logits z."""
  logp = jax.nn.log_softmax(z, axis=-1)
  return logp, jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def eval_sums(params, batch, *, model: nn.Module, teacher: nn.Module | None = None,
              teacher_params=None, cfg: DistillConfig | None = None, num_buckets: int = 8,
              chunk_size: int = 1024) -> dict:
  """Sums over the batch's kept tokens (no gradient), to add up over an eval pass.

  Returns float32 {"nll", "hits", "tokens"}, and with a teacher also {"kl" (Σ KL(p_t ‖ p_s)
  at τ = 1), "bucket_tokens", "bucket_nll", "bucket_weight"} ([num_buckets] each, by the
  teacher's entropy at τ = 1 in equal bins of [0, ln V]; the weights are `cfg`'s method's,
  from `jaxkd.lm.distill_loss`'s statistics). Perplexity = exp(nll / tokens).
  """
  keep = batch["mask"].reshape(-1)
  hidden, kernel, bias = _forward(model, params, batch["tokens"])
  vocab = kernel.shape[1]
  flat = lambda x: x.reshape(-1, x.shape[-1])
  xs = {"h": flat(hidden), "y": batch["targets"].reshape(-1).astype(jnp.int32)}
  if teacher is not None:
    t_hidden, t_kernel, t_bias = _forward(teacher, teacher_params, batch["tokens"])
    xs["t"] = flat(t_hidden)
  chunk = max(1, min(int(chunk_size), keep.shape[0]))
  chunks = {k: _chunks(v, chunk, 0) for k, v in xs.items()}

  def logits(h, w, b):
    z = jnp.einsum("nh,hv->nv", h, w, preferred_element_type=jnp.float32)
    return z if b is None else z + b.astype(jnp.float32)

  def one(c):
    logp, logp_y = _log_softmax_stats(logits(c["h"], kernel, bias), c["y"])
    out = {"nll": -logp_y, "hit": jnp.argmax(logp, -1) == c["y"]}
    if teacher is not None:
      logq = jax.nn.log_softmax(logits(c["t"], t_kernel, t_bias), axis=-1)
      q = jnp.exp(logq)
      out["kl"] = jnp.sum(q * (logq - logp), -1)
      out["h_t"] = -jnp.sum(q * logq, -1)
    return out

  per = jax.tree.map(lambda v: v.reshape(-1)[:keep.shape[0]], jax.lax.map(one, chunks))
  masked = lambda v: jnp.where(keep, v.astype(jnp.float32), 0.0)
  out = {"nll": jnp.sum(masked(per["nll"])), "hits": jnp.sum(masked(per["hit"])),
         "tokens": jnp.sum(keep).astype(jnp.float32)}
  if teacher is None:
    return jax.lax.stop_gradient(out)
  cfg = cfg or DistillConfig()
  _, stats = distill_loss_fn(params, teacher_params, batch, student=model, teacher=teacher,
                             cfg=cfg, return_stats=True)
  bucket = jnp.clip(jnp.floor(per["h_t"] / math.log(vocab) * num_buckets), 0,
                    num_buckets - 1).astype(jnp.int32)
  onehot = jax.nn.one_hot(bucket, num_buckets, dtype=jnp.float32) * keep[:, None]
  out.update(kl=jnp.sum(masked(per["kl"])), bucket_tokens=jnp.sum(onehot, 0),
             bucket_nll=onehot.T @ masked(per["nll"]),
             bucket_weight=onehot.T @ stats["weights"].reshape(-1).astype(jnp.float32))
  return jax.lax.stop_gradient(out)
