"""Host pipeline (grain) and device-resident path: content, determinism, sharding by process,
resumption, and agreement between the two paths; the train and eval loaders the trainer uses
(seed-stacked, sharded, resumable, built once) (on 8 virtual CPU devices)."""

import json
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxkd import sharding
import jaxkd.data as jd
from jaxkd.data import augment
from jaxkd.data import datasets
from jaxkd.data import device
import helpers as support

CIFAR = jd.spec("cifar100")


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def _host(name="cifar100", **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return jd.host_iterator(name, **kw)


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ------------------------------------------------------------------------------------------
# tfds.testing.mock_data through both paths.
# ------------------------------------------------------------------------------------------


def test_mock_cifar100_host_and_device_paths(mesh):
  with tfds.testing.mock_data(num_examples=256):
    it = _host(global_batch=32, seed=3)
    host = [next(it) for _ in range(3)]
    arrays = jd.load_arrays("cifar100", "train")
    loader = jd.DeviceResidentLoader(arrays, CIFAR, global_batch=32, mesh=mesh, seed=3)
    dev = [next(loader) for _ in range(3)]
  assert arrays["image"].shape == (256, 32, 32, 3) and arrays["image"].dtype == np.uint8
  assert it.steps_per_epoch == loader.steps_per_epoch == 8
  for h, d in zip(host, dev):
    assert h["image"].shape == (32, 32, 32, 3) and h["image"].dtype == np.float32
    assert h["label"].dtype == np.int32 and h["index"].dtype == np.int32
    assert d["image"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(d["index"]), h["index"])
    np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])
    np.testing.assert_allclose(np.asarray(d["image"]), h["image"], atol=1e-5)
  # Normalised with the spec's constants: mock pixels are uniform in [0, 255], and on
  # average 13.4% of a crop is zero padding (E|dy - 4| = 20/9 rows, the same in columns).
  mean = np.concatenate([h["image"] for h in host]).mean(axis=(0, 1, 2))
  padded = 1 - (1 - 20 / 9 / 32) ** 2
  np.testing.assert_allclose(mean, ((1 - padded) * 0.5 - np.array(CIFAR.mean)) / CIFAR.std,
                             atol=0.05)


