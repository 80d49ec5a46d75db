"""jaxkd.losses against float64 NumPy references, closed-form gradients and bad input."""

import contextlib
import functools

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import _logits, losses
import references as ref

# (shape, scale): several ranks, class counts and logit magnitudes, large ones included.
CASES = [((7, 5), 0.1), ((64, 100), 3.0), ((16, 1000), 10.0), ((3, 6, 33), 30.0),
         ((32, 100), 300.0)]


def make_logits(shape, scale, seed):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_labels(shape, num_classes, seed):
  return np.random.default_rng(seed).integers(0, num_classes, shape[:-1]).astype(np.int32)


def make_mask(shape, seed):
  mask = np.random.default_rng(seed).random(shape[:-1]) < 0.7
  mask.flat[0] = True
  return mask


def tol(scale):
  # float32 math against float64: relative 1e-4, absolute grows with the logit magnitude.
  return dict(rtol=1e-4, atol=2e-5 * max(1.0, scale))


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_divergence_matches_reference(shape, scale, temperature):
  zs, zt = make_logits(shape, scale, 0), make_logits(shape, scale, 1)
  got = losses.kl_divergence(zs, zt, temperature=temperature)
  assert got.shape == shape[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.kl(zs, zt, temperature), **tol(scale / temperature))


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(shape, scale, label_smoothing):
  z, y = make_logits(shape, scale, 2), make_labels(shape, shape[-1], 3)
  got = losses.cross_entropy(z, y, label_smoothing=label_smoothing)
  np.testing.assert_allclose(got, ref.cross_entropy(z, y, label_smoothing), **tol(scale))


def test_cross_entropy_soft_labels():
  z = make_logits((9, 12), 3.0, 4)
  q = ref.softmax(make_logits((9, 12), 1.0, 5))
  expected = -np.sum(q * ref.log_softmax(z), -1)
  np.testing.assert_allclose(losses.cross_entropy(z, q.astype(np.float32)), expected, rtol=1e-5)


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_divergence_matches_reference(shape, scale, alpha, beta, temperature):
  zs, zt = make_logits(shape, scale, 6), make_logits(shape, scale, 7)
  y = make_labels(shape, shape[-1], 8)
  got = losses.dkd_divergence(zs, zt, y, alpha=alpha, beta=beta, temperature=temperature)
  expected = ref.dkd(zs, zt, y, alpha, beta, temperature)
  np.testing.assert_allclose(got, expected, rtol=2e-4,
                             atol=1e-4 * max(1.0, scale / temperature) * temperature**2 * beta)


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_weighted_mean_and_kd_loss_match_reference(shape, scale, masked):
  zs, zt = make_logits(shape, scale, 9), make_logits(shape, scale, 10)
  w = np.random.default_rng(11).random(shape[:-1]).astype(np.float32) * 3
  where = make_mask(shape, 12) if masked else None
  kl = ref.kl(zs, zt, 4.0)
  np.testing.assert_allclose(
      losses.weighted_mean(kl.astype(np.float32), w, where=where),
      ref.weighted_mean(kl, w, where), rtol=1e-5)
  np.testing.assert_allclose(
      losses.kd_loss(zs, zt, temperature=4.0, weights=w, where=where),
      16.0 * ref.weighted_mean(kl, w, where), **tol(scale / 4))
  y = make_labels(shape, shape[-1], 13)
  np.testing.assert_allclose(
      losses.dkd_loss(zs, zt, y, beta=2.0, weights=w, where=where),
      ref.weighted_mean(ref.dkd(zs, zt, y, 1.0, 2.0, 4.0), w, where),
      rtol=2e-4, atol=1e-3 * max(1.0, scale))


def test_weighted_mean_divides_by_count_not_by_weight_sum():
  values, weights = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0, 2.0])
  assert float(losses.weighted_mean(values, weights)) == pytest.approx(5.0)
  where = np.array([True, True, False, False])
  assert float(losses.weighted_mean(values, weights, where=where)) == pytest.approx(3.0)
  assert float(losses.weighted_mean(values, weights, where=np.zeros(4, bool))) == 0.0


