"""jaxkd.lm: the fused, chunked lm_head + reweighted KD loss.

Three references: the dense composition with materialised logits (`jaxkd.losses` +
`jaxkd.weighting`, autodiff for the gradients), an independent float64 NumPy implementation of
the formulas (values, and directional derivatives by central differences), and the fused loss
itself in other layouts (chunk sizes, devices, vmap, a top-k teacher with k = V).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import lm, losses
from jaxkd import weighting as weights_lib

N, HS, HT, V = 29, 6, 10, 40
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
WEIGHTINGS = (None, "entropy", "adaptive_entropy")


def _problem(seed=0, n=N, v=V, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(seed), 8)
  return dict(
      hs=jax.random.normal(k[0], (n, HS), dtype), ws=jax.random.normal(k[1], (HS, v), dtype),
      bs=0.5 * jax.random.normal(k[2], (v,), dtype), ht=jax.random.normal(k[3], (n, HT), dtype),
      wt=jax.random.normal(k[4], (HT, v), dtype), bt=0.5 * jax.random.normal(k[5], (v,), dtype),
      y=jax.random.randint(k[6], (n,), 0, v), where=jax.random.uniform(k[7], (n,)) > 0.25)


# --------------------------------------------------------------------------------------------
# float64 NumPy reference.


def _np_log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_xlogy_ratio(la, lb):
  a = np.exp(la)
  with np.errstate(invalid="ignore"):
    return np.where(a > 0, a * (la - lb), 0.0).sum(-1)


def _np_divergence(lt, ls, divergence, beta):
  if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
    return _np_xlogy_ratio(lt, ls)
  if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
    return _np_xlogy_ratio(ls, lt)
  lm_ = np.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls)
  return beta * _np_xlogy_ratio(lt, lm_) + (1 - beta) * _np_xlogy_ratio(ls, lm_)


def _np_entropy(z, t):
  lp = _np_log_softmax(z / t)
  return -(np.exp(lp) * lp).sum(-1)


def _np_loss(p, hs, ws, bs, *, temperature, divergence, beta=0.5, weighting=None,
             weighting_temperature=None, ce_weight=0.0, kd_weight=1.0, use_where=True,
             fixed_weights=None):
  """The loss from its formula in float64; `fixed_weights` replaces w (the weights are
  constants of the gradient, so its central differences must hold them fixed)."""
  f = lambda x: np.asarray(x, np.float64)
  zs = f(hs) @ f(ws) + f(bs)
  zt = f(p["ht"]) @ f(p["wt"]) + f(p["bt"])
  keep = f(p["where"]) if use_where else np.ones(len(zs))
  tau = weighting_temperature or temperature
  lt = _np_log_softmax(zt / temperature)
  d = _np_divergence(lt, _np_log_softmax(zs / temperature), divergence, beta)
  w = np.ones(len(zs))
  if weighting == "entropy":
    w = _np_entropy(zt, tau)
  elif weighting == "adaptive_entropy":
    w = 0.5 * _np_entropy(zt, tau) * (1 + _np_entropy(zs, tau) / np.log(zs.shape[-1]))
  if fixed_weights is not None:
    w = fixed_weights
  ce = -_np_log_softmax(zs)[np.arange(len(zs)), np.asarray(p["y"])]
  n = keep.sum()
  return ce_weight * (keep * ce).sum() / n + kd_weight * temperature**2 * (keep * w * d).sum() / n


# --------------------------------------------------------------------------------------------
# Dense JAX composition with materialised logits.


def _dense_loss(p, hs, ws, bs, *, temperature, divergence, beta=0.5, weighting=None,
                weighting_temperature=None, ce_weight=0.0, kd_weight=1.0, use_where=True):
  zs, zt = hs @ ws + bs, p["ht"] @ p["wt"] + p["bt"]
  where = p["where"] if use_where else None
  tau = weighting_temperature or temperature
  if divergence == "forward_kl":
    d = losses.kl_divergence(zs, zt, temperature=temperature)
  elif divergence == "reverse_kl":
    d = losses.kl_divergence(zt, zs, temperature=temperature)
  else:  # no dense JSD in jaxkd.losses: from the log-probabilities
    ls, lt = jax.nn.log_softmax(zs / temperature), jax.nn.log_softmax(zt / temperature)
    lm_ = jnp.logaddexp(jnp.log(beta) + lt, jnp.log1p(-beta) + ls)
    d = (beta * jnp.sum(jnp.exp(lt) * (lt - lm_), -1)
         + (1 - beta) * jnp.sum(jnp.exp(ls) * (ls - lm_), -1))
  w = None
  if weighting == "entropy":
    w = weights_lib.teacher_entropy_weights(zt, temperature=tau, where=where)
  elif weighting == "adaptive_entropy":
    w = weights_lib.adaptive_entropy_weights(zt, zs, temperature=tau, where=where)
  kd = temperature**2 * losses.weighted_mean(d, w, where=where)
  ce = losses.weighted_mean(losses.cross_entropy(zs, p["y"], where=where), where=where)
  return kd_weight * kd + ce_weight * ce


def _fused(p, hs, ws, bs, *, chunk_size=8, use_where=True, **kw):
  return lm.distill_loss(hs, ws, p["ht"], p["wt"], p["y"], student_bias=bs,
                         teacher_bias=p["bt"], where=p["where"] if use_where else None,
                         chunk_size=chunk_size, **kw)


def _grads(f, p):
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(p["hs"], p["ws"], p["bs"])


def _assert_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def _directional_check(p, grads, weights, loss_kw, eps=1e-5):
  """<∇L, v> against (L(x + εv) − L(x − εv)) / 2ε of the float64 reference, per argument."""
  loss_kw = dict(loss_kw, fixed_weights=np.asarray(weights, np.float64))
  rng = np.random.default_rng(1)
  args = [np.asarray(p[k], np.float64) for k in ("hs", "ws", "bs")]
  for i, g in enumerate(grads):
    v = rng.standard_normal(args[i].shape)
    plus, minus = list(args), list(args)
    plus[i], minus[i] = args[i] + eps * v, args[i] - eps * v
    numeric = (_np_loss(p, *plus, **loss_kw) - _np_loss(p, *minus, **loss_kw)) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(np.asarray(g, np.float64) * v)), numeric,
                               rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("weighting_", WEIGHTINGS)
def test_value_and_gradients_match_dense_and_numpy(divergence, weighting_):
  p = _problem()
  kw = dict(temperature=2.0, divergence=divergence, beta=0.3, weighting=weighting_,
            weighting_temperature=1.5, ce_weight=0.4, kd_weight=0.8)
  fused = _grads(lambda a, b, c: _fused(p, a, b, c, chunk_size=8, **kw), p)
  dense = _grads(lambda a, b, c: _dense_loss(p, a, b, c, **kw), p)
  _assert_close(fused, dense, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(float(fused[0]), _np_loss(p, p["hs"], p["ws"], p["bs"], **kw),
                             rtol=2e-6)
  _, stats = _fused(p, p["hs"], p["ws"], p["bs"], return_stats=True, **kw)
  _directional_check(p, fused[1], stats["weights"], kw)


@pytest.mark.parametrize("chunk_size,use_where,ce_weight", [
    (1, False, 0.0), (7, True, 1.0), (29, True, 0.0), (1024, False, 1.0)])
def test_chunk_sizes_masks_and_ce(chunk_size, use_where, ce_weight):
  """N = 29 tokens in chunks of 1 (29 chunks), 7 (5 chunks of 6, one padded), 29, 1024."""
  p = _problem(seed=2)
  kw = dict(temperature=1.0, divergence="forward_kl", weighting="adaptive_entropy",
            ce_weight=ce_weight, use_where=use_where)
  fused = _grads(lambda a, b, c: _fused(p, a, b, c, chunk_size=chunk_size, **kw), p)
  dense = _grads(lambda a, b, c: _dense_loss(p, a, b, c, **kw), p)
  _assert_close(fused, dense, rtol=2e-5, atol=2e-6)


def test_without_labels_or_biases_and_leading_axes():
  p = _problem(seed=3, n=24)
  hs, ht = p["hs"].reshape(4, 6, HS), p["ht"].reshape(4, 6, HT)
  got = lm.distill_loss(hs, p["ws"], ht, p["wt"], temperature=3.0, chunk_size=5)
  zs, zt = p["hs"] @ p["ws"], p["ht"] @ p["wt"]
  np.testing.assert_allclose(float(got), float(losses.kd_loss(zs, zt, temperature=3.0)),
                             rtol=2e-6)


def test_excluded_tokens_reach_nothing_even_if_nan():
  p = _problem(seed=4)
  bad = jnp.where(p["where"][:, None], p["hs"], jnp.nan)
  f = lambda h: _fused(p, h, p["ws"], p["bs"], temperature=1.0, divergence="jsd",
                       weighting="entropy", ce_weight=1.0)
  value, grad = jax.value_and_grad(f)(bad)
  ref, ref_grad = jax.value_and_grad(f)(p["hs"])
  np.testing.assert_allclose(float(value), float(ref), rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~np.asarray(p["where"])] == 0)
  _assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_bf16_inputs_float32_math():
  """bf16 hidden states and kernels: within 2% of the float32 loss of the same (rounded)
  inputs; matmuls accumulate in float32, so the difference is the bf16 gradient casts."""
  p32 = _problem(seed=5)
  p16 = {k: (v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v) for k, v in p32.items()}
  rounded = {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in p16.items()}
  kw = dict(temperature=2.0, divergence="forward_kl", weighting="adaptive_entropy", ce_weight=0.5)
  got = _grads(lambda a, b, c: _fused(p16, a, b, c, **kw), p16)
  ref = _grads(lambda a, b, c: _dense_loss(rounded, a, b, c, **kw), rounded)
  assert got[0].dtype == jnp.float32 and got[1][0].dtype == jnp.bfloat16
  np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=2e-3)
  for g, r in zip(got[1], ref[1]):
    g, r = np.asarray(g, np.float32), np.asarray(r)
    assert np.linalg.norm(g - r) <= 2e-2 * np.linalg.norm(r)


def test_teacher_gets_no_gradient_and_weights_carry_none():
  p = _problem(seed=6)
  f = lambda hs, ht, wt: lm.distill_loss(hs, p["ws"], ht, wt, weighting="adaptive_entropy",
                                         temperature=2.0, chunk_size=8)
  _, d_ht, d_wt = jax.grad(f, argnums=(0, 1, 2))(p["hs"], p["ht"], p["wt"])
  assert not np.any(d_ht) and not np.any(d_wt)
  # A weighting function that depends on the student: its weights are constants too.
  fn = lambda s: s["student_entropy"] * s["teacher_entropy"]
  g = jax.grad(lambda h: lm.distill_loss(h, p["ws"], p["ht"], p["wt"], weighting=fn,
                                         chunk_size=8))(p["hs"])
  zt = p["ht"] @ p["wt"]

  def dense(h):
    zs = h @ p["ws"]
    w = jax.lax.stop_gradient(weights_lib.entropy(zs) * weights_lib.entropy(zt))
    return losses.kd_loss(zs, zt, temperature=1.0, weights=w)
  _assert_close(g, jax.grad(dense)(p["hs"]), rtol=2e-5, atol=2e-6)


def test_stats_are_the_per_token_quantities():
  p = _problem(seed=7)
  _, stats = _fused(p, p["hs"], p["ws"], p["bs"], temperature=2.0, weighting="entropy",
                    weighting_temperature=3.0, return_stats=True)
  zs, zt = p["hs"] @ p["ws"] + p["bs"], p["ht"] @ p["wt"] + p["bt"]
  keep = np.asarray(p["where"])
  expect = {
      "divergence": losses.kl_divergence(zs, zt, temperature=2.0),
      "teacher_entropy": weights_lib.entropy(zt, temperature=3.0),
      "student_entropy": weights_lib.entropy(zs, temperature=3.0),
      "teacher_lse": jax.nn.logsumexp(zt, -1), "student_lse": jax.nn.logsumexp(zs, -1),
      "student_logp_label": -losses.cross_entropy(zs, p["y"]),
      "teacher_logp_label": -losses.cross_entropy(zt, p["y"]),
  }
  for name, value in expect.items():
    _assert_close(np.asarray(stats[name])[keep], np.asarray(value)[keep], 2e-5, 2e-6)
  np.testing.assert_allclose(np.asarray(stats["weights"])[keep],
                             np.asarray(expect["teacher_entropy"])[keep], rtol=1e-6)
  assert not np.any(np.asarray(stats["weights"])[~keep])


def test_vmap_over_a_leading_axis():
  p = _problem(seed=8, n=30)
  hs, ht = p["hs"].reshape(3, 10, HS), p["ht"].reshape(3, 10, HT)
  f = lambda h, t: lm.distill_loss(h, p["ws"], t, p["wt"], weighting="entropy", chunk_size=4)
  got = jax.vmap(jax.value_and_grad(f))(hs, ht)
  for i in range(3):
    _assert_close((got[0][i], got[1][i]), jax.value_and_grad(f)(hs[i], ht[i]), 1e-6, 1e-7)


# --------------------------------------------------------------------------------------------
# Top-k teachers.


def _topk(p, k):
  zt = p["ht"] @ p["wt"] + p["bt"]
  lp = jax.nn.log_softmax(zt)
  ids = jnp.argsort(-lp, axis=-1)[:, :k]
  return ids, jnp.take_along_axis(lp, ids, -1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_all_classes_equals_dense(divergence):
  p = _problem(seed=9)
  ids, lps = _topk(p, V)
  kw = dict(temperature=2.0, divergence=divergence, weighting="adaptive_entropy", ce_weight=0.3,
            where=p["where"], student_bias=p["bs"], chunk_size=8)
  sparse = jax.value_and_grad(
      lambda h: lm.distill_loss_topk(h, p["ws"], ids, lps, p["y"], **kw))(p["hs"])
  dense = jax.value_and_grad(lambda h: lm.distill_loss(
      h, p["ws"], p["ht"], p["wt"], p["y"], teacher_bias=p["bt"], **kw))(p["hs"])
  _assert_close(sparse, dense, rtol=2e-5, atol=2e-6)


def _np_topk_log_bins(p, ids, lps, temperature):
  """The teacher's k + 1 bins tempered at τ, float64, and the student's matching bins."""
  zs = np.asarray(p["hs"], np.float64) @ np.asarray(p["ws"], np.float64) + np.asarray(p["bs"])
  ids, lps = np.asarray(ids), np.asarray(lps, np.float64)
  ls = _np_log_softmax(zs / temperature)
  rows = np.arange(len(zs))[:, None]
  valid = (ids >= 0) & (ids < zs.shape[1])
  member = np.zeros(zs.shape, bool)
  member[np.broadcast_to(rows, ids.shape)[valid], ids[valid]] = True
  q_tail = np.where(member, 0.0, np.exp(ls)).sum(-1)
  q_top = np.where(valid, np.exp(ls[rows, np.where(valid, ids, 0)]), 0.0)
  r = np.maximum(1 - np.where(valid, np.exp(lps), 0.0).sum(-1), 0.0)
  masses = np.concatenate([np.where(valid, np.exp(lps), 0.0), r[:, None]], -1) ** (1 / temperature)
  with np.errstate(divide="ignore"):
    lt = np.log(masses / masses.sum(-1, keepdims=True))
    ls_bins = np.log(np.concatenate([q_top, q_tail[:, None]], -1))
  return lt, ls_bins


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_tail_bin_against_numpy(divergence):
  """k < V, with an invalid id (−1) whose stored mass joins the tail, at τ = 1 and 2."""
  p = _problem(seed=10)
  ids, lps = _topk(p, 5)
  ids = ids.at[3, 1].set(-1)
  keep = np.asarray(p["where"])
  for tau in (1.0, 2.0):
    got = lm.distill_loss_topk(p["hs"], p["ws"], ids, lps, p["y"], temperature=tau,
                               divergence=divergence, beta=0.4, where=p["where"],
                               student_bias=p["bs"], chunk_size=6)
    lt, ls = _np_topk_log_bins(p, ids, lps, tau)
    d = _np_divergence(lt, ls, divergence, 0.4)
    np.testing.assert_allclose(float(got), tau**2 * d[keep].mean(), rtol=2e-5)
  # Its gradient against central differences of the same reference.
  f = lambda h: lm.distill_loss_topk(h, p["ws"], ids, lps, temperature=2.0,
                                     divergence=divergence, beta=0.4, student_bias=p["bs"])
  g = np.asarray(jax.grad(f)(p["hs"]), np.float64)
  v = np.random.default_rng(0).standard_normal(g.shape)

  def ref(h):
    lt, ls = _np_topk_log_bins(dict(p, hs=h), ids, lps, 2.0)
    return 4.0 * _np_divergence(lt, ls, divergence, 0.4).mean()
  h = np.asarray(p["hs"], np.float64)
  numeric = (ref(h + 1e-5 * v) - ref(h - 1e-5 * v)) / 2e-5
  np.testing.assert_allclose(np.sum(g * v), numeric, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Memory, devices, errors.


def test_compiled_memory_far_below_dense():
  """Compiled temporaries of the gradient at N = 8192, V = 8192 (one [N, V] float32 is
  256 MiB): the fused loss at chunk 256 needs a small fraction of the dense version's.
  Compiled only, never run."""
  n, v, h = 8192, 8192, 32
  spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, h), (h, v), (n, h), (h, v))]

  def fused(hs, ws, ht, wt):
    return lm.distill_loss(hs, ws, ht, wt, weighting="adaptive_entropy", chunk_size=256)

  def dense(hs, ws, ht, wt):
    zs, zt = hs @ ws, ht @ wt
    w = weights_lib.adaptive_entropy_weights(zt, zs, temperature=1.0)
    return losses.kd_loss(zs, zt, temperature=1.0, weights=w)
  temp = {}
  for name, f in (("fused", fused), ("dense", dense)):
    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*spec).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["dense"] >= n * v * 4, temp  # at least one [N, V] float32 tensor
  assert temp["fused"] < 0.1 * temp["dense"], temp


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_gradient_in_row_blocks(dtype):
  """Hidden size 16 in chunks of 4 tokens: on a CPU the kernel gradient accumulates in 4
  blocks of rows, and 16-bit hidden states and kernels move as their bits; the gradients are
  the dense composition's (float32: to rounding; bf16: to the bf16 gradient casts)."""
  p = _problem(seed=15)
  k = jax.random.split(jax.random.PRNGKey(15), 2)
  p = dict(p, hs=jax.random.normal(k[0], (N, 16)), ws=jax.random.normal(k[1], (16, V)))
  p = {key: (x.astype(dtype) if x.dtype == jnp.float32 else x) for key, x in p.items()}
  rounded = {key: (x.astype(jnp.float32) if x.dtype == dtype else x) for key, x in p.items()}
  kw = dict(temperature=2.0, divergence="forward_kl", weighting="adaptive_entropy",
            ce_weight=0.5)
  got = _grads(lambda a, b, c: _fused(p, a, b, c, chunk_size=4, **kw), p)
  ref = _grads(lambda a, b, c: _dense_loss(rounded, a, b, c, **kw), rounded)
  if dtype == jnp.float32:
    _assert_close(got, ref, rtol=2e-5, atol=2e-6)
    return
  np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=2e-3)
  for g, r in zip(got[1], ref[1]):
    g, r = np.asarray(g, np.float32), np.asarray(r)
    assert g.dtype == r.dtype and np.linalg.norm(g - r) <= 2e-2 * np.linalg.norm(r)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_kernel_sized_float32_temporary(dtype):
  """The compiled gradient's temporaries hold the float32 kernel-gradient accumulator and
  chunk-sized buffers, but no second float32 kernel (XLA:CPU's float32 copy of a bf16 kernel,
  or a matmul output as large as the kernel). Compiled only, never run."""
  n, v, h, chunk = 256, 16384, 64, 8
  spec = [jax.ShapeDtypeStruct(s, dtype) for s in ((n, h), (h, v), (n, h), (h, v))]
  f = lambda hs, ws, ht, wt: lm.distill_loss(hs, ws, ht, wt, weighting="adaptive_entropy",
                                             chunk_size=chunk)
  temp = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*spec).compile().memory_analysis()
  assert temp.temp_size_in_bytes < 2 * h * v * 4, temp


