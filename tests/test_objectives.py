"""jaxkd.objectives: each named method's total objective against a float64 NumPy reference.

Each test builds its objective the way a run does, from a config preset
(`configs/cifar100.py`, `configs/imagenet.py`, `configs/quickstart.py`,
`jaxkd.config.apply_method`), and compares `objectives.objective` (jitted, the step traced as
in the train step) with the formula the docs state (docs/METHODS.md#kd,
docs/METHODS.md#dkd, docs/METHODS.md#er-kd, docs/METHODS.md#ea-kd, docs/METHODS.md#ipwd,
docs/METHODS.md#self-distillation), written out with the preset's numbers in the test's
docstring. The references below use plain float64 log-softmax and none of jaxkd's numerics.

Notation as docs/METHODS.md#notation: N kept examples, mean_i over them, CE_i = −log
softmax(z^s_i)_y, KL_i(τ) = Σ_c p^t_ic (log p^t_ic − log p^s_ic), p(τ) = softmax(z/τ),
H(p) = −Σ_c p_c log p_c; e = step // steps_per_epoch + 1 is the epoch counted from 1.

Compiling is what costs here, so the objectives of a group of tests that share a batch are
compiled together, once, in one program evaluated at every step of the group (`_Group`);
each test then reads its entries.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxkd import config as jconfig
from jaxkd import objectives
from jaxkd import suite
from jaxkd.objectives import LossConfig, Objective

np.seterr(invalid="ignore", divide="ignore")

TOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# float64 references of the formulas.


def log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def xlogy_sum(p, v):
  return np.sum(np.where(p > 0, p * v, 0.0), -1)


def ce(z, y):
  """CE_i = −log softmax(z_i)_{y_i}."""
  return -np.take_along_axis(log_softmax(z), np.asarray(y)[:, None], -1)[:, 0]


def soft_ce(z, q):
  """CE(z_i, q_i) = −Σ_c q_ic log softmax(z_i)_c."""
  return -np.sum(np.asarray(q, np.float64) * log_softmax(z), -1)


def kl(zs, zt, tau):
  """KL_i(τ), without τ²."""
  ls = log_softmax(np.asarray(zs, np.float64) / tau)
  lt = log_softmax(np.asarray(zt, np.float64) / tau)
  return xlogy_sum(np.exp(lt), lt - ls)


def entropy(z, tau):
  """H(softmax(z_i/τ))."""
  lp = log_softmax(np.asarray(z, np.float64) / tau)
  return -xlogy_sum(np.exp(lp), lp)


def dkd(zs, zt, y, *, alpha, beta, tau):
  """α·TCKD_i + β·NCKD_i with TCKD_i = τ²·KL(b^t‖b^s), b = (p_y, 1 − p_y), and
  NCKD_i = τ²·KL(p̂^t‖p̂^s), p̂ = softmax of z/τ over the classes c ≠ y."""
  onehot = np.eye(np.shape(zs)[-1], dtype=bool)[y]

  def parts(z):
    p = np.exp(log_softmax(np.asarray(z, np.float64) / tau))
    p_y = p[onehot]
    b = np.stack([p_y, 1.0 - p_y], -1)
    p_hat = np.where(onehot, 0.0, p) / (1.0 - p_y)[:, None]
    return b, p_hat

  bs, ps = parts(zs)
  bt, pt = parts(zt)
  tckd = xlogy_sum(bt, np.log(bt) - np.log(bs))
  nckd = xlogy_sum(pt, np.log(pt) - np.log(np.where(onehot, 1.0, ps)))
  return tau**2 * (alpha * tckd + beta * nckd)


def standardize(z):
  """(z − mean_c z) / (sd_c z + 1e-7), unbiased sd."""
  z = np.asarray(z, np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def ipw_weights(f, g, y, *, estimator="likelihood_ratio", normalize=None, max_weight=None):
  """q_f = softmax(std(f))_y, q_g = softmax(std(g))_y;
  likelihood_ratio: w = 1 / P(machine | x, y) = (q_f + q_g) / q_f;
  loss_ratio: w = 1 + CE_g / CE_f = 1 + log q_g / log q_f;
  then w / mean(w) if normalize="mean", then min(w, max_weight)."""
  log_qf = np.take_along_axis(log_softmax(standardize(f)), y[:, None], -1)[:, 0]
  log_qg = np.take_along_axis(log_softmax(standardize(g)), y[:, None], -1)[:, 0]
  if estimator == "likelihood_ratio":
    q_f, q_g = np.exp(log_qf), np.exp(log_qg)
    w = 1.0 / (q_f / (q_f + q_g))
  else:
    w = 1.0 + log_qg / log_qf
  if normalize == "mean":
    w = w / w.mean()
  if max_weight is not None:
    w = np.minimum(w, max_weight)
  return w


def ea_weights(zt, zs, *, t, h_ub):
  """w_i = ½ · H(p^t_i(t)) · (1 + H(p^s_i(t)) / H_ub)."""
  return 0.5 * entropy(zt, t) * (1.0 + entropy(zs, t) / h_ub)


def kd_objective(zs, zt, y, *, ce_weight, kd_weight, tau, w=None, aux=None):
  """w_CE · mean_i CE_i + w_KD · τ² · mean_i(w_i · KL_i(τ))  [+ mean_i CE(g_i, y_i)]."""
  w = np.ones(len(y)) if w is None else w
  loss = ce_weight * ce(zs, y).mean() + kd_weight * tau**2 * np.mean(w * kl(zs, zt, tau))
  return loss + (ce(aux, y).mean() if aux is not None else 0.0)


def dkd_objective(zs, zt, y, *, ce_weight, kd_weight, tau, alpha, beta, ramp, w=None):
  """w_CE · mean_i CE_i + w_KD · ramp(e) · mean_i(w_i · (α·TCKD_i + β·NCKD_i))."""
  w = np.ones(len(y)) if w is None else w
  per_example = dkd(zs, zt, y, alpha=alpha, beta=beta, tau=tau)
  return ce_weight * ce(zs, y).mean() + kd_weight * ramp * np.mean(w * per_example)


def self_objective(f, p_prev, y, *, alpha, w=None, aux=None):
  """(1 − α_e) · mean_i CE(f_i, y_i) + α_e · mean_i(w_i · CE(f_i, p_prev,i))
  [+ mean_i CE(g_i, y_i)]."""
  w = np.ones(len(y)) if w is None else w
  loss = (1 - alpha) * ce(f, y).mean() + alpha * np.mean(w * soft_ce(f, p_prev))
  return loss + (ce(aux, y).mean() if aux is not None else 0.0)


# --------------------------------------------------------------------------------------------
# Inputs, configs and the compiled groups.


def make_batch(shape, seed):
  """Student, teacher and auxiliary-head logits, previous-epoch probabilities, labels.

  The teacher mostly knows the label, and its rows run from flat to sharp so that the
  per-example entropies differ."""
  rng = np.random.default_rng(seed)
  n, c = shape
  zs = (rng.standard_normal(shape) * 2.0).astype(np.float32)
  zt = (rng.standard_normal(shape) * 3.0).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  zt[np.arange(n), y] += 3.0
  zt *= np.geomspace(0.3, 3.0, n, dtype=np.float32)[:, None]
  g = (rng.standard_normal(shape) * 2.0).astype(np.float32)
  prev = np.exp(log_softmax(rng.standard_normal(shape) * 2.0)).astype(np.float32)
  return dict(zs=zs, zt=zt, y=y, g=g, prev=prev)


load_config = helpers.config_module


def preset(name, arg=None, **overrides):
  """The objective a run of `configs/<name>.py:<arg>` trains with; `overrides` set fields of
  the config first (dotted names as `self_distill.alpha_final`)."""
  c = load_config(name).get_config(arg)
  for key, value in overrides.items():
    node, leaf = c, key.split(".")
    for part in leaf[:-1]:
      node = node[part]
    node[leaf[-1]] = value
  return jconfig._objective(c)


def method_objective(method, mode="distill"):
  c = jconfig.apply_method(jconfig.default_config(), method)
  c.mode = mode
  return jconfig._objective(c)


def with_loss(obj, **fields):
  return dataclasses.replace(obj, loss=dataclasses.replace(obj.loss, **fields))


@dataclasses.dataclass(frozen=True)
class Request:
  """One objective of a group: where its soft targets come from and the run's length."""
  obj: Objective
  steps_per_epoch: int = 7
  num_epochs: int = 240

  @property
  def soft(self):
    return {"labels": None, "teacher": "zt", "self": "prev"}[self.obj.targets]


