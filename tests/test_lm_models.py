"""jaxkd.models.transformer: the causal decoder-only LMs and their registry.

Causality by perturbing later tokens, shapes and dtypes, bf16 against float32, RoPE against
a float64 NumPy reference, and the head that `jaxkd.lm.distill_loss` consumes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import lm
from jaxkd.models import transformer

V, B, L = 61, 2, 12


def _model(tied=False, dtype=jnp.float32, vocab=V):
  return transformer.Transformer(vocab_size=vocab, num_layers=2, hidden=32, num_heads=4,
                                 tied=tied, dtype=dtype)


def _tokens(seed=0, length=L):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, V, jnp.int32)


@pytest.fixture(scope="module")
def untied():
  """One initialisation shared by the tests (compiling an init is most of their cost)."""
  model = _model()
  return model, jax.jit(model.init)(jax.random.key(1, impl="rbg"), _tokens())


def test_shapes_and_float32_params_under_bf16(untied):
  model = _model(dtype=jnp.bfloat16)
  abstract = jax.eval_shape(model.init, jax.random.key(0), _tokens())
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  variables = untied[1]
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, variables)
  hidden, (kernel, bias), logits = jax.jit(lambda v, x: (
      model.apply(v, x), model.apply(v, method="head"), model.apply(v, x, method="logits")))(
          variables, _tokens())
  assert hidden.shape == (B, L, 32) and hidden.dtype == jnp.bfloat16
  assert kernel.shape == (32, V) and kernel.dtype == jnp.bfloat16 and bias is None
  assert logits.shape == (B, L, V) and logits.dtype == jnp.float32


def test_causal_mask(untied):
  """Changing tokens from position t on leaves every position before t as it was (the head,
  tied or not, acts per position: the body decides)."""
  model, variables = untied
  tokens = _tokens()
  t = 5
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % V)
  both = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="logits")))
  (h0, z0), (h1, z1) = both(variables, tokens), both(variables, changed)
  np.testing.assert_allclose(h0[:, :t], h1[:, :t], rtol=0, atol=1e-6)
  np.testing.assert_allclose(z0[:, :t], z1[:, :t], rtol=0, atol=1e-6)
  assert np.abs(np.asarray(h0[:, t:] - h1[:, t:])).max() > 1e-3  # later positions do see it


def test_bf16_forward_close_to_float32(untied):
  model, variables = untied
  run = lambda m: jax.jit(lambda v, x: (m.apply(v, x).astype(jnp.float32),
                                        m.apply(v, x, method="logits")))(variables, _tokens(3))
  (h32, z32), (h16, z16) = run(model), run(_model(dtype=jnp.bfloat16))
  # RMS-normed hidden states are O(1): bf16's 8-bit mantissa over two blocks stays within
  # a few hundredths of them; the logits (|z| ~ 0.1 at init) within a few thousandths.
  np.testing.assert_allclose(h16, h32, atol=5e-2)
  np.testing.assert_allclose(z16, z32, atol=1e-2)
  assert np.abs(np.asarray(z16 - z32)).max() < 0.1 * np.abs(np.asarray(z32)).max()


def test_tied_head_is_the_embedding_transposed(untied):
  model = _model(tied=True)
  abstract = jax.eval_shape(model.init, jax.random.key(0), _tokens())
  params = dict(untied[1]["params"])
  assert set(params) - set(abstract["params"]) == {"lm_head"}
  del params["lm_head"]
  kernel, _ = jax.jit(lambda v: model.apply(v, method="head"))({"params": params})
  np.testing.assert_array_equal(kernel, params["embed"]["embedding"].T)


def test_head_feeds_distill_loss_like_the_logits(untied):
  """`distill_loss` on (hidden, head) sees the same logits as the `logits` method: its
  teacher log-sum-exp statistic equals the materialised logits' log-sum-exp."""
  model, variables = untied
  tokens = _tokens(4)
  def run(variables, tokens):
    hidden = model.apply(variables, tokens)
    kernel, bias = model.apply(variables, method="head")
    _, stats = lm.distill_loss(hidden, kernel, hidden, kernel, tokens, student_bias=bias,
                               teacher_bias=bias, return_stats=True, chunk_size=7)
    return stats, model.apply(variables, tokens, method="logits")
  stats, z = jax.jit(run)(variables, tokens)
  np.testing.assert_allclose(stats["teacher_lse"], jax.nn.logsumexp(z, -1), rtol=1e-5)
  np.testing.assert_allclose(stats["divergence"], 0.0, atol=1e-5)


def test_rope_against_float64_reference():
  x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype(np.float32)
  out = np.asarray(transformer.rope(jnp.asarray(x), base=100.0))
  x64 = x.astype(np.float64)
  half = 4
  ref = np.empty_like(x64)
  for pos in range(7):
    for j in range(half):
      a = pos * 100.0 ** (-2.0 * j / 8)
      c, s = np.cos(a), np.sin(a)
      ref[:, pos, :, j] = x64[:, pos, :, j] * c - x64[:, pos, :, j + half] * s
      ref[:, pos, :, j + half] = x64[:, pos, :, j] * s + x64[:, pos, :, j + half] * c
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Relative: the dot product of two rotated vectors depends on the position difference.
  q, k = x[:1, :1], x[1:, :1]
  def dot(pq, pk):
    tile = lambda v, p: jnp.asarray(np.repeat(v, p + 1, axis=1))
    rq, rk = transformer.rope(tile(q, pq)), transformer.rope(tile(k, pk))
    return float(jnp.sum(rq[:, pq] * rk[:, pk]))
  assert dot(3, 1) == pytest.approx(dot(5, 3), rel=1e-4)


def test_registry_and_bad_input():
  assert {"lm_teacher_cpu", "lm_student_cpu", "gpt2_small"} <= set(transformer.available_lm())
  s = transformer.lm_spec("gpt2_small")
  assert (s.num_layers, s.hidden, s.num_heads) == (12, 768, 12)
  model = transformer.create_lm("lm_student_cpu", 8192)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  # 2 blocks of 12·128² (qkv 3, out 1, MLP 8) + embedding and head 2·8192·128 + norms.
  assert count == 2 * 12 * 128**2 + 2 * 8192 * 128 + 5 * 128
  gpt2 = jax.eval_shape(transformer.create_lm("gpt2_small", 50257).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 4), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(gpt2)) == 12 * 12 * 768**2 + 2 * 50257 * 768 + 25 * 768
  with pytest.raises(ValueError, match="unknown language model 'nope'.*lm_student_cpu"):
    transformer.create_lm("nope", 100)
  with pytest.raises(ValueError, match="vocab_size"):
    transformer.create_lm("lm_tiny", 1.5)
  with pytest.raises(ValueError, match="num_heads"):
    transformer.Transformer(vocab_size=10, hidden=30, num_heads=4).init(
        jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="tokens must be integer"):
    model.init(jax.random.key(0), jnp.zeros((1, 3)))
