"""jaxkd.optim: the learning-rate schedules at their boundaries, and SGD against PyTorch's.

The step schedule of the recipes (docs/METHODS.md#recipes): lr · decay^k with k the number
of milestones strictly below the current epoch, epochs counted from 1, so with milestones
(150, 180, 210) the rate drops at the first step of epochs 151, 181 and 211. The optimizer
must update parameters exactly as `torch.optim.SGD(lr, momentum, weight_decay, nesterov)`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxkd.optim import OptimizerConfig, learning_rate_schedule, make_optimizer

SPE = 7   # steps per epoch
MILESTONES = (150, 180, 210)


def reference_step_rate(step, *, lr, milestones, steps_per_epoch, decay=0.1):
  """lr · decay^k, k = #{m : m < e}, e = step // steps_per_epoch + 1."""
  epoch = step // steps_per_epoch + 1
  return lr * decay ** sum(m < epoch for m in milestones)


def rates(cfg, steps, *, steps_per_epoch=SPE, num_epochs=240):
  schedule = learning_rate_schedule(cfg, steps_per_epoch, num_epochs)
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)), np.float64)


@pytest.mark.parametrize("milestone", MILESTONES)
def test_step_schedule_drops_at_the_first_step_after_a_milestone_epoch(milestone):
  """The last step of epoch m (step m·spe − 1) runs at the previous rate, the first step of
  epoch m + 1 (step m·spe) at 0.1 times it."""
  cfg = OptimizerConfig(lr=0.05, milestones=MILESTONES)
  k = MILESTONES.index(milestone)
  last, first = rates(cfg, [milestone * SPE - 1, milestone * SPE])
  np.testing.assert_allclose(last, 0.05 * 0.1**k, rtol=1e-6)
  np.testing.assert_allclose(first, 0.05 * 0.1**(k + 1), rtol=1e-6)


def test_step_schedule_every_step_of_a_run():
  """Every step of a 240-epoch run against lr · 0.1^k; also ImageNet's (30, 60, 90) at 0.2."""
  steps = np.arange(240 * SPE)
  got = rates(OptimizerConfig(lr=0.05, milestones=MILESTONES), steps)
  expected = [reference_step_rate(s, lr=0.05, milestones=MILESTONES, steps_per_epoch=SPE)
              for s in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[0] == pytest.approx(0.05) and got[-1] == pytest.approx(0.05 * 1e-3)
  steps = np.arange(100 * 3)
  got = rates(OptimizerConfig(lr=0.2, milestones=(30, 60, 90)), steps, steps_per_epoch=3,
              num_epochs=100)
  expected = [reference_step_rate(s, lr=0.2, milestones=(30, 60, 90), steps_per_epoch=3)
              for s in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_step_schedule_other_decay():
  """decay 0.2: lr · 0.2^k."""
  cfg = OptimizerConfig(lr=0.1, milestones=(2, 4), decay=0.2)
  got = rates(cfg, [0, 2 * SPE - 1, 2 * SPE, 4 * SPE - 1, 4 * SPE], num_epochs=6)
  np.testing.assert_allclose(got, [0.1, 0.1, 0.02, 0.02, 0.004], rtol=1e-6)


def test_cosine_schedule():
  """lr · ½(1 + cos(π · step / T)), T = epochs · spe: lr at 0, lr/2 at T/2, 0 at T (and
  after)."""
  cfg = OptimizerConfig(lr=0.05, schedule="cosine", milestones=())
  total = 10 * SPE
  steps = [0, total // 4, total // 2, total - 1, total, total + 5]
  got = rates(cfg, steps, num_epochs=10)
  expected = [0.05 * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)) for s in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
  assert got[0] == pytest.approx(0.05) and got[2] == pytest.approx(0.025, rel=1e-5)
  assert got[-1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_warmup_multiplies_the_schedule(schedule):
  """A warm-up over W = warmup_epochs · spe steps multiplies the schedule by
  min(1, (step + 1) / W); the milestones stay at their absolute epochs."""
  base = OptimizerConfig(lr=0.05, milestones=(3, 5), schedule=schedule)
  warm = OptimizerConfig(lr=0.05, milestones=(3, 5), schedule=schedule, warmup_epochs=2.0)
  steps = np.arange(8 * SPE)
  factor = np.minimum(1.0, (steps + 1) / (2 * SPE))
  np.testing.assert_allclose(rates(warm, steps, num_epochs=8),
                             rates(base, steps, num_epochs=8) * factor, rtol=1e-6)
  if schedule == "step":
    got = rates(warm, [0, 2 * SPE - 1, 3 * SPE - 1, 3 * SPE], num_epochs=8)
    np.testing.assert_allclose(got, [0.05 / 14, 0.05, 0.05, 0.005], rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "linear", "optimizer.schedule"), ("lr", 0.0, "optimizer.lr must be positive"),
    ("lr", -0.1, "optimizer.lr must be positive"), ("name", "adam", "optimizer.name")])
def test_bad_config(field, value, message):
  cfg = OptimizerConfig(**{field: value})
  with pytest.raises(ValueError, match=message):
    learning_rate_schedule(cfg, SPE, 10)


# --------------------------------------------------------------------------------------------
# SGD against torch.optim.SGD


def _params_and_grads(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"conv": (3, 3, 2, 4), "dense": (5, 3), "bias": (3,)}
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(num_steps)]
  return params, grads