class _Group:
  """Objectives on one batch, compiled in one jitted program, each vmapped over `steps`."""

  def __init__(self, batch, steps, requests):
    self.batch, self.steps, self.requests = batch, list(steps), requests

  @functools.cached_property
  def _results(self):
    def one(req, data, step):
      return objectives.objective(
          req.obj, data["zs"], data[req.soft] if req.soft else None, data["y"], step=step,
          steps_per_epoch=req.steps_per_epoch, num_epochs=req.num_epochs,
          aux_logits=data["g"] if req.obj.loss.needs_aux_head else None)

    def program(data, steps):
      return {name: jax.vmap(functools.partial(one, req, data))(steps)
              for name, req in self.requests.items()}
    out = jax.jit(program)(self.batch, jnp.asarray(self.steps, jnp.int32))
    return jax.tree.map(np.asarray, out)

  def __call__(self, name, step=0):
    """(loss, metrics) of objective `name` at `step`, as Python floats; the per-example
    weights of a weighted objective (`[B]`, for the trainer's diagnostics) are left out after
    a check of their shape and mean."""
    loss, metrics = self._results[name]
    i = self.steps.index(step)
    assert loss[i] == metrics["loss"][i]
    if "weights" in metrics:
      w = metrics["weights"][i]
      assert w.shape == self.batch["y"].shape
      np.testing.assert_allclose(w.mean(), metrics["weight_mean"][i], rtol=1e-5)
    return float(loss[i]), {k: float(v[i]) for k, v in metrics.items() if k != "weights"}


SPE = 7   # steps per epoch of every group but the quickstart's