def _loop_bodies_with_all_reduce(hlo_text):
  """Names of while-loop body computations of compiled HLO text that hold an all-reduce."""
  bodies = set(re.findall(r"body=%?([\w.-]+)", hlo_text))
  found, current = set(), None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.-]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
    elif "all-reduce(" in line and current in bodies:
      found.add(current)
  return bodies, found


@pytest.mark.parametrize("per_device", [False, True])
def test_sharded_over_eight_devices_equals_one(per_device):
  """Tokens sharded over 8 devices: GSPMD (each chunk spans all devices) and token_sharding
  (each device walks its own tokens; the kernel gradient is reduced once, after the loop)."""
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  p = _problem(seed=11, n=64)
  f = jax.jit(jax.value_and_grad(
      lambda hs, ws, ht, y, w, sharding: lm.distill_loss(
          hs, ws, ht, p["wt"], y, where=w, ce_weight=0.5, weighting="entropy", chunk_size=4,
          token_sharding=sharding), argnums=(0, 1)), static_argnums=5)
  args = (p["hs"], p["ws"], p["ht"], p["y"], p["where"])
  sharded = [jax.device_put(a, rows) if i != 1 else a for i, a in enumerate(args)]
  setting = rows if per_device else None
  one = f(*args, None)
  many = f(*sharded, setting)
  assert len(many[1][0].sharding.device_set) == 8
  _assert_close(many, one, rtol=1e-5, atol=1e-6)
  if per_device:
    bodies, reducing = _loop_bodies_with_all_reduce(f.lower(*sharded, setting).compile().as_text())
    assert bodies and not reducing, reducing