def _optax_trajectory(cfg, params, grads, *, steps_per_epoch, num_epochs):
  tx, _ = make_optimizer(cfg, steps_per_epoch, num_epochs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree.map(np.asarray, params))
  return out


def _torch_trajectory(params, grads, *, lr, momentum, weight_decay, nesterov,
                      steps_per_epoch=None, milestones=()):
  """torch.optim.SGD; with milestones, MultiStepLR stepped once per epoch as mdistiller's
  trainer adjusts its rate."""
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = torch.optim.SGD(list(tensors.values()), lr=lr, momentum=momentum,
                        weight_decay=weight_decay, nesterov=nesterov)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), 0.1) if milestones else None
  out = []
  for i, g in enumerate(grads):
    for k, t in tensors.items():
      t.grad = torch.tensor(g[k])
    opt.step()
    if sched is not None and (i + 1) % steps_per_epoch == 0:
      sched.step()
    out.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
  return out


def _assert_same(got, expected):
  for step, (a, b) in enumerate(zip(got, expected)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=f"step {step} {k}")


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [
    (0.9, False, 5e-4), (0.9, True, 5e-4), (0.9, False, 1e-4), (0.0, False, 5e-4),
    (0.9, True, 5e-2)])
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
  """Five steps at a constant rate: d = g + wd·p; buf = m·buf + d (buf = d at the first
  step); p −= lr · (d + m·buf if nesterov else buf), or p −= lr · d without momentum."""
  params, grads = _params_and_grads(5)
  cfg = OptimizerConfig(lr=0.1, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, milestones=())
  got = _optax_trajectory(cfg, params, grads, steps_per_epoch=10, num_epochs=10)
  expected = _torch_trajectory(params, grads, lr=0.1, momentum=momentum,
                               weight_decay=weight_decay, nesterov=nesterov)
  _assert_same(got, expected)


def test_sgd_variants_differ():
  """The comparison above can tell the variants apart: Nesterov, momentum and weight decay
  each move the parameters by far more than its 1e-6 tolerance after five steps."""
  params, grads = _params_and_grads(5)
  kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
  plain = _torch_trajectory(params, grads, **kw)[-1]
  for change in ({"nesterov": True}, {"momentum": 0.0}, {"weight_decay": 0.0}):
    other = _torch_trajectory(params, grads, **{**kw, **change})[-1]
    assert max(np.abs(plain[k] - other[k]).max() for k in plain) > 1e-4, change


def test_sgd_with_step_schedule_matches_torch_multistep():
  """Across milestones: the rate of each step is the schedule's at that step, as
  torch's MultiStepLR stepped after every epoch (2 steps per epoch, milestones 2, 4)."""
  params, grads = _params_and_grads(12, seed=1)
  cfg = OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=(2, 4))
  got = _optax_trajectory(cfg, params, grads, steps_per_epoch=2, num_epochs=6)
  expected = _torch_trajectory(params, grads, lr=0.1, momentum=0.9, weight_decay=5e-4,
                               nesterov=False, steps_per_epoch=2, milestones=(2, 4))
  _assert_same(got, expected)


@pytest.mark.parametrize("schedule,lr,milestones,spe,epochs", [
    ("step", 0.05, (150, 180, 210), 781, 240), ("step", 0.01, (150, 180, 210), 781, 240),
    ("step", 0.2, (30, 60, 90), 2502, 100), ("cosine", 0.05, (), 468, 1),
    ("cosine", 0.05, (), 468, 2)])
def test_schedules_are_bit_identical_to_the_closed_forms(schedule, lr, milestones, spe, epochs):
  """Jitted over every step of the recipes and the quickstart, the rates equal float32's
  closed forms exactly, lr·0.1^k and lr·½(1 + cos(π·min(n/T, 1))): a run's numbers do not
  depend on how the schedule is assembled."""
  cfg = OptimizerConfig(lr=lr, milestones=milestones, schedule=schedule)
  steps = jnp.arange(epochs * spe + 3, dtype=jnp.int32)
  got = np.asarray(jax.jit(jax.vmap(learning_rate_schedule(cfg, spe, epochs)))(steps))
  total = epochs * spe
  if schedule == "step":
    bounds = jnp.asarray([m * spe for m in milestones])
    closed = lambda n: lr * 0.1 ** jnp.sum(n >= bounds)
  else:
    closed = lambda n: lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(n / total, 1.0)))
  np.testing.assert_array_equal(got, np.asarray(jax.jit(jax.vmap(closed))(steps)))
