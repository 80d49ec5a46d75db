"""jaxkd.train.lm_step: the chunked CE, the students' step over `jaxkd.lm.distill_loss`
(kd, erkd, eakd, and ipwd with its auxiliary head), and the evaluation sums, on tiny
transformers.

References: dense logits through `jaxkd.losses` / `jaxkd.weighting` (value and gradient of
every method's loss), and float64 NumPy for the CE, IPWD's weights and the evaluation sums.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from jaxkd import losses
from jaxkd import weighting
from jaxkd.models import transformer
from jaxkd.train import lm_step

V, B, L = 53, 2, 10


def _model(layers, hidden, heads=2):
  return transformer.Transformer(vocab_size=V, num_layers=layers, hidden=hidden,
                                 num_heads=heads)


STUDENT, TEACHER = _model(1, 16), _model(1, 32)  # one block each: compiles are the cost


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  # A learnable stream: the next token is the current one plus 1, with a little noise.
  seq = (rng.integers(0, V, size=(B, 1)) + np.arange(L + 1)[None]) % V
  seq = np.where(rng.uniform(size=seq.shape) < 0.1, 7, seq).astype(np.int32)
  mask = np.ones((B, L), bool)
  mask[1, -3:] = False
  return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}


METHODS = ("kd", "erkd", "eakd", "ipwd")


def _one(state, batch, *, model, tx, cfg, teacher=None, teacher_params=None):
  """`train_step` of one student: (state, metrics)."""
  states, metrics = lm_step.train_step((state,), teacher_params, batch, student=model,
                                       teacher=teacher, tx=tx, cfgs=(cfg,))
  return states[0], metrics[0]


@pytest.fixture(scope="module")
def setup():
  """The optimizer, a fresh student, and a teacher after 6 CE steps (their losses too)."""
  tx, _ = lm_step.make_optimizer(3e-3, warmup_steps=2, total_steps=50, weight_decay=0.01)
  # One program for both inits (each compile has a fixed cost); rbg keys compile faster.
  ipwd = lm_step.DistillConfig(method="ipwd")
  student, teacher = jax.jit(lambda k1, k2: (lm_step.init_state(STUDENT, tx, k1, cfg=ipwd),
                                             lm_step.init_state(TEACHER, tx, k2)))(
                                                 jax.random.key(1, impl="rbg"),
                                                 jax.random.key(2, impl="rbg"))
  t_step = functools.partial(_one, model=TEACHER, tx=tx,
                             cfg=lm_step.DistillConfig(method="ce", chunk_size=8))
  teacher, seen = _scan(t_step, teacher, 6, _batch())
  return tx, student, teacher, seen


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [7, 1024])  # 7 does not divide the 20 tokens
def test_chunked_cross_entropy_against_float64(chunk):
  rng = np.random.default_rng(chunk)
  h = rng.normal(size=(B, L, 6)).astype(np.float32)
  w = rng.normal(size=(6, V)).astype(np.float32)
  b = rng.normal(size=(V,)).astype(np.float32)
  y = rng.integers(0, V, size=(B, L))
  keep = rng.uniform(size=(B, L)) > 0.3
  h[~keep] = np.nan  # excluded tokens reach neither the value nor the gradient
  fn = lambda h, w: lm_step.chunked_cross_entropy(h, w, jnp.asarray(b), jnp.asarray(y),
                                                  jnp.asarray(keep), chunk_size=chunk)
  (total, count) = fn(jnp.asarray(h), jnp.asarray(w))
  logp = _np_log_softmax(np.nan_to_num(h.astype(np.float64)) @ w + b)
  ref = -np.take_along_axis(logp, y[..., None], -1)[..., 0][keep].sum()
  assert count == keep.sum()
  np.testing.assert_allclose(total, ref, rtol=1e-5)
  gh, gw = jax.grad(lambda h, w: fn(h, w)[0], argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
  assert np.isfinite(np.asarray(gh)).all() and not np.asarray(gh)[~keep].any()
  p = np.exp(logp) - np.eye(V)[y]
  np.testing.assert_allclose(gw, np.einsum("blh,blv->hv", np.nan_to_num(h)[keep][None],
                                           p[keep][None]), rtol=1e-4, atol=1e-5)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _scan(step, state, k, *args):
  """k steps in one program (one compile); the new state and the k losses."""
  def body(state, _):
    state, metrics = step(state, *args)
    return state, metrics["loss"]
  return jax.lax.scan(body, state, None, length=k)


def test_teacher_step_lowers_the_loss(setup):
  seen = np.asarray(setup[3])
  assert seen[-1] < seen[0] - 0.2, seen
  assert seen[0] == pytest.approx(np.log(V), abs=0.3)  # near uniform at init


def test_one_step_trains_every_method_from_one_teacher_forward(setup):
  """The sweep step: CE and the four methods, one state each, five steps in one program."""
  tx, student, teacher, _ = setup
  cfgs = tuple(lm_step.DistillConfig(method=m, temperature=2.0, ce_weight=0.5, chunk_size=8)
               for m in ("ce",) + METHODS)
  plain = lm_step.LMState(student.step, {"model": student.params["model"]},
                          tx.init({"model": student.params["model"]}))
  states = tuple(student if c.needs_aux_head else plain for c in cfgs)

  def steps(states, teacher_params, batch):
    def body(states, _):
      states, metrics = lm_step.train_step(states, teacher_params, batch, student=STUDENT,
                                           teacher=TEACHER, tx=tx, cfgs=cfgs)
      return states, tuple(m["loss"] for m in metrics)
    return jax.lax.scan(body, states, None, length=5)

  with helpers.count_compilations("") as compiled:
    states, seen = jax.jit(steps)(states, teacher.params["model"], _batch())
  assert len(compiled) == 1, compiled
  for cfg, state, losses_seen in zip(cfgs, states, seen):
    assert losses_seen[-1] < losses_seen[0], (cfg.method, losses_seen)
    assert int(state.step) == 5
  assert set(states[-1].params) == {"model", "aux_head"}


def _dense_reference(params, teacher_params, batch, cfg):
  """The same objective on materialised [B, L, V] logits, through jaxkd.losses/weighting."""
  variables = {"params": params["model"]}
  hidden = STUDENT.apply(variables, batch["tokens"])
  kernel, _ = STUDENT.apply(variables, method="head")
  zs = hidden @ kernel
  zt = jax.lax.stop_gradient(TEACHER.apply({"params": teacher_params}, batch["tokens"],
                                           method="logits"))
  where, tau, y = batch["mask"], cfg.temperature, batch["targets"]
  tau_w = cfg.weighting_temperature or tau
  aux = 0.0
  if cfg.method == "ipwd":  # the auxiliary head on the stopped hidden states
    z_aux = jax.lax.stop_gradient(hidden) @ params["aux_head"]["kernel"]
    aux = losses.weighted_mean(losses.cross_entropy(z_aux, y), where=where)
  weights = {"kd": lambda: None,
             "erkd": lambda: weighting.teacher_entropy_weights(zt, temperature=tau_w,
                                                               where=where),
             "eakd": lambda: weighting.adaptive_entropy_weights(zt, zs, temperature=tau_w,
                                                                where=where),
             "ipwd": lambda: weighting.inverse_propensity_weights(zs, z_aux, y, where=where),
             }[cfg.method]()
  kd = losses.kd_loss(zs, zt, temperature=tau, weights=weights, where=where)
  ce = losses.weighted_mean(losses.cross_entropy(zs, y), where=where)
  return cfg.kd_weight * kd + cfg.ce_weight * ce + aux


@pytest.fixture(scope="module")
def fused_and_dense(setup):
  """Value and gradient of the fused loss and the dense reference for each method, and the
  fused loss's gradient with respect to the teacher, from one program."""
  _, student, teacher, _ = setup

  def both(params, teacher_params, batch):
    out = {}
    for method in METHODS:
      cfg = lm_step.DistillConfig(method=method, temperature=2.0, weighting_temperature=1.5,
                                  ce_weight=0.3, kd_weight=0.7, chunk_size=6)
      fused = lambda p, tp: lm_step.member_loss(
          p, lm_step.teacher_forward(TEACHER, tp, batch["tokens"]), batch, student=STUDENT,
          cfg=cfg)
      out[method] = (jax.value_and_grad(fused)(params, teacher_params),
                     jax.value_and_grad(_dense_reference)(params, teacher_params, batch, cfg))
      out[method + "_teacher_grads"] = jax.grad(fused, argnums=1)(params, teacher_params)
    return out

  return jax.jit(both)(student.params, teacher.params["model"], _batch(1))


