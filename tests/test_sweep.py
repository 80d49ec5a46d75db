"""Sweeps: several objectives × seeds trained in one program from one teacher forward.

A member (method m, seed s) of a sweep must train exactly as the single run of m with seed s
does; the teacher runs once per seed's batch whatever the number of members; a member that
diverges is frozen and reported while the others go on; a killed sweep resumes exactly.
Tiny models on the session's small Fashion-MNIST-format data, a few steps.
"""

import functools
import json
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxkd import checkpoint
from jaxkd import config as jconfig
from jaxkd import models
from jaxkd.train import compare
from jaxkd.train import step as jstep

from helpers import assert_trees_equal, cli, quick_config, train_run


@pytest.fixture(scope="module")
def small_dir():
  return helpers.small_fashion_data_dir()


@pytest.fixture(scope="module")
def teacher_dir():
  """The session's 4-step quick teacher (helpers.quick_teacher_dir)."""
  return helpers.quick_teacher_dir()


def sweep_config(small_dir, teacher_dir, names, *, steps=4, seeds=2, members=None):
  c = quick_config(small_dir, mode="distill", method="kd", steps=steps,
                   **{"teacher.checkpoint": teacher_dir})
  c.sweep, c.num_seeds = tuple(names), seeds
  c.sweep_members = members or {}
  return c


def _params(folder, seed_index, num_seeds):
  name = "model" if num_seeds == 1 else f"model_seed{seed_index}"
  return checkpoint.restore_model_variables(os.path.join(folder, name))[0]


def test_a_member_trains_as_the_single_run_of_its_method_and_seed(small_dir, teacher_dir,
                                                                  tmp_path):
  """Members share each seed's batches and the teacher's logits, nothing else: (m, s) of a
  sweep of the vanilla student and IPWD (auxiliary head, weights) over 2 seeds ends with the
  parameters of the single run."""
  summary = train_run(sweep_config(small_dir, teacher_dir, ("ce", "ipwd")),
                      str(tmp_path / "sweep"))
  assert summary["format"] == compare.SUMMARY_FORMAT
  assert [m["name"] for m in summary["members"]] == ["ce", "ipwd"]
  assert summary["students_per_step"] == 4 and summary["steps"] == 4
  for name, seed in (("ipwd", 1), ("ce", 0)):
    mode = "teacher" if name == "ce" else "distill"
    single = quick_config(small_dir, mode=mode, method=name, steps=4, seed=seed,
                          **{"teacher.checkpoint": teacher_dir})
    train_run(single, str(tmp_path / f"{name}{seed}"))
    # Same program structure per member, but XLA may fuse a larger program differently:
    # float32 round-off only.
    assert_trees_equal(_params(str(tmp_path / f"{name}{seed}"), 0, 1),
                       _params(str(tmp_path / "sweep" / name), seed, 2), rtol=2e-5, atol=1e-6)
    one = json.load(open(tmp_path / f"{name}{seed}" / "summary.json"))
    member = json.load(open(tmp_path / "sweep" / name / "summary.json"))["seeds"][seed]
    assert member["last"]["count"] == one["last"]["count"] == 500
    assert abs(member["last_top1"] - one["last_top1"]) <= 0.2
  # Each member's folder reads as a single run: its own config, metrics and models.
  config = json.load(open(tmp_path / "sweep" / "ipwd" / "config.json"))
  assert (config["mode"], config["method"], config["loss"]["weighting"]) == (
      "distill", "ipwd", "inverse_propensity")
  rows = [json.loads(l) for l in open(tmp_path / "sweep" / "ipwd" / "metrics.jsonl")]
  assert any("train/aux_ce" in r for r in rows) and any("teacher/top1" in r for r in rows)
  assert os.path.isfile(tmp_path / "sweep" / "summary.md")