def test_token_sharding_errors():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  p = _problem(seed=14, n=30)
  with pytest.raises(ValueError, match="multiple of 8"):
    lm.distill_loss(p["hs"], p["ws"], p["ht"], p["wt"], token_sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
  with pytest.raises(ValueError, match="token_sharding"):
    lm.distill_loss(p["hs"], p["ws"], p["ht"], p["wt"], token_sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))


@pytest.mark.parametrize("change,message", [
    (dict(ws=np.zeros((HS + 1, V), np.float32)), "student_hidden"),
    (dict(wt=np.zeros((HT, V + 1), np.float32)), "teacher_kernel"),
    (dict(y=np.zeros((N + 1,), np.int32)), "labels"),
    (dict(y=np.zeros((N,), np.float32)), "labels"),
    (dict(where=np.zeros((N,), np.int32)), "where"),
    (dict(temperature=0.0), "temperature"),
    (dict(beta=1.5), "beta"),
    (dict(divergence="kl"), "divergence"),
    (dict(weighting="erkd"), "weighting"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(ce_weight=1.0, y=None), "labels"),
    (dict(bs=np.zeros((V + 1,), np.float32)), "student_bias"),
])
def test_bad_input_names_the_argument(change, message):
  p = dict(_problem(seed=12), temperature=1.0, beta=0.5, divergence="forward_kl",
           weighting=None, chunk_size=8, ce_weight=0.0)
  p.update(change)
  with pytest.raises(ValueError, match=message):
    lm.distill_loss(p["hs"], p["ws"], p["ht"], p["wt"], p["y"], where=p["where"],
                    student_bias=p["bs"], temperature=p["temperature"], beta=p["beta"],
                    divergence=p["divergence"], weighting=p["weighting"],
                    chunk_size=p["chunk_size"], ce_weight=p["ce_weight"])


def test_topk_bad_input():
  p = _problem(seed=13)
  ids, lps = _topk(p, 4)
  with pytest.raises(ValueError, match="teacher_topk_logprobs"):
    lm.distill_loss_topk(p["hs"], p["ws"], ids, lps[:, :3])
  with pytest.raises(ValueError, match="teacher_topk_ids"):
    lm.distill_loss_topk(p["hs"], p["ws"], lps, lps)
  with pytest.raises(ValueError, match="weighting function"):
    lm.distill_loss_topk(p["hs"], p["ws"], ids, lps, weighting=lambda s: s["divergence"][:3])

