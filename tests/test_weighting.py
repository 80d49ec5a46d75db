"""jaxkd.weighting against float64 NumPy references, plus IPWD's behavioural check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxkd import losses, weighting
import references as ref
from test_losses import CASES, make_labels, make_logits, make_mask, tol


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_entropy_matches_reference(shape, scale, temperature):
  z = make_logits(shape, scale, 0)
  got = weighting.entropy(z, temperature=temperature)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, ref.entropy(z, temperature), **tol(scale / temperature))
  assert np.all(np.asarray(got) >= -1e-5) and np.all(np.asarray(got) <= np.log(shape[-1]) + 1e-4)


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("normalize", [None, "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_teacher_entropy_weights(shape, scale, normalize, masked):
  z = make_logits(shape, scale, 1)
  where = make_mask(shape, 2) if masked else None
  h = ref.entropy(z, 4.0)
  expected = h / ref.masked_mean(h, where) if normalize else h
  got = weighting.teacher_entropy_weights(z, normalize=normalize, where=where)
  keep = np.ones(shape[:-1], bool) if where is None else where
  np.testing.assert_allclose(np.asarray(got)[keep], expected[keep], **tol(scale / 4))
  batch = weighting.teacher_entropy_weights(z, where=where, mode="batch_mean")
  np.testing.assert_allclose(batch, np.full(shape[:-1], ref.masked_mean(h, where)),
                             **tol(scale / 4))


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("h_ub", [None, 100.0])
@pytest.mark.parametrize("normalize", [None, "mean"])
def test_adaptive_entropy_weights(shape, scale, h_ub, normalize):
  zt, zs = make_logits(shape, scale, 3), make_logits(shape, scale, 4)
  bound = np.log(shape[-1]) if h_ub is None else h_ub
  expected = 0.5 * ref.entropy(zt, 3.0) * (1 + ref.entropy(zs, 3.0) / bound)
  if normalize:
    expected = expected / expected.mean()
  got = weighting.adaptive_entropy_weights(zt, zs, entropy_upper_bound=h_ub, normalize=normalize)
  np.testing.assert_allclose(got, expected, **tol(scale / 3))


@pytest.mark.parametrize("shape,scale", [c for c in CASES if c[1] <= 30])
@pytest.mark.parametrize("estimator", ["likelihood_ratio", "loss_ratio"])
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("normalize,max_weight,masked", [(None, None, False),
                                                          ("mean", 1.5, True)])
def test_inverse_propensity_weights(shape, scale, estimator, standardize, normalize, max_weight,
                                    masked):
  f, g = make_logits(shape, scale, 5), make_logits(shape, scale, 6)
  y = make_labels(shape, shape[-1], 7)
  where = make_mask(shape, 8) if masked else None
  got = weighting.inverse_propensity_weights(
      f, g, y, estimator=estimator, standardize=standardize, normalize=normalize,
      max_weight=max_weight, where=where)
  expected = ref.ipw(f, g, y, estimator, standardize, normalize, max_weight, where)
  keep = np.ones(shape[:-1], bool) if where is None else where
  np.testing.assert_allclose(np.asarray(got)[keep], expected[keep], rtol=2e-4)
  assert np.all(np.asarray(got)[keep] >= (0 if normalize else 1 - 1e-6))


def test_weights_carry_no_gradient():
  zt, zs = make_logits((8, 10), 2.0, 9), make_logits((8, 10), 2.0, 10)
  y = make_labels((8, 10), 10, 11)
  fns = [
      lambda a, b: weighting.teacher_entropy_weights(a, normalize="mean"),
      lambda a, b: weighting.adaptive_entropy_weights(a, b),
      lambda a, b: weighting.inverse_propensity_weights(a, b, y, normalize="mean"),
      lambda a, b: weighting.inverse_propensity_weights(a, b, y, estimator="loss_ratio"),
  ]
  for fn in fns:
    grads = jax.grad(lambda a, b: jnp.sum(fn(a, b) ** 2), argnums=(0, 1))(zt, zs)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_weighted_kd_composes_and_matches_reference():
  """ER-KD = kd_loss(weights=teacher entropy): τ² (1/B) Σ H_i(4) KL_i(τ)."""
  zs, zt = make_logits((64, 100), 3.0, 12), make_logits((64, 100), 3.0, 13)
  w = weighting.teacher_entropy_weights(zt)
  got = losses.kd_loss(zs, zt, temperature=4.0, weights=w)
  expected = 16 * np.mean(ref.entropy(zt, 4.0) * ref.kl(zs, zt, 4.0))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_rows_with_garbage_give_finite_weights():
  z = make_logits((6, 10), 2.0, 14)
  y = make_labels((6, 10), 10, 15)
  where = np.array([True, True, True, False, False, True])
  z[3], z[4, 0] = np.inf, np.nan
  for w in (weighting.teacher_entropy_weights(z, where=where, normalize="mean"),
            weighting.adaptive_entropy_weights(z, z, where=where),
            weighting.inverse_propensity_weights(z, z, y, where=where, normalize="mean")):
    assert np.all(np.isfinite(np.asarray(w)))


@pytest.mark.parametrize("call,match", [
    (lambda: weighting.teacher_entropy_weights(np.zeros((4, 5)), temperature=0), "temperature"),
    (lambda: weighting.teacher_entropy_weights(np.zeros((4, 5)), normalize="sum"), "normalize"),
    (lambda: weighting.teacher_entropy_weights(np.zeros((4, 5)), mode="batch"), "mode"),
    (lambda: weighting.teacher_entropy_weights(np.zeros((4, 5)), where=np.ones(3, bool)),
     "where"),
    (lambda: weighting.adaptive_entropy_weights(np.zeros((4, 5)), np.zeros((4, 6))), "same shape"),
    (lambda: weighting.adaptive_entropy_weights(np.zeros((4, 5)), np.zeros((4, 5)),
                                                entropy_upper_bound=0.0), "entropy_upper_bound"),
    (lambda: weighting.inverse_propensity_weights(np.zeros((4, 5)), np.zeros((4, 5)),
                                                  np.zeros(4, int), estimator="odds"), "estimator"),
    (lambda: weighting.inverse_propensity_weights(np.zeros((4, 5)), np.zeros((4, 5)),
                                                  np.zeros(5, int)), "labels"),
    (lambda: weighting.inverse_propensity_weights(np.zeros((4, 5)), np.zeros((4, 5)),
                                                  np.zeros(4, int), max_weight=-1.0), "max_weight"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_ipwd_weight_falls_with_teacher_class_mass():
  """The behaviour that stands in for the unread paper (docs/METHODS.md#the-ipwd-reconstruction).

  A teacher whose summed probability per class is long-tailed (its "machine domain" is
  imbalanced, Fig. 1 of the paper) is mimicked by the KD head; the CE head sees balanced
  ground truth. Examples of classes the teacher favours are then well represented in the
  machine domain, so their inverse-propensity weight must be lower: the Spearman correlation
  between a class's teacher mass and its mean weight is clearly negative.
  """
  rng = np.random.default_rng(16)
  num_classes, per_class = 50, 40
  y = np.repeat(np.arange(num_classes), per_class)
  rng.shuffle(y)
  n = len(y)
  # Teacher: a class prior bias with a long tail (exponential profile) plus the label signal.
  bias = 8.0 * np.exp(-np.arange(num_classes) / 10.0)
  bias = bias[rng.permutation(num_classes)]  # the head classes are not simply the first ids
  onehot = np.eye(num_classes)[y]
  teacher = bias + 3.0 * onehot + rng.standard_normal((n, num_classes))
  kd_head = teacher + 0.5 * rng.standard_normal((n, num_classes))          # mimics the teacher
  ce_head = 3.0 * onehot + rng.standard_normal((n, num_classes))           # balanced, no bias
  teacher_mass = ref.softmax(teacher / 4.0).sum(0)                          # Fig. 1's curve
  assert teacher_mass.max() / teacher_mass.min() > 3                        # long-tailed
  w = np.asarray(weighting.inverse_propensity_weights(
      kd_head.astype(np.float32), ce_head.astype(np.float32), y.astype(np.int32)))
  class_weight = np.array([w[y == c].mean() for c in range(num_classes)])
  rho = stats.spearmanr(teacher_mass, class_weight).statistic
  assert rho < -0.7, rho
  # The literal "loss_ratio" reading (1 + CE_ce / CE_kd) weights the same heads the opposite
  # way, up-weighting the teacher's favoured classes: why it is not the default
  # (docs/METHODS.md#the-ipwd-reconstruction).
  w_lr = np.asarray(weighting.inverse_propensity_weights(
      kd_head.astype(np.float32), ce_head.astype(np.float32), y.astype(np.int32),
      estimator="loss_ratio"))
  class_weight_lr = np.array([w_lr[y == c].mean() for c in range(num_classes)])
  rho_lr = stats.spearmanr(teacher_mass, class_weight_lr).statistic
  assert rho_lr > 0.5, rho_lr


def test_public_surface_and_sibling_of_losses():
  """`__all__` lists the public names; weighting reaches the numerics through `_logits` only."""
  assert weighting.__all__ == ["NORMALIZE_OPTIONS", "ESTIMATORS", "ENTROPY_MODES", "entropy",
                               "teacher_entropy_weights", "adaptive_entropy_weights",
                               "standardize_logits", "inverse_propensity_weights"]
  for name in weighting.__all__:
    assert hasattr(weighting, name), name
  assert not hasattr(weighting, "losses")
  assert weighting.NORMALIZE_OPTIONS == (None, "mean")
  assert weighting.ESTIMATORS == ("likelihood_ratio", "loss_ratio")
  assert weighting.ENTROPY_MODES == ("per_example", "batch_mean")


def test_reweighted_kd_writes_no_class_sized_temporary():
  """Weights and KL read the logits in sweeps that keep only per-row values (XLA:CPU).

  A property of the compiled program, not a timing: its temporaries stay far below one
  `[N, C]` float32 array, for plain KD and for every weighting composed with it in one jit
  (before, ER-KD/EA-KD/IPWD wrote 2-4 such arrays:
  benchmarks/results/losses-hlo-passes-cpu-2core.md).
  """
  shape = (512, 256)
  zs, zt, g = (jnp.asarray(make_logits(shape, 3.0, seed)) for seed in (16, 17, 18))
  y = jnp.asarray(make_labels(shape, shape[-1], 19))
  objectives = {
      "KD": lambda s: losses.kd_loss(s, zt),
      "ER-KD": lambda s: losses.kd_loss(s, zt, weights=weighting.teacher_entropy_weights(zt)),
      "EA-KD": lambda s: losses.kd_loss(s, zt, weights=weighting.adaptive_entropy_weights(zt, s)),
      "IPWD": lambda s: losses.kd_loss(
          s, zt, weights=weighting.inverse_propensity_weights(s, g, y)),
  }
  one_array = np.prod(shape) * 4
  for name, fn in objectives.items():
    compiled = jax.jit(jax.value_and_grad(fn)).lower(zs).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < one_array / 4, (name, temp, one_array)