def _count(jaxpr, primitive: str) -> int:
  """Occurrences of `primitive` in a jaxpr, sub-jaxprs (custom_vjp, pjit, ...) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == primitive
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count(sub, primitive)
  return n


def test_the_teacher_runs_once_per_seed_whatever_the_number_of_members():
  """Convolutions in the traced sweep step: S · (teacher's + M · one student step's)."""
  cfg = lambda method: jstep.make_step_config(
      model="quick_student", num_classes=10, optimizer=jconfig.resolve(
          quick_config("/unused")).optimizer, steps_per_epoch=10, num_epochs=1,
      teacher_model="quick_teacher", objective=jconfig.resolve(
          quick_config("/unused", mode="teacher" if method == "ce" else "distill",
                       method=method)).objective)
  teacher = models.create("quick_teacher", 10)
  image = jnp.zeros((1, 28, 28, 1))
  # Shapes only: the jaxprs are traced, never run, so nothing is initialised for real.
  teacher_vars = jax.eval_shape(lambda: teacher.init(jax.random.key(0), image, train=False))
  convs_of = lambda f, *a: _count(jax.make_jaxpr(f)(*a).jaxpr, "conv_general_dilated")
  per_teacher = convs_of(lambda v, x: teacher.apply(v, x, train=False), teacher_vars, image)

  def sweep_convs(methods, seeds):
    cfgs = tuple(cfg(m) for m in methods)
    init = lambda c: jax.vmap(functools.partial(
        jstep.init_train_state, c, image_shape=(28, 28, 1), feature_dim=models.feature_dim(
            "quick_student")))(jnp.stack([jax.random.key(s) for s in range(seeds)]))
    states = tuple(jax.eval_shape(lambda c=c: init(c)) for c in cfgs)
    batch = {"image": jnp.zeros((seeds, 8, 28, 28, 1)), "label": jnp.zeros((seeds, 8), jnp.int32),
             "index": jnp.zeros((seeds, 8), jnp.int32)}
    return convs_of(functools.partial(jstep.sweep_train_step, cfgs, seeds_per_vmap=1),
                    states, batch, teacher_vars)

  per_student = sweep_convs(("ce",), 1)  # no teacher: one student's forward and backward
  assert per_teacher > 0 and per_student > per_teacher
  # Two seeds (two batches) of three members: two teacher forwards, not six.
  assert sweep_convs(("kd", "ipwd", "ce"), 2) == 2 * (per_teacher + 3 * per_student)


SWEEP_CONFIG = """
from jaxkd import config as jconfig

def get_config(arg=None):
  c = jconfig.default_config()
  c.dataset.name, c.dataset.data_dir = "fashion_mnist", {data_dir!r}
  c.model, c.teacher.model, c.teacher.checkpoint = "quick_student", "quick_teacher", {teacher!r}
  c.batch_size, c.eval_batch_size, c.num_epochs, c.max_steps = 32, 1000, 1, {steps}
  c.log_every_steps, c.checkpoint.every_steps, c.progress_bar = 1, 2, False
  c.optimizer.milestones, c.optimizer.schedule = (), "cosine"
  c.sweep, c.num_seeds = ("kd", "hot"), 2
  # A member whose loss overflows float32 at the first step.
  c.sweep_members = {{"hot": {{"method": "kd", "loss": {{"kd_weight": 1e38}}}}}}
  return c