@pytest.mark.parametrize("method", METHODS)
def test_distill_loss_equals_the_dense_reference(fused_and_dense, method):
  (v1, g1), (v2, g2) = fused_and_dense[method]
  np.testing.assert_allclose(v1, v2, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6), g1, g2)


@pytest.mark.parametrize("method", ["eakd", "ipwd"])
def test_teacher_gets_no_gradient(fused_and_dense, method):
  """EA-KD's loss (its weights read both models' entropies) and IPWD's give the teacher
  nothing."""
  grads = fused_and_dense[method + "_teacher_grads"]
  assert len(jax.tree.leaves(grads)) > 5
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_ipw_token_weights_against_float64():
  """w = 1 + softmax(std(g))_y / softmax(std(f))_y, z-scores with the unbiased std."""
  rng = np.random.default_rng(3)
  h = rng.normal(size=(B, L, 6)).astype(np.float32)
  f, g = (rng.normal(size=(6, V)).astype(np.float32) for _ in range(2))
  y = rng.integers(0, V, size=(B, L))
  keep = rng.uniform(size=(B, L)) > 0.3
  w = lm_step.ipw_token_weights(jnp.asarray(h), jnp.asarray(f), None, jnp.asarray(g),
                                jnp.asarray(y), jnp.asarray(keep), chunk_size=7)

  def log_q(kernel):
    z = h.astype(np.float64) @ kernel
    z = (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)
    return np.take_along_axis(_np_log_softmax(z), y[..., None], -1)[..., 0]

  ref = np.where(keep, 1 + np.exp(log_q(g) - log_q(f)), 0.0)
  np.testing.assert_allclose(w, ref, rtol=1e-5)
  assert (np.asarray(w)[keep] >= 1).all()