CIFAR = _Group(make_batch((16, 100), 0), steps=[
    0, 6, 7, 27, 28, 70, 19 * SPE - 1, 19 * SPE, 20 * SPE - 1, 20 * SPE, 30 * SPE, 500,
    100 * SPE, 119 * SPE, 150 * SPE, 240 * SPE - 1], requests=dict(
    teacher=Request(preset("cifar100", "resnet32x4")),
    kd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=kd")),
    erkd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=erkd")),
    eakd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=eakd")),
    eakd_paper=Request(preset("cifar100", "resnet32x4-resnet8x4,method=eakd,paper")),
    ipwd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=ipwd")),
    ipwd_loss_ratio=Request(with_loss(preset("cifar100", "resnet32x4-resnet8x4,method=ipwd"),
                                      ipw_estimator="loss_ratio")),
    ipwd_mean_clip=Request(with_loss(preset("cifar100", "resnet32x4-resnet8x4,method=ipwd"),
                                     normalize="mean", ipw_max_weight=1.2)),
    dkd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=dkd")),
    dkd_per_step=Request(with_loss(preset("cifar100", "resnet32x4-resnet8x4,method=dkd"),
                                   dkd_warmup_per_step=True)),
    dkd_r56_no_warmup=Request(with_loss(preset("cifar100", "resnet56-resnet20,method=dkd"),
                                        dkd_warmup_epochs=0.0)),
    erdkd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=erdkd")),
    erdkd_batch_mean=Request(preset("cifar100", "resnet32x4-resnet8x4,method=erdkd",
                                    **{"loss.entropy_mode": "batch_mean"})),
    eadkd=Request(preset("cifar100", "resnet32x4-resnet8x4,method=eadkd")),
    pskd=Request(preset("cifar100", "resnet8x4,self_distill")),
    pskd_ipw=Request(preset("cifar100", "resnet8x4,self_distill,method=ipwd",
                            **{"self_distill.ipw_start_epoch": 5})),
))

IMAGENET = _Group(make_batch((8, 1000), 1), steps=[0, 3 * 7], requests=dict(
    kd=Request(preset("imagenet", "r34-r18,method=kd")),
    erkd=Request(preset("imagenet", "r34-r18,method=erkd")),
    eakd=Request(preset("imagenet", "r34-r18,method=eakd")),
    ipwd=Request(preset("imagenet", "r34-r18,method=ipwd")),
    dkd_r34_r18=Request(preset("imagenet", "r34-r18,method=dkd")),
    dkd_r50_mv1=Request(preset("imagenet", "r50-mv1,method=dkd")),
    eadkd=Request(preset("imagenet", "r34-r18,method=eadkd")),
    eadkd_paper=Request(preset("imagenet", "r34-r18,method=eadkd,paper")),
))


def _quickstart_run(name):
  runs = dict(suite.expand(load_config("quickstart").get_config(), "/quickstart-workdir"))
  return {m.name: m for m in jconfig.resolve(runs["students"]).members}[name].objective


SMALL = _Group(make_batch((8, 10), 2), steps=[0, 3, 9, 10, 14, 25], requests=dict(
    kd_in_teacher_mode=Request(method_objective("kd", mode="teacher")),
    quickstart_ce=Request(_quickstart_run("ce")),
    quickstart_eakd=Request(_quickstart_run("eakd")),
    quickstart_dkd=Request(_quickstart_run("dkd"), steps_per_epoch=10, num_epochs=1),
    pskd_alpha_half=Request(preset("cifar100", "resnet8x4,self_distill,epochs=10",
                                   **{"self_distill.alpha_final": 0.5}), num_epochs=10),
))


# --------------------------------------------------------------------------------------------
# ce


def test_ce_teacher_preset_is_plain_cross_entropy():
  """A teacher (supervised) run: L = mean_i CE_i, ce_weight 1, no soft targets."""
  obj = CIFAR.requests["teacher"].obj
  assert obj.targets == "labels" and obj.loss.base == "ce" and obj.loss.ce_weight == 1.0
  b = CIFAR.batch
  loss, metrics = CIFAR("teacher")
  np.testing.assert_allclose(loss, ce(b["zs"], b["y"]).mean(), **TOL)
  np.testing.assert_allclose(metrics["ce"], ce(b["zs"], b["y"]).mean(), **TOL)
  assert set(metrics) == {"ce", "loss"}


def test_teacher_mode_overrides_a_distillation_loss():
  """mode=teacher with method=kd still trains plain CE at weight 1 (not 0.1 · CE)."""
  obj = SMALL.requests["kd_in_teacher_mode"].obj
  assert (obj.loss.base, obj.loss.weighting, obj.loss.ce_weight) == ("ce", "none", 1.0)
  b = SMALL.batch
  np.testing.assert_allclose(SMALL("kd_in_teacher_mode")[0], ce(b["zs"], b["y"]).mean(), **TOL)


def test_vanilla_student_method_ce():
  """method=ce (the quickstart's vanilla student): L = 1 · mean_i CE_i, kd_weight 0."""
  assert SMALL.requests["quickstart_ce"].obj.targets == "labels"
  b = SMALL.batch
  np.testing.assert_allclose(SMALL("quickstart_ce")[0], ce(b["zs"], b["y"]).mean(), **TOL)


# --------------------------------------------------------------------------------------------
# kd, erkd, eakd


def test_kd_cifar_preset():
  """CIFAR KD: L = 0.1 · mean CE_i + 0.9 · 4² · mean KL_i(4)."""
  b = CIFAR.batch
  loss, metrics = CIFAR("kd")
  np.testing.assert_allclose(
      loss, kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0), **TOL)
  np.testing.assert_allclose(metrics["kd"], 16 * kl(b["zs"], b["zt"], 4.0).mean(), **TOL)
  np.testing.assert_allclose(metrics["ce"], ce(b["zs"], b["y"]).mean(), **TOL)
  assert set(metrics) == {"ce", "kd", "loss"}


def test_kd_does_not_depend_on_the_step():
  """No ramp outside DKD: the KD objective is the same at the first and the last step."""
  assert CIFAR("kd", 0)[0] == CIFAR("kd", 240 * SPE - 1)[0]


def test_kd_imagenet_preset():
  """ImageNet KD: L = 0.5 · mean CE_i + 0.5 · 1² · mean KL_i(1)."""
  b = IMAGENET.batch
  np.testing.assert_allclose(
      IMAGENET("kd")[0],
      kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.5, kd_weight=0.5, tau=1.0), **TOL)