"""


def _sweep_cli(tmp_path, name, data_dir, teacher_dir, steps):
  path = tmp_path / "sweep_config.py"
  path.write_text(SWEEP_CONFIG.format(data_dir=data_dir, teacher=teacher_dir, steps=steps))
  return ["--config", str(path), "--workdir", str(tmp_path / name)]


def test_a_killed_sweep_resumes_exactly_and_a_diverging_member_stops_alone(
    small_dir, teacher_dir, tmp_path):
  """A member whose loss overflows (kd_weight 1e38) is frozen and reported; the others
  train on. SIGKILL after a checkpoint, rerun: every member ends bit-equal to an
  uninterrupted sweep."""
  steps, env = 8, helpers.ONE_DEVICE
  full = cli(_sweep_cli(tmp_path, "full", small_dir, teacher_dir, steps), env=env, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  assert "Student hot seed 0 diverged (NaN or inf) at step 1" in full.stdout, full.stdout[-3000:]
  summary = json.load(open(tmp_path / "full" / "summary.json"))
  hot = {m["name"]: m for m in summary["members"]}["hot"]
  assert hot["diverged"] == [0, 1] and hot["best_top1"] is None
  kd = {m["name"]: m for m in summary["members"]}["kd"]
  assert kd["diverged"] == [] and kd["best_top1"]["n"] == 2

  workdir = str(tmp_path / "killed")
  args = _sweep_cli(tmp_path, "killed", small_dir, teacher_dir, steps)
  killed_at = helpers.kill_after_checkpoint(args, os.path.join(workdir, "checkpoints"), 4, env)
  assert killed_at < steps, "the run had finished before the kill"
  resumed = cli(args, env=env, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stdout
  for name in ("kd", "hot"):
    for seed in range(2):
      assert_trees_equal(_params(str(tmp_path / "full" / name), seed, 2),
                         _params(os.path.join(workdir, name), seed, 2))
  again = json.load(open(os.path.join(workdir, "summary.json")))
  assert [m["best_top1"] for m in again["members"]] == [m["best_top1"] for m in summary["members"]]


def test_sweep_configs_are_checked():
  c = quick_config("/unused", mode="distill")
  c.sweep = ("kd", "kd")
  with pytest.raises(jconfig.ConfigError, match="names a member twice"):
    jconfig.validate(c, teacher_from_suite=True)
  c.sweep = ("kd", "checkpoints")
  with pytest.raises(jconfig.ConfigError, match="also its folder"):
    jconfig.validate(c, teacher_from_suite=True)
  c.sweep = ("kd", "fancy")
  with pytest.raises(jconfig.ConfigError, match="unknown method 'fancy'"):
    jconfig.validate(c, teacher_from_suite=True)
  c.sweep, c.sweep_members = ("kd",), {"erkdd": {"loss": {}}}
  with pytest.raises(jconfig.ConfigError, match="does not name"):
    jconfig.validate(c, teacher_from_suite=True)
  c.sweep_members = {}
  c.mode, c.method = "self_distill", "kd"
  with pytest.raises(jconfig.ConfigError, match="run self-distillation singly"):
    jconfig.validate(c, teacher_from_suite=True)
  c.mode, c.sweep = "teacher", ("ce", "kd")
  with pytest.raises(jconfig.ConfigError, match="set config.mode to 'distill'"):
    jconfig.validate(c, teacher_from_suite=True)


def test_paired_differences_and_t_intervals_match_scipy():
  """The comparison's numbers against an independent computation (float64 NumPy, SciPy's t
  quantiles where SciPy is installed)."""
  rng = np.random.default_rng(0)
  for df in (1, 2, 4, 9, 29):
    try:
      from scipy import stats
      np.testing.assert_allclose(compare.t_975(df), stats.t.ppf(0.975, df), rtol=1e-4)
    except ImportError:
      pass
  a, b = rng.normal(80, 1, 5), rng.normal(79, 1, 5)
  d = compare.paired_difference(list(a), list(b))
  diff = a - b
  assert d["n"] == 5 and np.isclose(d["mean"], diff.mean())
  assert np.isclose(d["half_width"], 2.7764 * diff.std(ddof=1) / np.sqrt(5), rtol=1e-4)
  assert compare.paired_difference([1.0, None], [0.5, 0.2]) == {
      "mean": 0.5, "half_width": None, "n": 1}
  s = compare.sweep_summary([
      {"name": "kd", "method": "kd", "seeds": [{"seed": 0, "best_top1": 70.0, "last_top1": 69.0},
                                               {"seed": 1, "best_top1": 71.0, "last_top1": 70.0}]},
      {"name": "erkd", "method": "erkd", "seeds": [
          {"seed": 0, "best_top1": 71.0, "last_top1": 70.0},
          {"seed": 1, "best_top1": 72.5, "last_top1": 71.0, "diverged_at_step": None}]}])
  assert s["members"][1]["best_top1"] == {"mean": 71.75, "std": np.std([71, 72.5], ddof=1),
                                          "n": 2}
  assert np.isclose(s["paired"]["kd"]["erkd"]["best_top1"]["mean"], 1.25)
  table = compare.format_table(s)
  assert "| erkd | erkd | 71.75 ± 1.06 | 70.50 ± 0.71 | +1.25 ±" in table


@pytest.mark.parametrize("config,preset,methods", [
    ("cifar100", "resnet32x4-resnet8x4", ("ce", "kd", "erkd", "eakd", "ipwd", "dkd", "erdkd")),
    ("imagenet", "r34-r18", ("kd", "eakd", "dkd", "eadkd"))])
def test_a_config_row_sweep_trains_each_method_as_its_own_preset(config, preset, methods):
  """`methods=a+b+...`: every member's objective is the one `method=a` gives a single run
  (the pair's DKD β, ER-DKD's fork β, EA-KD's H_ub and ImageNet weights)."""
  module = helpers.config_module(config)
  spec = jconfig.resolve(module.get_config(f"{preset},methods={'+'.join(methods)}"))
  assert [m.name for m in spec.members] == list(methods)
  for m in spec.members:
    if m.method == "ce":
      assert m.objective.targets == "labels"
      continue
    single = jconfig.resolve(module.get_config(f"{preset},method={m.method}"))
    assert m.objective == single.objective, m.name
