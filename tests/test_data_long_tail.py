"""Long-tailed subsets: the exponential profile exactly, deterministic, train split only."""

import jax
import numpy as np
import pytest

import jaxkd.data as jd
from jaxkd.data import datasets
import helpers as support


@pytest.mark.parametrize("factor,total", [(10, 19573), (50, 12608), (100, 10847)])
def test_cifar100_lt_counts(factor, total):
  # CIFAR-100-LT as published (Cao et al. 2019): 500 images in the head class, 500/rho in
  # the tail, 10,847 in all for rho = 100.
  counts = jd.long_tail_counts(500, 100, factor)
  assert counts[0] == 500 and counts[-1] == 500 // factor
  assert (np.diff(counts) <= 0).all()
  expected = np.floor(500 * factor ** (-np.arange(100) / 99) + 1e-9)
  np.testing.assert_array_equal(counts, expected)
  assert counts.sum() == total


def test_indices_follow_the_profile_exactly_and_depend_only_on_the_seed():
  labels = np.repeat(np.arange(100), 500)
  np.random.default_rng(0).shuffle(labels)
  idx = jd.long_tail_indices(labels, 100, 100, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=100),
                                jd.long_tail_counts(500, 100, 100))
  assert (np.diff(idx) > 0).all()  # sorted, no repeats
  np.testing.assert_array_equal(idx, jd.long_tail_indices(labels, 100, 100, seed=0))
  assert not np.array_equal(idx, jd.long_tail_indices(labels, 100, 100, seed=1))


def test_unbalanced_source_uses_the_smallest_class_as_head():
  labels = np.array([0] * 30 + [1] * 20 + [2] * 12)
  idx = jd.long_tail_indices(labels, 3, 4.0)
  assert np.bincount(labels[idx]).tolist() == [12, 6, 3]  # 12 * 4^(-c/2)


def test_bad_factor():
  with pytest.raises(ValueError, match="long_tail_factor"):
    jd.long_tail_counts(500, 100, 0.5)


@pytest.fixture(scope="module")
def balanced_cifar_dir(tmp_path_factory):
  # 20 examples per class in train, 5 in test, shuffled.
  root = tmp_path_factory.mktemp("cifar_lt")
  data = support.fake_cifar100(n_train=2000, n_test=500)
  rng = np.random.default_rng(1)
  data["train"] = (data["train"][0], rng.permutation(np.repeat(np.arange(100), 20)),
                   data["train"][2])
  data["test"] = (data["test"][0], rng.permutation(np.repeat(np.arange(100), 5)),
                  data["test"][2])
  support.write_cifar100_python(data, str(root / "cifar-100-python.tar.gz"))
  jd.prepare("cifar100", str(root / "dd"), manual_dir=str(root))
  return str(root / "dd")


def test_long_tailed_cifar100_in_both_paths_test_split_untouched(balanced_cifar_dir):
  d = balanced_cifar_dir
  train = jd.load_arrays("cifar100", "train", d, long_tail_factor=10, seed=0)
  counts = np.bincount(train["label"], minlength=100)
  np.testing.assert_array_equal(counts, jd.long_tail_counts(20, 100, 10))
  test = jd.load_arrays("cifar100", "test", d, long_tail_factor=10, seed=0)
  assert len(test["label"]) == 500 and (np.bincount(test["label"]) == 5).all()
  # index stays the position in the whole split's data source.
  full = jd.load_arrays("cifar100", "train", d)
  np.testing.assert_array_equal(full["image"][train["index"]], train["image"])
  # The host pipeline draws from the same subset.
  it = jd.host_iterator("cifar100", data_dir=d, global_batch=64, long_tail_factor=10,
                        process_index=0, process_count=1)
  assert it.num_examples == len(train["label"]) == counts.sum()
  assert it.index_size == 2000
  seen = np.concatenate([next(it)["index"] for _ in range(it.steps_per_epoch)])
  assert set(seen.tolist()) <= set(train["index"].tolist())
  assert len(seen) == it.steps_per_epoch * 64
  ev = jd.host_iterator("cifar100", data_dir=d, train=False, global_batch=100,
                        long_tail_factor=10, process_index=0, process_count=1)
  assert ev.num_examples == 500


def test_train_loaders_draw_the_same_long_tailed_subset_on_both_paths(balanced_cifar_dir):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  kw = dict(mesh=mesh, global_batch=64, seeds=[0, 3], long_tail_factor=10)
  dev = jd.make_train_loader(jd.spec("cifar100"), balanced_cifar_dir, device_resident=True,
                             **kw)
  host = jd.make_train_loader(jd.spec("cifar100"), balanced_cifar_dir, device_resident=False,
                              **kw)
  subset = jd.load_arrays("cifar100", "train", balanced_cifar_dir, long_tail_factor=10)
  assert dev.num_examples == host.num_examples == len(subset["label"])
  assert dev.index_size == host.index_size == 2000  # the whole split: per-example tables
  assert dev.get_state() == host.get_state()
  for _ in range(2):
    d, h = next(dev), next(host)
    np.testing.assert_array_equal(np.asarray(d["index"]), np.asarray(h["index"]))
    np.testing.assert_allclose(np.asarray(d["image"]), np.asarray(h["image"]), atol=1e-5)
    assert set(np.asarray(d["index"]).ravel().tolist()) <= set(subset["index"].tolist())
  host.close()


def test_select_examples_only_touches_the_train_split():
  labels = np.repeat(np.arange(100), 3)
  spec = jd.spec("cifar100")
  assert len(datasets.select_examples(labels, "test", spec, long_tail_factor=3, seed=0)) == 300
  assert len(datasets.select_examples(labels, "train", spec, long_tail_factor=3,
                                      seed=0)) == jd.long_tail_counts(3, 100, 3).sum()