def test_erkd_cifar_preset():
  """ER-KD: w_i = H(p^t_i(4)); L = 0.1 · mean CE_i + 0.9 · 4² · mean_i(w_i · KL_i(4))."""
  b = CIFAR.batch
  w = entropy(b["zt"], 4.0)
  loss, metrics = CIFAR("erkd")
  np.testing.assert_allclose(
      loss, kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w),
      **TOL)
  np.testing.assert_allclose(metrics["weight_mean"], w.mean(), **TOL)
  np.testing.assert_allclose(metrics["weight_max"], w.max(), **TOL)
  np.testing.assert_allclose(metrics["kd"], 16 * np.mean(w * kl(b["zs"], b["zt"], 4.0)), **TOL)


def test_erkd_imagenet_keeps_entropy_temperature_4():
  """ImageNet ER-KD: τ = 1 for the KL but τ′ = 4 for the weight;
  L = 0.5 · mean CE_i + 0.5 · mean_i(H(p^t_i(4)) · KL_i(1))."""
  b = IMAGENET.batch
  np.testing.assert_allclose(
      IMAGENET("erkd")[0],
      kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.5, kd_weight=0.5, tau=1.0,
                   w=entropy(b["zt"], 4.0)), **TOL)


def test_eakd_cifar_preset_uses_reference_upper_bound_100():
  """CIFAR EA-KD as the reference code runs it: w_i = ½ H^t_i(3) (1 + H^s_i(3) / 100);
  L = 0.1 · mean CE_i + 0.9 · 4² · mean_i(w_i · KL_i(4))."""
  assert CIFAR.requests["eakd"].obj.loss.entropy_upper_bound == 100.0
  b = CIFAR.batch
  w = ea_weights(b["zt"], b["zs"], t=3.0, h_ub=100.0)
  loss, metrics = CIFAR("eakd")
  np.testing.assert_allclose(
      loss, kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w),
      **TOL)
  np.testing.assert_allclose(metrics["weight_mean"], w.mean(), **TOL)
  np.testing.assert_allclose(metrics["weight_max"], w.max(), **TOL)


def test_eakd_paper_variant_uses_ln_c():
  """The `paper` flag: H_ub = ln C = ln 100; w_i = ½ H^t_i(3) (1 + H^s_i(3) / ln 100)."""
  assert CIFAR.requests["eakd_paper"].obj.loss.entropy_upper_bound is None
  b = CIFAR.batch
  w = ea_weights(b["zt"], b["zs"], t=3.0, h_ub=math.log(100))
  loss, _ = CIFAR("eakd_paper")
  np.testing.assert_allclose(
      loss, kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w),
      **TOL)
  # The reference code's 100 and the paper's ln C give visibly different losses.
  assert abs(loss - CIFAR("eakd")[0]) > 0.05 * loss


def test_eakd_quickstart_defaults_to_ln_c():
  """The quickstart's EA-KD keeps H_ub = ln C = ln 10; τ 4, 0.1 / 0.9 as on CIFAR."""
  assert SMALL.requests["quickstart_eakd"].obj.loss.entropy_upper_bound is None
  b = SMALL.batch
  w = ea_weights(b["zt"], b["zs"], t=3.0, h_ub=math.log(10))
  np.testing.assert_allclose(
      SMALL("quickstart_eakd")[0],
      kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w), **TOL)


def test_eakd_imagenet_preset():
  """ImageNet EA-KD: t = 2, H_ub = ln 1000, 1.0 · CE + 0.5 · KD at τ = 1;
  L = mean CE_i + 0.5 · mean_i(½ H^t_i(2) (1 + H^s_i(2) / ln 1000) · KL_i(1))."""
  b = IMAGENET.batch
  w = ea_weights(b["zt"], b["zs"], t=2.0, h_ub=math.log(1000))
  np.testing.assert_allclose(
      IMAGENET("eakd")[0],
      kd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=0.5, tau=1.0, w=w), **TOL)


# --------------------------------------------------------------------------------------------
# ipwd


def test_ipwd_cifar_preset():
  """IPWD (likelihood_ratio, standardised logits): w_i = (q_f + q_g) / q_f;
  L = 0.1 · mean CE(f)_i + 0.9 · 4² · mean_i(w_i · KL_i(4)) + mean_i CE(g)_i."""
  obj = CIFAR.requests["ipwd"].obj
  assert obj.loss.ipw_estimator == "likelihood_ratio" and obj.loss.ipw_standardize
  b = CIFAR.batch
  w = ipw_weights(b["zs"], b["g"], b["y"])
  loss, metrics = CIFAR("ipwd")
  np.testing.assert_allclose(
      loss, kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w,
                         aux=b["g"]), **TOL)
  np.testing.assert_allclose(metrics["aux_ce"], ce(b["g"], b["y"]).mean(), **TOL)
  np.testing.assert_allclose(metrics["weight_mean"], w.mean(), **TOL)
  np.testing.assert_allclose(metrics["weight_max"], w.max(), **TOL)
  assert w.min() >= 1.0


def test_ipwd_imagenet_preset():
  """ImageNet IPWD: L = 0.5 · mean CE(f)_i + 0.5 · mean_i(w_i · KL_i(1)) + mean_i CE(g)_i."""
  b = IMAGENET.batch
  np.testing.assert_allclose(
      IMAGENET("ipwd")[0],
      kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.5, kd_weight=0.5, tau=1.0,
                   w=ipw_weights(b["zs"], b["g"], b["y"]), aux=b["g"]), **TOL)


