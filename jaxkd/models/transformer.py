"""Causal decoder-only transformers for language-model distillation, and their registry.

    model = transformer.create_lm("lm_student_cpu", vocab_size=8192, dtype=jnp.bfloat16)
    variables = model.init(rng, tokens)                       # tokens int32 [B, L]
    hidden = model.apply(variables, tokens)                   # [B, L, H], final-normed
    kernel, bias = model.apply(variables, method="head")      # [H, V], None (no bias)
    loss = jaxkd.lm.distill_loss(hidden, kernel, t_hidden, t_kernel, ...)  # no [B, L, V]
    logits = model.apply(variables, tokens, method="logits")  # [B, L, V] float32 (eval, tests)

The layout (one block, x the residual stream [B, L, H]):

    x = x + W_o · Attention(RoPE(W_q · n1(x)), RoPE(W_k · n1(x)), W_v · n1(x))   (causal)
    x = x + W_2 · GELU(W_1 · n2(x))                                              (4H wide)
    hidden = n_f(x) after the last block;   logits = hidden · W_head (+ b_head)

Choices, and why:
- **Pre-norm with RMSNorm** (Zhang & Sennrich, NeurIPS 2019): n(x) = x / sqrt(mean(x²) + ε)
  · g, computed in float32. Pre-norm keeps the residual path an identity, so gradients stay
  well scaled at depth and training is far less sensitive to the warm-up (Xiong et al.,
  ICML 2020); RMSNorm drops LayerNorm's mean-centring and bias at no loss in quality (Zhang
  & Sennrich) and is the norm of the current open LM families.
- **RoPE** positions (Su et al., "RoFormer", 2021; the rotate-half pairing of GPT-NeoX):
  relative, no position table, so the registry's sizes need no maximum length and a model
  trained on L = 128 runs on any L.
- **Untied lm_head by default.** Teacher and student each own one `[H, V]` kernel that
  `jaxkd.lm.distill_loss` takes as it is, with its own initialisation and weight decay,
  independent of the input embedding. `tied=True` uses the embedding's transpose instead
  (Press & Wolf, EACL 2017): for the CPU student at V = 8192 the two [V, H] matrices are
  84% of its parameters, and tying halves that.
- **No biases** anywhere (as in PaLM / LLaMA); the head has none either (`head()` returns
  None for the bias, which `distill_loss` accepts).
- **GELU MLP, 4H wide** (GPT-2's); the `gpt2_small` entry has GPT-2 small's shape
  (12 layers, 768 wide, 12 heads), not its weights or its learned positions.

Parameters are float32 whatever the compute `dtype`; with bfloat16 the matmuls and the
residual stream run in bf16, the norms, RoPE and the attention softmax in float32 (XLA's
`dot_product_attention` promotes its logits). Init: N(0, 0.02) for embeddings and kernels,
N(0, 0.02/sqrt(2·layers)) for the two projections into the residual stream (GPT-2's).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["LMSpec", "Transformer", "available_lm", "create_lm", "lm_spec", "rope"]

Dtype = Any
_STD = 0.02


class RMSNorm(nn.Module):
  """x / sqrt(mean(x², -1) + eps) · scale, in float32; returns `dtype`."""
  dtype: Dtype = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def rope(x: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of `x` [B, L, heads, D] (D even), positions 0..L-1.

  Pairs (x_j, x_{j+D/2}) are rotated by the angle l · base^(−2j/D) at position l (the
  rotate-half form): q·k then depends on positions only through their difference.
  Computed in float32, returned in x's dtype.
  """
  length, dim = x.shape[1], x.shape[-1]
  half = dim // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dim)
  angle = jnp.arange(length, dtype=jnp.float32)[:, None] * freq[None, :]     # [L, D/2]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  a, b = x32[..., :half], x32[..., half:]
  return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


def _dense(features, dtype, std, name):
  return nn.DenseGeneral(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=nn.initializers.normal(std), name=name)


class Block(nn.Module):
  """One pre-norm block: causal self-attention with RoPE, then the GELU MLP."""
  hidden: int
  num_heads: int
  mlp_ratio: int
  out_std: float
  dtype: Dtype = jnp.float32
  rope_base: float = 10000.0

  @nn.compact
  def __call__(self, x):
    head_dim = self.hidden // self.num_heads
    h = RMSNorm(self.dtype, name="attn_norm")(x)
    qkv = _dense((3, self.num_heads, head_dim), self.dtype, _STD, "qkv")(h)   # [B,L,3,N,D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = rope(q, self.rope_base), rope(k, self.rope_base)
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)               # [B,L,N,D]
    out = nn.DenseGeneral(self.hidden, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                          param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(self.out_std), name="attn_out")
    x = x + out(att)
    h = RMSNorm(self.dtype, name="mlp_norm")(x)
    h = nn.gelu(_dense(self.mlp_ratio * self.hidden, self.dtype, _STD, "mlp_in")(h))
    return x + _dense(self.hidden, self.dtype, self.out_std, "mlp_out")(h)


