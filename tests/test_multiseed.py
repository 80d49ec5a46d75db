"""Several seeds in one vectorised run, and bfloat16 training (issue: throughput)."""

import jax
import numpy as np

import test_data_support
from jaxkd import checkpoint
from jaxkd import run_checkpoint
from jaxkd import train
from test_train import quick_config, train_run


def _params(path):
  return checkpoint.restore_model_variables(path)[0]


def test_num_seeds_gives_each_seed_the_single_seed_run(tmp_path):
  """Seed i of a num_seeds=3 run equals a single-seed run with seed config.seed + i
  (own initialisation, own data order), up to the numerics of batched convolutions."""
  data_dir = test_data_support.fashion_data_dir()
  multi = train_run(quick_config(data_dir, steps=4, num_seeds=3, seed=5),
                                   str(tmp_path / "multi"))
  assert multi["num_seeds"] == 3 and len(multi["seeds"]) == 3
  assert multi["best_top1"]["std"] >= 0.0
  for i in (2,):
    single = train_run(quick_config(data_dir, steps=4, seed=5 + i),
                                      str(tmp_path / f"single{i}"))
    a, b = _params(str(tmp_path / "multi" / f"model_seed{i}")), _params(
        str(tmp_path / f"single{i}" / "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=5e-4)
    assert abs(multi["seeds"][i]["last_top1"] - single["last_top1"]) < 0.5
  # Different seeds really are different runs.
  p0, p2 = (_params(str(tmp_path / "multi" / f"model_seed{i}")) for i in (0, 2))
  assert not np.allclose(jax.tree.leaves(p0)[0], jax.tree.leaves(p2)[0])


def test_bfloat16_training_is_finite_and_learns(tmp_path):
  """bf16 compute (parameters, BN statistics and loss math stay float32) on real data."""
  data_dir = test_data_support.fashion_data_dir()
  c = quick_config(data_dir, steps=120, batch=64, dtype="bfloat16")
  c.log_every_steps = 20
  summary = train_run(c, str(tmp_path))
  assert summary["last_top1"] > 60.0, summary["last_top1"]   # chance is 10%
  variables = _params(str(tmp_path / "model"))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))