@pytest.mark.parametrize("name,estimator,normalize,max_weight",
                         [("ipwd_loss_ratio", "loss_ratio", None, None),
                          ("ipwd_mean_clip", "likelihood_ratio", "mean", 1.2)])
def test_ipwd_options(name, estimator, normalize, max_weight):
  """loss_ratio: w = 1 + CE_g / CE_f; normalize="mean" divides by the batch mean first,
  then ipw_max_weight clips."""
  b = CIFAR.batch
  w = ipw_weights(b["zs"], b["g"], b["y"], estimator=estimator, normalize=normalize,
                  max_weight=max_weight)
  loss, metrics = CIFAR(name)
  np.testing.assert_allclose(
      loss, kd_objective(b["zs"], b["zt"], b["y"], ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w,
                         aux=b["g"]), **TOL)
  np.testing.assert_allclose(metrics["weight_max"], w.max(), **TOL)
  if max_weight is not None:
    assert w.max() == max_weight   # the clip is active on this batch


def test_ipwd_without_aux_logits_fails():
  obj = method_objective("ipwd")
  b = SMALL.batch
  with pytest.raises(ValueError, match="auxiliary head"):
    jax.eval_shape(lambda: objectives.objective(obj, b["zs"], b["zt"], b["y"], step=0,
                                                steps_per_epoch=1, num_epochs=1))


@functools.cache
def _gradients():
  """∂L/∂(z^s, z^t) of the quickstart EA-KD and ∂L/∂(f, z^t, g) of IPWD, one program."""
  eakd, ipwd = method_objective("eakd"), method_objective("ipwd")

  def program(b):
    def loss(obj, zs, zt, g):
      return objectives.objective(obj, zs, zt, b["y"], step=0, steps_per_epoch=1, num_epochs=1,
                                  aux_logits=g)[0]
    return (jax.grad(lambda zs, zt: loss(eakd, zs, zt, None), argnums=(0, 1))(b["zs"], b["zt"]),
            jax.grad(functools.partial(loss, ipwd), argnums=(0, 1, 2))(b["zs"], b["zt"], b["g"]))
  return jax.tree.map(np.asarray, jax.jit(program)(SMALL.batch))


def _kd_gradient(b, w, *, ce_weight=0.1, kd_weight=0.9, tau=4.0):
  """(w_CE (softmax(z^s_i) − onehot_i) + w_KD · τ · w_i (p^s_i(τ) − p^t_i(τ))) / N."""
  n, c = b["zs"].shape
  onehot = np.eye(c)[b["y"]]
  ps, pt = np.exp(log_softmax(b["zs"] / tau)), np.exp(log_softmax(b["zt"] / tau))
  return (ce_weight * (np.exp(log_softmax(b["zs"])) - onehot)
          + kd_weight * tau * w[:, None] * (ps - pt)) / n


def test_eakd_weights_carry_no_gradient():
  """The student's entropy is detached and the teacher frozen: ∂L/∂z^s is KD's with w_i
  constant, ∂L/∂z^t = 0."""
  (d_s, d_t), _ = _gradients()
  b = SMALL.batch
  w = ea_weights(b["zt"], b["zs"], t=3.0, h_ub=math.log(10))
  np.testing.assert_allclose(d_s, _kd_gradient(b, w), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(d_t, 0.0)


def test_ipwd_gradients():
  """Weights are constants and the teacher is frozen: ∂L/∂f is KD's with w_i constant,
  ∂L/∂g = (softmax(g_i) − onehot_i) / N (only the auxiliary CE), ∂L/∂z^t = 0."""
  _, (d_f, d_t, d_g) = _gradients()
  b = SMALL.batch
  onehot = np.eye(10)[b["y"]]
  np.testing.assert_allclose(d_f, _kd_gradient(b, ipw_weights(b["zs"], b["g"], b["y"])),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d_g, (np.exp(log_softmax(b["g"])) - onehot) / 8, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_array_equal(d_t, 0.0)


# --------------------------------------------------------------------------------------------
# dkd, erdkd, eadkd


@pytest.mark.parametrize("step,epoch", [(0, 1), (6, 1), (7, 2), (19 * SPE - 1, 19),
                                        (19 * SPE, 20), (20 * SPE - 1, 20), (150 * SPE, 151)])
def test_dkd_cifar_staircase_ramp(step, epoch):
  """CIFAR DKD (resnet32x4 → resnet8x4, β 8): ramp = min(e / 20, 1), e = step // 7 + 1;
  L = 1 · mean CE_i + 1 · ramp · mean_i(1 · TCKD_i(4) + 8 · NCKD_i(4))."""
  b = CIFAR.batch
  loss, metrics = CIFAR("dkd", step)
  np.testing.assert_allclose(
      loss, dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=4.0,
                          alpha=1.0, beta=8.0, ramp=min(epoch / 20, 1.0)), **TOL)
  # The metric is the DKD term before the ramp.
  np.testing.assert_allclose(
      metrics["dkd"], dkd(b["zs"], b["zt"], b["y"], alpha=1.0, beta=8.0, tau=4.0).mean(), **TOL)


@pytest.mark.parametrize("step", [0, 6, 7, 70, 20 * SPE - 1, 20 * SPE, 500])
def test_dkd_per_step_ramp(step):
  """dkd_warmup_per_step: ramp = min(((step + 1) / steps_per_epoch) / W, 1), W = 20."""
  b = CIFAR.batch
  np.testing.assert_allclose(
      CIFAR("dkd_per_step", step)[0],
      dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=4.0, alpha=1.0,
                    beta=8.0, ramp=min((step + 1) / SPE / 20, 1.0)), **TOL)


