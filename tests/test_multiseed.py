"""Several seeds in one program, and bfloat16 training."""

import os

import jax
import numpy as np
import pytest

import helpers
from jaxkd import checkpoint
from jaxkd import config as jconfig
from helpers import quick_config, train_run


def _params(path):
  return checkpoint.restore_model_variables(path)[0]


@pytest.fixture(scope="module")
def single_seed7(tmp_path_factory):
  """The single-seed run (seed 7) that seed 2 of every num_seeds=3 run below must equal:
  trained once for the three parametrisations."""
  workdir = str(tmp_path_factory.mktemp("single7"))
  summary = train_run(quick_config(helpers.small_fashion_data_dir(), steps=4, seed=7), workdir)
  return summary, os.path.join(workdir, "model")


@pytest.mark.parametrize("seeds_per_vmap", [3, 1, 2])
def test_num_seeds_gives_each_seed_the_single_seed_run(tmp_path, seeds_per_vmap, single_seed7):
  """Seed i of a num_seeds=3 run equals a single-seed run with seed config.seed + i
  (own initialisation, own data order), up to the numerics of batched convolutions; whether
  the seeds are vectorised together (3), looped (1) or both (2: a vmap of 2, then 1)."""
  data_dir = helpers.small_fashion_data_dir()
  multi = train_run(quick_config(data_dir, steps=4, num_seeds=3, seed=5,
                                 seeds_per_vmap=seeds_per_vmap), str(tmp_path / "multi"))
  assert multi["num_seeds"] == 3 and len(multi["seeds"]) == 3
  assert multi["best_top1"]["std"] >= 0.0
  for i in (2,):
    single, single_model = single_seed7
    a, b = _params(str(tmp_path / "multi" / f"model_seed{i}")), _params(single_model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=5e-4)
    assert abs(multi["seeds"][i]["last_top1"] - single["last_top1"]) < 0.5
  # Different seeds really are different runs.
  p0, p2 = (_params(str(tmp_path / "multi" / f"model_seed{i}")) for i in (0, 2))
  assert not np.allclose(jax.tree.leaves(p0)[0], jax.tree.leaves(p2)[0])


def test_multi_seed_run_resumes_every_seed(tmp_path):
  """A multi-seed distillation run stopped after its step-3 checkpoint and restarted in the
  same workdir ends with the parameters, data position and evaluations of an uninterrupted
  run, for every seed."""
  data_dir = helpers.small_fashion_data_dir()
  config = lambda steps: quick_config(
      data_dir, mode="distill", method="ipwd", steps=steps, num_seeds=2, seed=1,
      **{"teacher.checkpoint": helpers.quick_teacher_dir()})
  train_run(config(3), str(tmp_path / "resumed"))          # checkpoint at step 3, then stops
  resumed = train_run(config(6), str(tmp_path / "resumed"))
  straight = train_run(config(6), str(tmp_path / "straight"))
  assert resumed["steps"] == straight["steps"] == 6
  for i in range(2):
    a = _params(str(tmp_path / "resumed" / f"model_seed{i}"))
    b = _params(str(tmp_path / "straight" / f"model_seed{i}"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert resumed["seeds"][i]["last_top1"] == straight["seeds"][i]["last_top1"]
    assert [h["step"] for h in resumed["seeds"][i]["history"]] == [3, 6]


def test_seeds_per_vmap_is_validated():
  c = quick_config("/unused", num_seeds=2, seeds_per_vmap=3)
  with pytest.raises(jconfig.ConfigError, match="seeds_per_vmap must be an integer from 0"):
    jconfig.validate(c)


def test_bfloat16_training_is_finite_and_learns(tmp_path):
  """bf16 compute (parameters, BN statistics and loss math stay float32) on real data."""
  data_dir = helpers.fashion_data_dir()
  c = quick_config(data_dir, steps=120, batch=64, dtype="bfloat16")
  c.log_every_steps = 20
  summary = train_run(c, str(tmp_path))
  assert summary["last_top1"] > 60.0, summary["last_top1"]   # chance is 10%
  variables = _params(str(tmp_path / "model"))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))