def test_eval_sums_against_float64(setup):
  _, student, teacher, _ = setup
  batch = _batch(2)
  cfg = lm_step.DistillConfig(method="erkd", temperature=1.0)

  def run(sp, tp, batch):  # one program: both kinds of sums and the references' logits
    return (lm_step.eval_sums(sp, batch, model=STUDENT, teacher=TEACHER, teacher_params=tp,
                              cfg=cfg, num_buckets=4, chunk_size=7),
            lm_step.eval_sums(sp, batch, model=STUDENT),
            STUDENT.apply({"params": sp["model"]}, batch["tokens"], method="logits"),
            TEACHER.apply({"params": tp}, batch["tokens"], method="logits"))

  out, alone, zs, zt = jax.jit(run)(student.params, teacher.params["model"], batch)
  keep = np.asarray(batch["mask"])
  y = np.asarray(batch["targets"])
  ls, lt = _np_log_softmax(zs), _np_log_softmax(zt)
  nll = -np.take_along_axis(ls, y[..., None], -1)[..., 0]
  pt = np.exp(lt)
  kl = (pt * (lt - ls)).sum(-1)
  ht = -(pt * lt).sum(-1)
  np.testing.assert_allclose(out["nll"], nll[keep].sum(), rtol=1e-5)
  assert out["tokens"] == keep.sum()
  assert out["hits"] == (ls.argmax(-1) == y)[keep].sum()
  np.testing.assert_allclose(out["kl"], kl[keep].sum(), rtol=1e-4, atol=1e-6)
  bucket = np.clip(np.floor(ht / np.log(V) * 4), 0, 3).astype(int)
  counts = np.bincount(bucket[keep], minlength=4)
  np.testing.assert_array_equal(out["bucket_tokens"], counts)
  np.testing.assert_allclose(out["bucket_nll"], np.bincount(bucket[keep], nll[keep], 4),
                             rtol=1e-5)
  # ER-KD's weight is the teacher entropy (τ′ = τ = 1): each bin's sum is its Σ H_t.
  np.testing.assert_allclose(out["bucket_weight"], np.bincount(bucket[keep], ht[keep], 4),
                             rtol=1e-4)
  assert set(alone) == {"nll", "hits", "tokens"}
  np.testing.assert_allclose(alone["nll"], out["nll"], rtol=1e-6)


def test_bad_settings():
  with pytest.raises(ValueError, match="method must be one of"):
    lm_step.DistillConfig(method="dkd")
  with pytest.raises(ValueError, match="warmup_steps"):
    lm_step.make_optimizer(1e-3, warmup_steps=10, total_steps=10)