@pytest.mark.parametrize("step", [0, 3, 9, 10, 25])
def test_dkd_quickstart_ramps_per_step_over_the_run(step):
  """Quickstart DKD: W = num_epochs = 1, per step, so ramp = min((step + 1) / spe, 1)
  (spe = 10 here)."""
  loss_cfg = SMALL.requests["quickstart_dkd"].obj.loss
  assert loss_cfg.dkd_warmup_per_step and loss_cfg.dkd_warmup_epochs == 1.0
  b = SMALL.batch
  np.testing.assert_allclose(
      SMALL("quickstart_dkd", step)[0],
      dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=4.0, alpha=1.0,
                    beta=8.0, ramp=min((step + 1) / 10, 1.0)), **TOL)


def test_dkd_pair_beta_and_no_warmup():
  """resnet56 → resnet20 takes β = 2; warm-up 0 means ramp = 1 from the first step."""
  assert CIFAR.requests["dkd_r56_no_warmup"].obj.loss.dkd_beta == 2.0
  b = CIFAR.batch
  np.testing.assert_allclose(
      CIFAR("dkd_r56_no_warmup", 0)[0],
      dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=4.0, alpha=1.0,
                    beta=2.0, ramp=1.0), **TOL)


@pytest.mark.parametrize("name,beta", [("dkd_r34_r18", 0.5), ("dkd_r50_mv1", 2.0)])
@pytest.mark.parametrize("step", [0, 3 * 7])
def test_dkd_imagenet_presets(name, beta, step):
  """ImageNet DKD: τ 1, warm-up 1 (ramp = min(e / 1, 1) = 1 from epoch 1), β per pair;
  L = mean CE_i + mean_i(TCKD_i(1) + β · NCKD_i(1))."""
  b = IMAGENET.batch
  np.testing.assert_allclose(
      IMAGENET(name, step)[0],
      dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=1.0, alpha=1.0,
                    beta=beta, ramp=1.0), **TOL)