def test_mock_imagenet2012_host(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    train = _host("imagenet2012", global_batch=8, seed=0)
    batch = next(train)
    ev = _host("imagenet2012", train=False, global_batch=10)
    evals = list(ev)
  assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
  assert len(evals) == 3 and [int(b["mask"].sum()) for b in evals] == [10, 10, 4]
  np.testing.assert_array_equal(np.concatenate([b["index"][b["mask"]] for b in evals]),
                                np.arange(24))


def test_imagenet_from_jpeg_records(tmp_path):
  # Real array_record files with JPEG bytes: decoded at reduced size (PIL draft), grey and
  # CMYK images come out RGB, every view is 224x224, and the same seed gives the same crops.
  support.write_imagenet_tars(str(tmp_path / "manual"), per_class=5)
  data_dir = str(tmp_path / "dd")
  jd.prepare("imagenet2012", data_dir, manual_dir=str(tmp_path / "manual"))
  a = _host("imagenet2012", data_dir=data_dir, global_batch=8, seed=1)
  b = _host("imagenet2012", data_dir=data_dir, global_batch=8, seed=1)
  _assert_batches_equal(next(a), next(b))
  batches = [next(a) for _ in range(3)]  # 17 examples -> 2 steps per epoch: crosses epochs
  assert all(x["image"].shape == (8, 224, 224, 3) for x in batches)
  ev = list(_host("imagenet2012", data_dir=data_dir, split="validation", train=False,
                  global_batch=8))
  assert len(ev) == 1 and ev[0]["mask"].all()
  # Eval view = resize 256 + center crop 224 of the 64x80 image: the full height is used.
  img = augment.resize_center_crop(np.full((64, 80, 3), 7, np.uint8))
  assert img.shape == (224, 224, 3) and (img == 7).all()


# ------------------------------------------------------------------------------------------
# Determinism, process sharding, resumption, eval coverage: on a generated CIFAR-100.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar")
  support.write_cifar100_binary(support.fake_cifar100(n_train=600, n_test=130),
                                str(root / "cifar-100-binary.tar.gz"))
  jd.prepare("cifar100", str(root / "dd"), manual_dir=str(root))
  return str(root / "dd")


def test_same_seed_same_batches_other_seed_other_batches(cifar_dir):
  a = _host(data_dir=cifar_dir, global_batch=64, seed=5)
  b = _host(data_dir=cifar_dir, global_batch=64, seed=5)
  c = _host(data_dir=cifar_dir, global_batch=64, seed=6)
  for _ in range(3):
    x, y, z = next(a), next(b), next(c)
    _assert_batches_equal(x, y)
    assert not np.array_equal(x["index"], z["index"])


def test_epochs_are_permutations_with_drop_remainder(cifar_dir):
  it = _host(data_dir=cifar_dir, global_batch=64, seed=0, num_epochs=2)
  assert it.steps_per_epoch == 600 // 64 == len(it) // 2
  batches = list(it)
  assert len(batches) == 18
  for e in range(2):
    idx = np.concatenate([b["index"] for b in batches[9 * e:9 * (e + 1)]])
    perm = jd.epoch_permutation(0, e, 600)[:9 * 64]
    np.testing.assert_array_equal(idx, perm)  # whole split, so position == index
    assert len(set(idx.tolist())) == 9 * 64
  assert not np.array_equal(batches[0]["index"], batches[9]["index"])


def test_two_processes_read_disjoint_halves_of_the_same_global_batch(cifar_dir):
  one = _host(data_dir=cifar_dir, global_batch=64, seed=2)
  p0 = _host(data_dir=cifar_dir, global_batch=64, seed=2, process_index=0, process_count=2)
  p1 = _host(data_dir=cifar_dir, global_batch=64, seed=2, process_index=1, process_count=2)
  seen = []
  for _ in range(one.steps_per_epoch):
    g, a, b = next(one), next(p0), next(p1)
    assert a["image"].shape[0] == b["image"].shape[0] == 32
    assert not set(a["index"].tolist()) & set(b["index"].tolist())
    for k in g:  # the global batch does not depend on the number of processes
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
    seen += a["index"].tolist() + b["index"].tolist()
  assert len(seen) == len(set(seen)) == 9 * 64  # an epoch, minus the dropped remainder


def test_restored_iterator_continues_with_the_identical_next_batch(cifar_dir):
  it = _host(data_dir=cifar_dir, global_batch=64, seed=4)
  for _ in range(11):  # into the second epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # survives JSON (and so orbax)
  assert state["step"] == 11
  expected = [next(it) for _ in range(2)]
  resumed = _host(data_dir=cifar_dir, global_batch=64, seed=4)
  resumed.set_state(state)
  for e in expected:
    _assert_batches_equal(next(resumed), e)
  other = _host(data_dir=cifar_dir, global_batch=32, seed=4)
  with pytest.raises(ValueError, match="global_batch"):
    other.set_state(state)


def test_eval_covers_the_split_once_with_a_padded_last_batch(cifar_dir):
  batches = list(_host(data_dir=cifar_dir, split="test", train=False, global_batch=64))
  assert len(batches) == 3  # ceil(130 / 64)
  assert all(b["image"].shape == (64, 32, 32, 3) for b in batches)
  assert [int(b["mask"].sum()) for b in batches] == [64, 64, 2]
  np.testing.assert_array_equal(np.concatenate([b["index"][b["mask"]] for b in batches]),
                                np.arange(130))
  # No augmentation in eval: the image is the normalised stored image.
  arrays = jd.load_arrays("cifar100", "test", cifar_dir)
  np.testing.assert_allclose(batches[0]["image"],
                             augment.normalize(arrays["image"][:64], CIFAR.mean, CIFAR.std),
                             atol=1e-6)


def test_grain_worker_processes_give_the_same_batches(cifar_dir):
  ref = _host(data_dir=cifar_dir, global_batch=64, seed=9)
  expected = [ref.batch_at(s) for s in range(3, 6)]
  state = {"step": 3}
  with _host(data_dir=cifar_dir, global_batch=64, seed=9, worker_count=2) as it:
    it.set_state(state)  # a state saved with 0 workers restores with 2
    for e in expected:
      _assert_batches_equal(next(it), e)


# ------------------------------------------------------------------------------------------
# Device-resident path on 8 virtual devices.
# ------------------------------------------------------------------------------------------


def test_device_loader_batches_are_sharded_over_the_data_axis(cifar_dir, mesh):
  loader = jd.device_loader("cifar100", data_dir=cifar_dir, global_batch=64, mesh=mesh,
                            seed=1)
  batch = next(loader)
  assert loader.index_size == 600
  for k, v in batch.items():
    assert v.sharding == NamedSharding(mesh, P("data")), k
    assert len(v.addressable_shards) == 8
    assert v.addressable_shards[0].data.shape[0] == 8
  # Same permutation as the host pipeline, epoch after epoch.
  host = _host(data_dir=cifar_dir, global_batch=64, seed=1)
  next(host)
  for _ in range(12):
    _assert_batches_equal({k: np.asarray(v) for k, v in next(loader).items()
                           if k != "image"},
                          {k: v for k, v in next(host).items() if k != "image"})
  ev = jd.device_loader("cifar100", "test", cifar_dir, global_batch=64, mesh=mesh,
                        train=False)
  host_ev = list(_host(data_dir=cifar_dir, split="test", train=False, global_batch=64))
  for d, h in zip(ev, host_ev):
    np.testing.assert_array_equal(np.asarray(d["mask"]), h["mask"])
    np.testing.assert_allclose(np.asarray(d["image"]), h["image"], atol=1e-5)


def test_device_batch_in_a_jitted_step_needs_no_collective(cifar_dir, mesh):
  # The placement choice: with the split replicated, each device gathers its own rows.
  arrays = jd.load_arrays("cifar100", "train", cifar_dir)
  data = sharding.put_replicated(arrays, mesh)
  perm = jnp.asarray(jd.epoch_permutation(0, 0, 600))
  rows = sharding.data_sharded(mesh)

  def step(data, perm, s, epoch):
    batch = jd.device_batch(data, perm, s, epoch, ds_spec=CIFAR, global_batch=64, seed=0,
                            batch_sharding=rows)
    return batch["image"] * 2.0, batch["label"]

  f = jax.jit(step, out_shardings=(rows, rows))
  hlo = f.lower(data, perm, jnp.int32(0), jnp.int32(0)).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
  image, _ = f(data, perm, jnp.int32(0), jnp.int32(0))
  host = _host(data_dir=cifar_dir, global_batch=64, seed=0).batch_at(0)
  np.testing.assert_allclose(np.asarray(image), 2.0 * host["image"], atol=1e-5)


def _coded_images(n: int) -> np.ndarray:
  """Images whose channel 0 is row+1 and channel 1 is column+1 (0 only in the padding)."""
  img = np.zeros((n, 32, 32, 3), np.uint8)
  img[..., 0] = np.arange(1, 33)[None, :, None]
  img[..., 1] = np.arange(1, 33)[None, None, :]
  img[..., 2] = (np.arange(n) % 251)[:, None, None]
  return img


def _recover_crops(images_f32: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(dy, dx, flip) of each augmented coded image, read back from its pixels."""
  mean, std = np.array(CIFAR.mean), np.array(CIFAR.std)
  u8 = np.rint((images_f32 * std + mean) * 255).astype(np.int64)
  # Row 16 / column 16 of the crop is always inside the image (offsets are within +-4).
  dy = u8[:, 16, 16, 0] - 1 - 16 + 4
  flip = u8[:, 16, 17, 1] < u8[:, 16, 16, 1]
  x_src = u8[:, 16, 16, 1] - 1
  dx = np.where(flip, x_src - (31 - 16), x_src - 16) + 4
  return dy, dx, flip


def test_augmentation_statistics_match_between_host_and_device(mesh):
  n, batch = 2048, 256
  images = _coded_images(n)
  labels = np.arange(n, dtype=np.int32) % 100
  examples = [{"image": images[i], "label": labels[i]} for i in range(n)]
  source = datasets.Source(examples, name="cifar100", split="train")
  host = _host(global_batch=batch, seed=11, source=source)
  arrays = {"image": images, "label": labels, "index": np.arange(n, dtype=np.int32)}
  dev = jd.DeviceResidentLoader(arrays, CIFAR, global_batch=batch, mesh=mesh, seed=11)
  stats = {}
  for name, it in (("host", host), ("device", dev)):
    dys, dxs, flips = zip(*[_recover_crops(np.asarray(next(it)["image"]))
                            for _ in range(n // batch)])
    stats[name] = np.concatenate(dys), np.concatenate(dxs), np.concatenate(flips)
  for h, d in zip(stats["host"], stats["device"]):
    np.testing.assert_array_equal(h, d)  # identical by construction (hashed randomness)
  dy, dx, flip = stats["host"]
  assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
  # 9 offsets, uniform: each count ~ Binomial(2048, 1/9) (mean 228, sd 14).
  for offsets in (dy, dx):
    counts = np.bincount(offsets, minlength=9)
    assert np.abs(counts - n / 9).max() < 5 * np.sqrt(n / 9 * 8 / 9), counts
  assert abs(flip.mean() - 0.5) < 0.05
  # Crops and flips are independent of each other.
  assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.1 and abs(np.corrcoef(dy, flip)[0, 1]) < 0.1
  # A new epoch draws new crops for the same example.
  again = [_recover_crops(next(host)["image"])[0] for _ in range(n // batch)]
  assert (np.concatenate(again) != dy).mean() > 0.7


def test_fashion_mnist_pad_crop_option(mesh):
  n = 64
  arrays = {"image": np.full((n, 28, 28, 1), 200, np.uint8),
            "label": np.zeros(n, np.int32), "index": np.arange(n, dtype=np.int32)}
  plain = jd.DeviceResidentLoader(arrays, jd.spec("fashion_mnist"), global_batch=64,
                                  mesh=mesh)
  x = np.asarray(next(plain)["image"])
  assert x.shape == (64, 28, 28, 1)
  np.testing.assert_allclose(x, (200 / 255 - 0.2860) / 0.3530, rtol=1e-5)  # no crop
  padded = jd.DeviceResidentLoader(arrays, jd.spec("fashion_mnist", pad=2), global_batch=64,
                                   mesh=mesh)
  x = np.asarray(next(padded)["image"])
  assert (x < 0).any()  # some zero padding came in


def test_real_fashion_mnist_both_paths_agree(mesh):
  data_dir = support.fashion_data_dir()
  loader = jd.device_loader("fashion_mnist", data_dir=data_dir, global_batch=512, mesh=mesh,
                            seed=0)
  host = _host("fashion_mnist", data_dir=data_dir, global_batch=512, seed=0)
  assert loader.steps_per_epoch == host.steps_per_epoch == 117
  for step in (0, 117, 118):  # first step, first step of epoch 1
    loader.set_state({"step": step})
    d, h = next(loader), host.batch_at(step)
    np.testing.assert_array_equal(np.asarray(d["index"]), h["index"])
    np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])
    np.testing.assert_allclose(np.asarray(d["image"]), h["image"], atol=1e-5)


def test_uint8_host_batches_normalise_to_the_float_ones(cifar_dir):
  f32 = _host(data_dir=cifar_dir, global_batch=64, seed=7).batch_at(2)
  u8 = _host(data_dir=cifar_dir, global_batch=64, seed=7, normalize=False).batch_at(2)
  assert u8["image"].dtype == np.uint8
  np.testing.assert_array_equal(u8["index"], f32["index"])
  on_device = jax.jit(lambda x: jd.normalize(x, CIFAR.mean, CIFAR.std, xp=jnp))(u8["image"])
  np.testing.assert_allclose(np.asarray(on_device), f32["image"], atol=1e-5)


# ------------------------------------------------------------------------------------------
# The trainer's loaders: make_train_loader / make_eval_loader.
# ------------------------------------------------------------------------------------------


def _train_loader(data_dir, mesh, seeds, device_resident, **kw):
  kw.setdefault("global_batch", 64)
  return jd.make_train_loader(CIFAR, data_dir, mesh=mesh, seeds=seeds,
                              device_resident=device_resident, **kw)


@pytest.mark.parametrize("device_resident", [True, False], ids=["device", "host"])
@pytest.mark.parametrize("seeds", [[4], [2, 0, 7]], ids=["S1", "S3"])
def test_train_loader_stacks_each_seeds_single_seed_batches(cifar_dir, mesh, seeds,
                                                            device_resident):
  train = _train_loader(cifar_dir, mesh, seeds, device_resident)
  assert (train.steps_per_epoch, train.num_examples, train.index_size) == (9, 600, 600)
  singles = [_host(data_dir=cifar_dir, global_batch=64, seed=s) for s in seeds]
  for step in range(10):  # into the second epoch
    batch = next(train)
    assert batch["image"].shape == (len(seeds), 64, 32, 32, 3)
    for k, v in batch.items():
      assert v.sharding == NamedSharding(mesh, P(None, "data")), k
      assert v.addressable_shards[0].data.shape[:2] == (len(seeds), 8), k
    for i, single in enumerate(singles):
      ref = next(single)
      np.testing.assert_array_equal(np.asarray(batch["index"][i]), ref["index"])
      np.testing.assert_array_equal(np.asarray(batch["label"][i]), ref["label"])
      if device_resident:  # normalised on device: the same up to float rounding
        np.testing.assert_allclose(np.asarray(batch["image"][i]), ref["image"], atol=1e-5)
      else:
        np.testing.assert_array_equal(np.asarray(batch["image"][i]), ref["image"])
  train.close()


def test_device_train_loader_seed_i_is_the_single_seed_device_pipeline(cifar_dir, mesh):
  arrays = jd.load_arrays("cifar100", "train", cifar_dir)
  train = _train_loader(cifar_dir, mesh, [3, 8], True)
  singles = [jd.DeviceResidentLoader(arrays, CIFAR, global_batch=64, mesh=mesh, seed=s)
             for s in (3, 8)]
  for _ in range(3):
    batch = next(train)
    for i, single in enumerate(singles):
      _assert_batches_equal({k: v[i] for k, v in batch.items()}, next(single))


def test_train_loader_without_collectives_in_its_batch_function(cifar_dir, mesh):
  # Each device gathers its own rows of every seed from the replicated split.
  train = _train_loader(cifar_dir, mesh, [0, 1], True)
  hlo = train._fn.lower(train._data, train.permutations(0), jnp.int32(0), jnp.int32(0),
                        train._seed_array).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)


@pytest.mark.parametrize("first,then", [(True, True), (False, False), (True, False)],
                         ids=["device", "host", "device-then-host"])
def test_train_loader_resumes_mid_epoch_as_if_uninterrupted(cifar_dir, mesh, first, then):
  straight = _train_loader(cifar_dir, mesh, [5, 6], first)
  for _ in range(7):
    next(straight)
  state = json.loads(json.dumps(straight.get_state()))  # survives JSON (and so orbax)
  assert state["step"] == 7 and state["seeds"] == [5, 6]
  expected = [next(straight) for _ in range(3)]  # crosses into the second epoch
  resumed = _train_loader(cifar_dir, mesh, [5, 6], then)
  resumed.set_state(state)
  for e in expected:
    got = next(resumed)
    for k in e:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(e[k]), atol=1e-5, err_msg=k)
  assert resumed.get_state() == straight.get_state()
  resumed.close()
  straight.close()


def test_train_loader_refuses_another_pipelines_state(cifar_dir, mesh):
  state = _train_loader(cifar_dir, mesh, [0, 1], True).get_state()
  with pytest.raises(ValueError, match=r"seeds=\[0, 1\] but this pipeline has seeds=\[0, 2\]"):
    _train_loader(cifar_dir, mesh, [0, 2], True).set_state(state)
  with pytest.raises(ValueError, match="global_batch"):
    _train_loader(cifar_dir, mesh, [0, 1], False, global_batch=32).set_state(state)


def test_eval_loader_is_built_once_and_iterates_again_identically(cifar_dir, mesh,
                                                                  monkeypatch):
  traces = []

  def counting_eval_batch(*args, **kwargs):
    traces.append(1)  # runs once per trace, not per call
    return jd.eval_batch(*args, **kwargs)

  monkeypatch.setattr(device, "eval_batch", counting_eval_batch)
  evals = jd.make_eval_loader(CIFAR, cifar_dir, mesh=mesh, global_batch=64,
                              device_resident=True)
  placed = evals.pipeline._data
  first, second = list(evals), list(evals)
  assert len(traces) == 1  # traced once for both passes
  assert evals.pipeline._data is placed
  assert all(a is b for a, b in zip(placed.values(), evals.pipeline._data.values()))
  host = jd.make_eval_loader(CIFAR, cifar_dir, mesh=mesh, global_batch=64,
                             device_resident=False)
  host_first, host_second = list(host), list(host)
  assert len(evals) == len(host) == len(first) == len(host_second) == 3  # ceil(130 / 64)
  for d1, d2, h1, h2 in zip(first, second, host_first, host_second):
    assert sorted(d1) == sorted(h1) == ["image", "index", "label", "mask"]
    for k in d1:
      assert d1[k].sharding == h1[k].sharding == NamedSharding(mesh, P("data")), k
      np.testing.assert_array_equal(np.asarray(d1[k]), np.asarray(d2[k]), err_msg=k)
      np.testing.assert_array_equal(np.asarray(h1[k]), np.asarray(h2[k]), err_msg=k)
      np.testing.assert_allclose(np.asarray(d1[k]), np.asarray(h1[k]), atol=1e-5, err_msg=k)
  assert [int(np.asarray(b["mask"]).sum()) for b in first] == [64, 64, 2]
  np.testing.assert_array_equal(
      np.concatenate([np.asarray(b["index"])[np.asarray(b["mask"])] for b in host_first]),
      np.arange(130))
  host.close()
  evals.close()


@pytest.mark.parametrize("make", ["train", "eval"])
def test_loaders_refuse_a_batch_that_does_not_split_over_the_devices(cifar_dir, mesh, make):
  kw = dict(mesh=mesh, global_batch=12, device_resident=True)
  with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 devices"):
    if make == "train":
      jd.make_train_loader(CIFAR, cifar_dir, seeds=[0], **kw)
    else:
      jd.make_eval_loader(CIFAR, cifar_dir, **kw)


def test_loaders_on_mock_imagenet_use_the_host_pipeline(mesh):
  with tfds.testing.mock_data(num_examples=16):
    with pytest.raises(ValueError, match="not a device-resident dataset"):
      jd.make_train_loader("imagenet2012", None, mesh=mesh, global_batch=8, seeds=[0],
                           device_resident=True)
    train = jd.make_train_loader("imagenet2012", None, mesh=mesh, global_batch=8,
                                 seeds=[0, 1], device_resident=False)
    batch = next(train)
    evals = jd.make_eval_loader("imagenet2012", None, mesh=mesh, global_batch=8,
                                device_resident=False)
    ev = list(evals)
  assert batch["image"].shape == (2, 8, 224, 224, 3)
  assert batch["label"].sharding == NamedSharding(mesh, P(None, "data"))
  assert not np.array_equal(np.asarray(batch["index"][0]), np.asarray(batch["index"][1]))
  assert len(ev) == 2 and ev[0]["image"].shape == (8, 224, 224, 3)
  assert all(bool(np.asarray(b["mask"]).all()) for b in ev)