@pytest.mark.parametrize("shape", [(16, 10), (2, 5, 7)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_gradient_closed_form(shape, temperature):
  """d kd_loss / d z_s = w_i · τ · (p^s − p^t) / N; the weights get exactly zero gradient."""
  zs, zt = make_logits(shape, 3.0, 14), make_logits(shape, 3.0, 15)
  w = np.random.default_rng(16).random(shape[:-1]).astype(np.float32) + 0.5
  where = make_mask(shape, 17)
  n = where.sum()

  def loss(zs, w):
    return losses.kd_loss(zs, zt, temperature=temperature, weights=w, where=where)

  g_s, g_w = jax.grad(loss, argnums=(0, 1))(jnp.asarray(zs), jnp.asarray(w))
  ps, pt = ref.softmax(zs / temperature), ref.softmax(zt / temperature)
  expected = (where * w)[..., None] * temperature * (ps - pt) / n
  np.testing.assert_allclose(g_s, expected, atol=1e-6)
  assert np.all(np.asarray(g_w) == 0.0)


def test_kl_gradient_wrt_teacher_matches_autodiff_of_reference_formula():
  """The custom VJP's teacher side against plain autodiff of the log-softmax formula."""
  zs, zt = jnp.asarray(make_logits((6, 9), 2.0, 18)), jnp.asarray(make_logits((6, 9), 2.0, 19))
  cot = jnp.asarray(np.random.default_rng(20).random(6), jnp.float32)

  def plain(zs, zt):
    lt, ls = jax.nn.log_softmax(zt / 3.0), jax.nn.log_softmax(zs / 3.0)
    return jnp.sum(cot * jnp.sum(jnp.exp(lt) * (lt - ls), -1))

  def ours(zs, zt):
    return jnp.sum(cot * losses.kl_divergence(zs, zt, temperature=3.0))

  for a, b in zip(jax.grad(ours, (0, 1))(zs, zt), jax.grad(plain, (0, 1))(zs, zt)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@contextlib.contextmanager
def float64():
  """JAX's float64 for one test; the session default (float32) comes back afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("shape,scale", [((6, 9), 2.0), ((2, 3, 5), 10.0)])
def test_kl_custom_vjp_passes_check_grads_in_float64(shape, scale):
  """The closed-form VJP of the one-sweep KL against numerical derivatives, both arguments.

  Shifted inputs (row max 0) as `kl_divergence` passes them. Reverse mode only: a custom_vjp
  has no forward mode, and `check_grads` compares `_kl_shifted_bwd` against central
  differences of the forward sweep along random directions.
  """
  with float64():
    us = _logits.scaled_shift(jnp.asarray(make_logits(shape, scale, 43), jnp.float64), 2.0)
    ut = _logits.scaled_shift(jnp.asarray(make_logits(shape, scale, 44), jnp.float64), 2.0)
    assert us.dtype == jnp.float64
    jtu.check_grads(losses._kl_shifted, (us, ut), order=1, modes=("rev",),
                              atol=1e-6, rtol=1e-6)
    # Through the public function (temperature, shift and float32 promotion included).
    zs = jnp.asarray(make_logits(shape, scale, 45), jnp.float64)
    zt = jnp.asarray(make_logits(shape, scale, 46), jnp.float64)
    jtu.check_grads(lambda a, b: losses.kl_divergence(a, b, temperature=3.0),
                              (zs, zt), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
  assert jnp.zeros(()).dtype == jnp.float32


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_dkd_and_ce_gradients_match_finite_differences(scale):
  """Central differences of the float64 reference formulas against jax.grad."""
  zs, zt = make_logits((6, 7), scale, 40), make_logits((6, 7), scale, 41)
  y = make_labels((6, 7), 7, 42)
  ref_loss = lambda z: np.mean(ref.dkd(z, zt, y, 1.0, 8.0, 4.0) + ref.cross_entropy(z, y))
  g = np.asarray(jax.grad(lambda z: losses.dkd_loss(z, zt, y)
                          + jnp.mean(losses.cross_entropy(z, y)))(jnp.asarray(zs)))
  eps = 1e-4 * scale
  numeric = np.zeros_like(g, np.float64)
  z64 = zs.astype(np.float64)
  for idx in np.ndindex(zs.shape):
    dz = np.zeros_like(z64)
    dz[idx] = eps
    numeric[idx] = (ref_loss(z64 + dz) - ref_loss(z64 - dz)) / (2 * eps)
  np.testing.assert_allclose(g, numeric, rtol=1e-3, atol=1e-4)


def test_second_order_autodiff_of_dkd_and_ce_is_finite():
  zs = jnp.asarray(make_logits((4, 6), 1.0, 21))
  zt = jnp.asarray(make_logits((4, 6), 1.0, 22))
  y = jnp.asarray(make_labels((4, 6), 6, 23))
  h = jax.hessian(lambda z: losses.dkd_loss(z, zt, y) + jnp.mean(losses.cross_entropy(z, y)))(zs)
  assert np.all(np.isfinite(h))


def test_temperature_may_be_traced_and_differentiated():
  zs, zt = make_logits((8, 10), 2.0, 24), make_logits((8, 10), 2.0, 25)
  f = jax.jit(lambda t: losses.kd_loss(zs, zt, temperature=t))
  np.testing.assert_allclose(f(4.0), losses.kd_loss(zs, zt, temperature=4.0), rtol=1e-6)
  eps = 1e-2
  numeric = (f(4.0 + eps) - f(4.0 - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(f)(4.0), numeric, rtol=2e-2)


def test_traced_temperature_skips_the_value_check_under_every_transformation():
  """check_positive cannot see a traced value: under jit, grad and vmap it passes through."""
  zs, zt = make_logits((8, 10), 2.0, 47), make_logits((8, 10), 2.0, 48)
  kd = lambda t: losses.kd_loss(zs, zt, temperature=t)
  expected = kd(4.0)
  np.testing.assert_allclose(jax.jit(kd)(4.0), expected, rtol=1e-6)
  assert np.isfinite(jax.grad(kd)(4.0))
  np.testing.assert_allclose(jax.vmap(kd)(jnp.array([4.0, 4.0])), [expected] * 2, rtol=1e-6)
  assert np.isfinite(jax.jit(jax.vmap(jax.grad(kd)))(jnp.array([2.0, 4.0]))).all()
  # Concrete values of every kind are still checked.
  for bad in (0.0, -1.0, float("inf"), float("nan"), jnp.float32(0.0), np.zeros(2), None, "x"):
    with pytest.raises(ValueError, match="temperature"):
      kd(bad)


def test_public_surface():
  """`__all__` lists the public functions; the shared numerics stay in the private module."""
  assert losses.__all__ == ["cross_entropy", "kl_divergence", "dkd_divergence", "weighted_mean",
                            "kd_loss", "dkd_loss"]
  assert all(callable(getattr(losses, name)) for name in losses.__all__)
  for helper in ("as_float32", "check_positive", "mask_rows", "row_max", "scaled_shift",
                 "softmax_moments", "expectation", "shifted_logsumexp"):
    assert not hasattr(losses, helper), helper


# --- extreme and masked input --------------------------------------------------------------


def test_extreme_logits_give_finite_losses_and_gradients():
  rng = np.random.default_rng(26)
  zs = (rng.choice([-1e4, 1e4], (8, 10)) * rng.random((8, 10))).astype(np.float32)
  zt = (rng.choice([-1e4, 1e4], (8, 10)) * rng.random((8, 10))).astype(np.float32)
  y = rng.integers(0, 10, 8)
  # Rows the mask drops hold ±inf and NaN; a kept row has masked-out (−inf) classes.
  where = np.ones(8, bool)
  where[5:] = False
  zs[5:], zt[5:] = np.inf, -np.inf
  zs[6, 0] = np.nan
  zs[0, :3] = zt[0, :3] = -np.inf

  def total(zs):
    return (losses.kd_loss(zs, zt, temperature=4.0, where=where)
            + losses.dkd_loss(zs, zt, y, where=where)
            + losses.weighted_mean(losses.cross_entropy(_logits.mask_rows(zs, where), y),
                                   where=where))

  value, grad = jax.value_and_grad(total)(jnp.asarray(zs))
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[5:] == 0.0)
  # The kept rows still agree with the reference (float64 handles ±1e4 / 4 fine).
  np.testing.assert_allclose(
      losses.kl_divergence(zs[:5], zt[:5], temperature=4.0), ref.kl(zs[:5], zt[:5], 4.0),
      rtol=1e-4, atol=0.5)


def test_masked_classes_contribute_nothing():
  """A class at −inf in both student and teacher is the same as the class not existing."""
  zs, zt = make_logits((5, 8), 2.0, 27), make_logits((5, 8), 2.0, 28)
  zs_inf, zt_inf = zs.copy(), zt.copy()
  zs_inf[:, -2:] = zt_inf[:, -2:] = -np.inf
  np.testing.assert_allclose(losses.kl_divergence(zs_inf, zt_inf),
                             losses.kl_divergence(zs[:, :-2], zt[:, :-2]), rtol=1e-6, atol=1e-7)


def test_kl_is_infinite_where_the_student_excludes_a_class_the_teacher_keeps():
  """0·log 0 = 0 and p·log(p/0) = +inf, without a select in the sweep (`_logits.kl_cross`)."""
  zs = np.array([[0.0, -np.inf, 1.0], [0.0, -np.inf, 1.0], [0.0, 1.0, 2.0]], np.float32)
  zt = np.array([[0.0, 0.0, 1.0], [0.0, -np.inf, 1.0], [0.0, -np.inf, 2.0]], np.float32)
  for temperature in (1.0, 4.0):
    got = np.asarray(losses.kl_divergence(zs, zt, temperature=temperature))
    assert got[0] == np.inf
    np.testing.assert_allclose(got[1], 0.0, atol=1e-7)
    # Row 2: the teacher's class at −inf contributes nothing; the student keeps its mass there.
    log_ps = zs[2] / temperature - np.log(np.sum(np.exp(zs[2].astype(np.float64) / temperature)))
    pt = np.exp(zt[2].astype(np.float64) / temperature)
    pt /= pt.sum()
    keep = pt > 0
    expected = np.sum(pt[keep] * (np.log(pt[keep]) - log_ps[keep]))
    np.testing.assert_allclose(got[2], expected, rtol=1e-5)


def test_bfloat16_inputs_compute_in_float32():
  zs, zt = make_logits((32, 100), 3.0, 29), make_logits((32, 100), 3.0, 30)
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  got = losses.kl_divergence(zs16, zt16, temperature=4.0)
  assert got.dtype == jnp.float32
  expected = ref.kl(np.asarray(zs16, np.float32), np.asarray(zt16, np.float32), 4.0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  g = jax.grad(lambda z: losses.kd_loss(z, zt16))(zs16)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: losses.kl_divergence(np.zeros((4, 5)), np.zeros((4, 6))), "same shape"),
    (lambda: losses.kd_loss(np.zeros((4, 5)), np.zeros((3, 5))), "same shape"),
    (lambda: losses.kl_divergence(np.zeros((4, 5)), np.zeros((4, 5)), temperature=0.0),
     "temperature"),
    (lambda: losses.kd_loss(np.zeros((4, 5)), np.zeros((4, 5)), temperature=-1.0),
     "temperature"),
    (lambda: losses.dkd_divergence(np.zeros((4, 5)), np.zeros((4, 5)), np.zeros(3, int)),
     "labels"),
    (lambda: losses.cross_entropy(np.zeros((4, 5)), np.zeros((4, 1), int)), "labels"),
    (lambda: losses.cross_entropy(np.zeros((4, 5)), np.zeros(4)), "labels"),
    (lambda: losses.kd_loss(np.zeros((4, 5)), np.zeros((4, 5)), where=np.ones(5, bool)),
     "where"),
    (lambda: losses.weighted_mean(np.zeros(4), np.ones(3)), "weights"),
    (lambda: losses.dkd_loss(np.zeros((4, 5)), np.zeros((4, 5)), np.zeros(4, int),
                             temperature=float("nan")), "temperature"),
    (lambda: losses.cross_entropy(np.zeros((4, 5)), np.zeros(4, int), label_smoothing=1.0),
     "label_smoothing"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bad_input_is_caught_at_trace_time_inside_jit():
  f = jax.jit(functools.partial(losses.kd_loss, temperature=0.0))
  with pytest.raises(ValueError, match="temperature"):
    f(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# --- composition ----------------------------------------------------------------------------


def test_jit_vmap_grad_compose():
  zs, zt = make_logits((5, 8, 12), 2.0, 31), make_logits((5, 8, 12), 2.0, 32)
  y = make_labels((5, 8, 12), 12, 33)
  per_group = jax.jit(jax.vmap(lambda a, b, c: losses.dkd_loss(a, b, c, beta=2.0)))(zs, zt, y)
  for i in range(5):
    np.testing.assert_allclose(per_group[i], ref.weighted_mean(ref.dkd(zs[i], zt[i], y[i],
                                                                        1.0, 2.0, 4.0)),
                               rtol=1e-4)
  g = jax.jit(jax.vmap(jax.grad(lambda a, b: losses.kd_loss(a, b))))(zs, zt)
  for i in range(5):
    np.testing.assert_allclose(g[i], jax.grad(lambda a: losses.kd_loss(a, zt[i]))(zs[i]),
                               rtol=1e-5, atol=1e-8)


def test_sharded_batch_gives_the_single_device_value():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  zs, zt = make_logits((64, 100), 3.0, 34), make_logits((64, 100), 3.0, 35)
  w = np.random.default_rng(36).random(64).astype(np.float32)
  where = make_mask((64, 100), 37)

  def loss_and_grad(zs, zt, w, where):
    return jax.value_and_grad(
        lambda z: losses.kd_loss(z, zt, temperature=4.0, weights=w, where=where))(zs)

  single = jax.jit(loss_and_grad)(zs, zt, w, where)
  args = [jax.device_put(a, data) for a in (zs, zt, w, where)]
  sharded = jax.jit(loss_and_grad)(*args)
  assert len(args[0].sharding.device_set) == 8
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6)
  np.testing.assert_allclose(sharded[1], single[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_where_keeps_garbage_rows_out_of_values_and_gradients(soft):
  """Excluded rows holding ±inf / NaN logits and out-of-range labels give 0 there, and the
  kept rows' values and gradients equal those of the clean batch."""
  rng = np.random.default_rng(3)
  z = rng.normal(size=(6, 5)).astype(np.float32)
  labels = (rng.dirichlet(np.ones(5), 6).astype(np.float32) if soft
            else rng.integers(0, 5, 6).astype(np.int32))
  where = np.array([True, True, False, True, False, True])
  dirty_z, dirty_labels = z.copy(), labels.copy()
  dirty_z[2], dirty_z[4, 0] = np.inf, np.nan
  if soft:
    dirty_labels[2] = np.nan
  else:
    dirty_labels[4] = -7
  loss = lambda z, y: jnp.sum(losses.cross_entropy(z, y, where=where))
  clean = losses.cross_entropy(z, labels)
  got = losses.cross_entropy(dirty_z, dirty_labels, where=where)
  np.testing.assert_array_equal(np.asarray(got)[~where], 0.0)
  np.testing.assert_allclose(np.asarray(got)[where], np.asarray(clean)[where], rtol=1e-6)
  grad = np.asarray(jax.grad(loss)(dirty_z, dirty_labels))
  clean_grad = np.asarray(jax.grad(lambda z: jnp.sum(jnp.where(where, losses.cross_entropy(
      z, labels), 0.0)))(z))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, clean_grad, rtol=1e-6, atol=1e-7)