@pytest.mark.parametrize("step", [0, 70])
def test_erdkd_per_example(step):
  """ER-DKD (resnet32x4 → resnet8x4: the ER-KD fork's β 3): w_i = H(p^t_i(4));
  L = mean CE_i + min(e / 20, 1) · mean_i(w_i · (TCKD_i(4) + 3 · NCKD_i(4)))."""
  assert CIFAR.requests["erdkd"].obj.loss.entropy_mode == "per_example"
  b = CIFAR.batch
  w = entropy(b["zt"], 4.0)
  loss, metrics = CIFAR("erdkd", step)
  np.testing.assert_allclose(
      loss, dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=4.0,
                          alpha=1.0, beta=3.0, ramp=min((step // SPE + 1) / 20, 1.0), w=w), **TOL)
  np.testing.assert_allclose(metrics["weight_mean"], w.mean(), **TOL)


def test_erdkd_batch_mean_reproduces_the_broadcast():
  """entropy_mode="batch_mean": the reference code's [N] DKD times [N, 1] entropy, averaged
  over [N, N]: L = mean CE_i + ramp · mean_{i,j}(H_i · DKD_j) (= ramp · mean H · mean DKD)."""
  b = CIFAR.batch
  h = entropy(b["zt"], 4.0)
  per_example = dkd(b["zs"], b["zt"], b["y"], alpha=1.0, beta=3.0, tau=4.0)
  broadcast = np.mean(per_example[None, :] * h[:, None])
  loss, metrics = CIFAR("erdkd_batch_mean", 27)   # epoch 4: ramp 0.2
  np.testing.assert_allclose(loss, ce(b["zs"], b["y"]).mean() + 0.2 * broadcast, **TOL)
  np.testing.assert_allclose(metrics["weight_max"], h.mean(), **TOL)
  # Not the per-example weighting on this batch.
  assert abs(broadcast - np.mean(h * per_example)) > 1e-2 * broadcast


def test_eadkd_cifar_preset():
  """CIFAR EA-DKD (reference code): w_i = ½ H^t_i(3) (1 + H^s_i(3) / 100), β 8;
  L = mean CE_i + min(e / 20, 1) · mean_i(w_i · (TCKD_i(4) + 8 · NCKD_i(4))), e = 31 here."""
  b = CIFAR.batch
  w = ea_weights(b["zt"], b["zs"], t=3.0, h_ub=100.0)
  np.testing.assert_allclose(
      CIFAR("eadkd", 30 * SPE)[0],
      dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=4.0, alpha=1.0,
                    beta=8.0, ramp=1.0, w=w), **TOL)


@pytest.mark.parametrize("name,t", [("eadkd", 3.0), ("eadkd_paper", 2.0)])
def test_eadkd_imagenet_preset(name, t):
  """ImageNet EA-DKD runs t = 3 as the reference code (its DKD weight never gets t); the
  `paper` flag gives t = 2. w_i = ½ H^t_i(t) (1 + H^s_i(t) / ln 1000), β 0.5, τ 1;
  L = mean CE_i + mean_i(w_i · (TCKD_i(1) + 0.5 · NCKD_i(1)))."""
  b = IMAGENET.batch
  w = ea_weights(b["zt"], b["zs"], t=t, h_ub=math.log(1000))
  np.testing.assert_allclose(
      IMAGENET(name)[0],
      dkd_objective(b["zs"], b["zt"], b["y"], ce_weight=1.0, kd_weight=1.0, tau=1.0, alpha=1.0,
                    beta=0.5, ramp=1.0, w=w), **TOL)


def test_dkd_ramp_and_pskd_alpha_functions():
  """The two schedule helpers on their own: min(e / W, 1) (1 for other bases), α_T · e / E."""
  cfg = LossConfig(base="dkd", dkd_warmup_epochs=20.0)
  np.testing.assert_allclose(objectives.dkd_ramp(cfg, jnp.asarray(5)), 0.25)
  np.testing.assert_allclose(objectives.dkd_ramp(cfg, jnp.asarray(40)), 1.0)
  assert float(objectives.dkd_ramp(LossConfig(base="kd"), jnp.asarray(1))) == 1.0
  np.testing.assert_allclose(objectives.pskd_alpha(0.8, jnp.asarray(60), 240), 0.2, rtol=1e-7)


# --------------------------------------------------------------------------------------------
# Self-distillation (PS-KD, PS-KD + IPW)


@pytest.mark.parametrize("step,epoch", [(0, 1), (119 * SPE, 120), (240 * SPE - 1, 240)])
def test_pskd_preset(step, epoch):
  """PS-KD (cifar100.py:resnet8x4,self_distill): α_e = 0.8 · e / 240;
  L = (1 − α_e) · mean CE(f_i, y_i) + α_e · mean CE(f_i, p_prev,i). The KD numbers of the
  config (0.1 / 0.9, τ 4) do not enter."""
  obj = CIFAR.requests["pskd"].obj
  assert obj.targets == "self" and obj.loss.weighting == "none"
  b = CIFAR.batch
  loss, metrics = CIFAR("pskd", step)
  np.testing.assert_allclose(loss, self_objective(b["zs"], b["prev"], b["y"],
                                                  alpha=0.8 * epoch / 240), **TOL)
  np.testing.assert_allclose(metrics["self_kd"], soft_ce(b["zs"], b["prev"]).mean(), **TOL)
  np.testing.assert_allclose(metrics["ce"], ce(b["zs"], b["y"]).mean(), **TOL)
  assert "weight_mean" not in metrics and "aux_ce" not in metrics


@pytest.mark.parametrize("step,epoch", [(0, 1), (27, 4), (28, 5), (100 * SPE, 101)])
def test_pskd_ipw_starts_at_its_epoch(step, epoch):
  """PS-KD + IPW, ipw_start_epoch 5: w_i = IPW(f, g) from epoch 5 on, 1 before, on the soft
  part only; L = (1 − α_e) · mean CE(f_i, y_i) + α_e · mean_i(w_i · CE(f_i, p_prev,i))
  + mean_i CE(g_i, y_i), α_e = 0.8 · e / 240."""
  obj = CIFAR.requests["pskd_ipw"].obj
  assert obj.targets == "self" and obj.ipw_start_epoch == 5
  b = CIFAR.batch
  ipw = ipw_weights(b["zs"], b["g"], b["y"])
  w = ipw if epoch >= 5 else np.ones(16)
  loss, metrics = CIFAR("pskd_ipw", step)
  np.testing.assert_allclose(
      loss, self_objective(b["zs"], b["prev"], b["y"], alpha=0.8 * epoch / 240, w=w,
                           aux=b["g"]), **TOL)
  np.testing.assert_allclose(metrics["weight_mean"], w.mean(), **TOL)
  np.testing.assert_allclose(metrics["aux_ce"], ce(b["g"], b["y"]).mean(), **TOL)
  # The weights really differ from 1 on this batch, so the start epoch is observable.
  assert abs(ipw.mean() - 1.0) > 0.1


def test_pskd_custom_alpha_final():
  """α_T from self_distill.alpha_final: α_e = 0.5 · 3 / 10 at epoch 3 of 10."""
  b = SMALL.batch
  np.testing.assert_allclose(SMALL("pskd_alpha_half", 2 * SPE)[0],
                             self_objective(b["zs"], b["prev"], b["y"], alpha=0.15), **TOL)


# --------------------------------------------------------------------------------------------
# where: padding rows hold garbage and change nothing.


def _reference(name, d, epoch):
  """The loss and metrics of WHERE_CASES[name] on the batch d at epoch e, from the formulas
  of the tests above with the CIFAR presets' numbers."""
  zs, zt, y, g, prev = d["zs"], d["zt"], d["y"], d["g"], d["prev"]
  out = {"ce": ce(zs, y).mean()}
  if name == "teacher":
    return dict(out, loss=out["ce"])
  w = {"kd": None, "dkd": None, "pskd": None,
       "erkd": entropy(zt, 4.0),
       "erdkd_batch_mean": np.full(len(y), entropy(zt, 4.0).mean()),
       "eakd": ea_weights(zt, zs, t=3.0, h_ub=100.0),
       "ipwd": ipw_weights(zs, g, y), "pskd_ipw": ipw_weights(zs, g, y),
       "ipwd_mean": ipw_weights(zs, g, y, normalize="mean")}[name]
  aux = g if name.startswith(("ipwd", "pskd_ipw")) else None
  if w is not None:
    out.update(weight_mean=w.mean(), weight_max=w.max())
  if aux is not None:
    out["aux_ce"] = ce(g, y).mean()
  if name.startswith("pskd"):
    out["self_kd"] = soft_ce(zs, prev).mean()
    out["loss"] = self_objective(zs, prev, y, alpha=0.8 * epoch / 240, w=w, aux=aux)
  elif "dkd" in name:
    beta = 3.0 if name.startswith("erdkd") else 8.0
    out["dkd"] = np.mean((1 if w is None else w) * dkd(zs, zt, y, alpha=1.0, beta=beta, tau=4.0))
    out["loss"] = dkd_objective(zs, zt, y, ce_weight=1.0, kd_weight=1.0, tau=4.0, alpha=1.0,
                                beta=beta, ramp=min(epoch / 20, 1.0), w=w)
  else:
    out["kd"] = 16 * np.mean((1 if w is None else w) * kl(zs, zt, 4.0))
    out["loss"] = kd_objective(zs, zt, y, ce_weight=0.1, kd_weight=0.9, tau=4.0, w=w, aux=aux)
  return out


WHERE_CASES = {name: CIFAR.requests[name].obj for name in
               ("teacher", "kd", "erkd", "eakd", "ipwd", "dkd", "erdkd_batch_mean", "pskd_ipw")}
WHERE_CASES["ipwd_mean"] = with_loss(CIFAR.requests["ipwd"].obj, normalize="mean")
GARBAGE = np.array([np.inf, -np.inf, np.nan, 3e38], np.float32)
WHERE = np.array([True] * 4 + [False] * len(GARBAGE) + [True] * 4)
WHERE_STEP, WHERE_EPOCH = 40, 6   # 7 steps per epoch: DKD ramp 0.3, PS-KD α 0.8 · 6 / 240, IPW on


def _where_batches():
  """The kept rows, and the same rows with padding in the middle of the batch: garbage
  (logits ±inf, NaN, 3e38, label −1), zeros (label 0), or finite garbage (7, label 0)."""
  kept = make_batch((8, 10), 3)
  # The KD head fits the label better than the CE head, so raw IPW weights stay below the
  # padded rows' (zero logits give w = 2): a weight_max over all rows would show it.
  kept["zs"][np.arange(8), kept["y"]] += 4.0

  def pad(x, fill):
    rows = np.empty((len(GARBAGE),) + x.shape[1:], x.dtype)
    rows[...] = fill
    return np.concatenate([x[:4], rows, x[4:]])

  garbage = {k: pad(v, -1 if k == "y" else GARBAGE[:, None]) for k, v in kept.items()}
  zeros = {k: pad(v, 0) for k, v in kept.items()}
  finite = {k: pad(v, 0 if k == "y" else 7) for k, v in kept.items()}
  return kept, garbage, zeros, finite


@functools.cache
def _where_program():
  """jit of {name: ((loss, metrics), (∂L/∂z^s, ∂L/∂g))} for every WHERE_CASES objective."""
  def one(obj, d):
    soft = Request(obj).soft

    def loss_fn(zs, g):
      return objectives.objective(
          obj, zs, d[soft] if soft else None, d["y"], step=jnp.asarray(WHERE_STEP),
          steps_per_epoch=SPE, num_epochs=240,
          aux_logits=g if obj.loss.needs_aux_head else None, where=WHERE)
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(d["zs"], d["g"])
  program = jax.jit(lambda d: {name: one(obj, d) for name, obj in WHERE_CASES.items()})
  return lambda d: jax.tree.map(np.asarray, program(d))


@functools.cache
def _where_results():
  kept, garbage, zeros, finite = _where_batches()
  run = _where_program()
  return kept, run(garbage), run(zeros), run(finite)


@pytest.mark.parametrize("name", list(WHERE_CASES))
def test_where_padding_changes_nothing(name):
  """mean_i runs over the kept rows only: with padding rows of garbage masked by `where`,
  the loss and every metric are the formulas' on the kept rows alone (for ipwd_mean the
  batch mean of the weights is the kept rows' mean too)."""
  kept, garbage, _, _ = _where_results()
  (loss, metrics), _ = garbage[name]
  expected = _reference(name, kept, WHERE_EPOCH)
  assert np.isfinite(loss) and loss == metrics["loss"]
  metrics = dict(metrics)
  weights = metrics.pop("weights", None)   # [B], for the diagnostics: the kept rows' count
  if weights is not None:
    kept_weights = weights[np.asarray(WHERE)]
    assert np.all(np.isfinite(kept_weights))
    np.testing.assert_allclose(kept_weights.mean(), metrics["weight_mean"], **TOL)
  assert metrics.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, err_msg=key, **TOL)


@pytest.mark.parametrize("name", list(WHERE_CASES))
def test_where_padding_gradient_with_finite_padding(name):
  """With finite padding the padded rows get zero gradient, and the kept rows the gradient
  of the batch padded with zeros."""
  _, _, zeros, finite = _where_results()
  (_, (d_zs, d_g)), (_, (e_zs, e_g)) = finite[name], zeros[name]
  for a, b in ((d_zs, e_zs), (d_g, e_g)):
    np.testing.assert_array_equal(a[~WHERE], 0.0)
    np.testing.assert_allclose(a[WHERE], b[WHERE], rtol=1e-6, atol=1e-8)
  assert np.abs(d_zs[WHERE]).max() > 1e-4


@pytest.mark.parametrize("name", list(WHERE_CASES))
def test_where_padding_gradient_with_garbage(name):
  """Garbage padding (±inf, NaN) leaves the gradient alone as well: finite, zero on the
  padded rows, and on the kept rows the gradient of the batch padded with zeros."""
  _, garbage, zeros, _ = _where_results()
  (_, (d_zs, d_g)), (_, (e_zs, e_g)) = garbage[name], zeros[name]
  for a, b in ((d_zs, e_zs), (d_g, e_g)):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a[~WHERE], 0.0)
    np.testing.assert_allclose(a[WHERE], b[WHERE], rtol=1e-6, atol=1e-8)