class Transformer(nn.Module):
  """A causal decoder-only LM: embedding, `num_layers` pre-norm blocks, final RMSNorm, head.

  Call: `(tokens int32 [B, L]) -> hidden [B, L, hidden]` in `dtype`, the final-normed states
  the lm_head multiplies. `head()` -> (kernel [hidden, V] in `dtype`, None); `logits(tokens)`
  -> float32 [B, L, V] (materialised: for evaluation and tests, not for training at scale).

  Attributes:
    vocab_size: V.
    num_layers, hidden, num_heads: depth, width H, attention heads (H divisible by heads,
      head size even for RoPE).
    mlp_ratio: the MLP's width over H.
    tied: the head is the embedding's transpose instead of its own kernel.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
    rope_base: RoPE's base wavelength.
  """
  vocab_size: int
  num_layers: int = 2
  hidden: int = 128
  num_heads: int = 2
  mlp_ratio: int = 4
  tied: bool = False
  dtype: Dtype = jnp.float32
  rope_base: float = 10000.0

  def setup(self):
    if self.hidden % self.num_heads or (self.hidden // self.num_heads) % 2:
      raise ValueError(f"hidden = {self.hidden} must split into num_heads = {self.num_heads} "
                       f"heads of even size (RoPE rotates pairs).")
    self.embed = nn.Embed(self.vocab_size, self.hidden, dtype=self.dtype,
                          param_dtype=jnp.float32,
                          embedding_init=nn.initializers.normal(_STD))
    out_std = _STD / math.sqrt(2 * self.num_layers)
    self.blocks = [Block(self.hidden, self.num_heads, self.mlp_ratio, out_std, self.dtype,
                         self.rope_base, name=f"block_{i}") for i in range(self.num_layers)]
    self.final_norm = RMSNorm(self.dtype)
    if not self.tied:
      self.lm_head = self.param("lm_head", nn.initializers.normal(_STD),
                                (self.hidden, self.vocab_size), jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids [B, L], got {tokens.dtype} "
                       f"{tokens.shape}.")
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.final_norm(x)

  def head(self) -> tuple[jax.Array, None]:
    """(kernel [H, V] in the compute dtype, bias None): what `distill_loss` multiplies.

    The cast to the compute dtype is inside the differentiated function, so the gradient
    reaches the float32 parameter.
    """
    kernel = self.embed.embedding.T if self.tied else self.lm_head
    return kernel.astype(self.dtype), None

  def logits(self, tokens: jax.Array) -> jax.Array:
    """float32 [B, L, V]: hidden · kernel, accumulated in float32."""
    kernel, _ = self.head()
    return jnp.einsum("blh,hv->blv", self(tokens), kernel,
                      preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# The registry of sizes.


@dataclasses.dataclass(frozen=True)
class LMSpec:
  """A registered size: depth, width and heads (the vocabulary comes from the tokenizer)."""
  name: str
  num_layers: int
  hidden: int
  num_heads: int
  mlp_ratio: int = 4
  doc: str = ""


_SPECS = {s.name: s for s in (
    LMSpec("lm_teacher_cpu", 4, 256, 4, doc="the CPU preset's teacher"),
    LMSpec("lm_student_cpu", 2, 128, 2, doc="the CPU preset's student"),
    LMSpec("lm_tiny", 1, 32, 2, doc="tests"),
    LMSpec("gpt2_small", 12, 768, 12, doc="GPT-2 small's shape, a GPU teacher"),
    LMSpec("gpt2_mini", 6, 384, 6, doc="half of GPT-2 small in depth and width, its student"),
)}


def available_lm() -> list[str]:
  """The registered language-model sizes, sorted."""
  return sorted(_SPECS)


def lm_spec(name: str) -> LMSpec:
  """The entry of `name`; ValueError listing the known sizes."""
  if name not in _SPECS:
    raise ValueError(f"unknown language model {name!r}; known: {', '.join(available_lm())}.")
  return _SPECS[name]


def create_lm(name: str, vocab_size: int, *, dtype: Dtype = jnp.float32,
              tied: bool = False) -> Transformer:
  """The `Transformer` of registered size `name` over a `vocab_size`-token vocabulary."""
  s = lm_spec(name)
  try:
    vocab_size = operator.index(vocab_size)
  except TypeError:
    vocab_size = -1
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be an integer ≥ 2 (the tokenizer's), got "
                     f"{vocab_size!r}.")
  return Transformer(vocab_size=vocab_size, num_layers=s.num_layers, hidden=s.hidden,
                     num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, tied=tied, dtype=dtype)
