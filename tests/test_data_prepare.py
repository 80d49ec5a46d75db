"""Preparing tfds datasets without TensorFlow: real Fashion-MNIST, CIFAR-100 and ImageNet
from their raw formats, and the fast, explicit error when a dataset cannot be had."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxkd.data as jd
from jaxkd.data import builders
import test_data_support as support


def test_no_tensorflow_anywhere():
  # Reading and preparing must work without TF; the test environment has none, so a
  # sneaky `import tensorflow` anywhere in jaxkd.data would fail the tests below anyway.
  assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None


# ------------------------------------------------------------------------------------------
# Real Fashion-MNIST from Debian's dataset-fashion-mnist.
# ------------------------------------------------------------------------------------------


def test_fashion_mnist_from_debian_equals_idx_files():
  files = support.debian_fashion_files_or_skip()
  data_dir = support.fashion_data_dir()
  print(f"fashion_mnist prepared in {support.fashion_build_seconds():.1f} s")
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  assert builder.is_prepared() and str(builder.version) == "3.0.1"
  assert builder.info.file_format.value == "array_record"
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  for split in ("train", "test"):
    raw_x = builders.read_idx(files[f"{split}_images"])
    raw_y = builders.read_idx(files[f"{split}_labels"]).astype(np.int32)
    got = jd.load_arrays("fashion_mnist", split, data_dir)
    assert got["image"].shape == (len(raw_y), 28, 28, 1)
    np.testing.assert_array_equal(got["index"], np.arange(len(raw_y)))
    # tfds shuffles at write time and fashion_mnist has no id feature: match each example
    # by content. Sorting (image bytes, label) pairs compares the two as multisets.
    def keyed(x, y):
      flat = np.concatenate([x.reshape(len(y), -1), y[:, None].astype(np.uint8)], axis=1)
      return flat[np.lexsort(flat.T[::-1])]
    np.testing.assert_array_equal(keyed(got["image"][..., 0], got["label"]),
                                  keyed(raw_x, raw_y))
    assert np.bincount(got["label"], minlength=10).tolist() == \
        np.bincount(raw_y, minlength=10).tolist()


def test_ensure_prepared_returns_fast_when_present():
  data_dir = support.fashion_data_dir()
  t = time.perf_counter()
  assert jd.ensure_prepared("fashion_mnist", data_dir) == os.path.abspath(data_dir)
  assert time.perf_counter() - t < 2.0


def test_fashion_mnist_from_manual_dir_idx(tmp_path):
  # --manual_dir with (uncompressed) IDX files; a small slice keeps this test quick.
  rng = np.random.default_rng(0)
  manual = tmp_path / "manual"
  manual.mkdir()
  data = {}
  for key, stem in builders._IDX_FILES.items():  # pylint: disable=protected-access
    n = 40 if key.startswith("train") else 10
    arr = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if key.endswith("images")
           else rng.integers(0, 10, n).astype(np.uint8))
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    (manual / stem).write_bytes(header + arr.tobytes())
    data[key] = arr
  jd.prepare("fashion_mnist", str(tmp_path / "dd"), manual_dir=str(manual))
  got = jd.load_arrays("fashion_mnist", "test", str(tmp_path / "dd"))
  assert sorted(map(bytes, got["image"][..., 0])) == sorted(map(bytes, data["test_images"]))


# ------------------------------------------------------------------------------------------
# CIFAR-100 from the python and the binary archives.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_cifar100_from_archive(tmp_path, fmt):
  data = support.fake_cifar100(n_train=120, n_test=40)
  manual = tmp_path / "manual"
  manual.mkdir()
  write = support.write_cifar100_python if fmt == "python" else support.write_cifar100_binary
  write(data, str(manual / f"cifar-100-{fmt}.tar.gz"))
  data_dir = str(tmp_path / "dd")
  folder = jd.prepare("cifar100", data_dir, manual_dir=str(manual))
  assert os.fspath(folder).endswith(os.path.join("cifar100", "3.0.2"))
  builder = tfds.builder("cifar100", data_dir=data_dir)
  assert builder.info.features["label"].names[:2] == ["fine0", "fine1"]
  for split in ("train", "test"):
    got = jd.load_arrays("cifar100", split, data_dir, with_ids=True)
    # ids are tfds's: '<split>_<position in the archive>', whatever the write-time shuffle.
    order = np.array([int(i.split("_")[1]) for i in got["id"]])
    assert all(i.startswith(split + "_") for i in got["id"])
    np.testing.assert_array_equal(got["image"], data[split][0][order])
    np.testing.assert_array_equal(got["label"], data[split][1][order])
  coarse = [ex["coarse_label"] for ex in jd.open_source("cifar100", "test", data_dir).read(
      range(5))]
  assert all(0 <= int(c) < 20 for c in coarse)


def test_cli_prepares_cifar100(tmp_path):
  data = support.fake_cifar100(n_train=20, n_test=10)
  support.write_cifar100_binary(data, str(tmp_path / "cifar-100-binary.tar.gz"))
  out = subprocess.run(
      [sys.executable, "-m", "jaxkd.data.prepare", "cifar100", "--data_dir",
       str(tmp_path / "dd"), "--manual_dir", str(tmp_path)],
      capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert "cifar100 is prepared in" in out.stdout
  assert len(jd.open_source("cifar100", "train", str(tmp_path / "dd"))) == 20


# ------------------------------------------------------------------------------------------
# ImageNet from the ILSVRC2012 tars.
# ------------------------------------------------------------------------------------------


def test_imagenet2012_from_tars(tmp_path):
  sizes = support.write_imagenet_tars(str(tmp_path / "manual"))
  data_dir = str(tmp_path / "dd")
  jd.prepare("imagenet2012", data_dir, manual_dir=str(tmp_path / "manual"))
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  assert str(builder.version) == "5.1.0"
  assert sorted(builder.info.splits) == ["train", "validation"]
  train = jd.open_source("imagenet2012", "train", data_dir)
  examples = train.read(range(len(train)))
  names = {e["file_name"].decode(): e for e in examples}
  assert set(names) == set(sizes)
  for name, e in names.items():
    assert e["image"].shape == (*sizes[name], 3)  # grey and CMYK came out RGB
    assert int(e["label"]) == {"n01440764": 0, "n01443537": 1, "n01739381": 59}[name[:9]]
  val = jd.open_source("imagenet2012", "validation", data_dir).read(range(8))
  by_name = {e["file_name"].decode(): int(e["label"]) for e in val}
  # tfds's validation labels: the first ILSVRC2012 validation image is class 65.
  assert by_name["ILSVRC2012_val_00000001.JPEG"] == 65


# ------------------------------------------------------------------------------------------
# A dataset that is neither prepared nor obtainable fails fast, saying what to run.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar100", "imagenet2012"])
def test_missing_dataset_fails_within_seconds(tmp_path, name):
  data_dir = str(tmp_path / "empty")
  for call in (lambda: jd.ensure_prepared(name, data_dir),
               lambda: jd.load_arrays(name, "train", data_dir),
               lambda: jd.host_iterator(name, data_dir=data_dir, global_batch=8,
                                        process_index=0, process_count=1),
               lambda: jd.prepare(name, data_dir, download=False)):
    t = time.perf_counter()
    with pytest.raises(jd.DatasetNotFoundError) as err:
      call()
    assert time.perf_counter() - t < 10.0
    msg = str(err.value)
    assert f"python -m jaxkd.data.prepare {name} --data_dir {os.path.abspath(data_dir)}" in msg
    assert os.path.abspath(data_dir) in msg


def test_prepare_offline_without_files_fails_within_seconds(tmp_path):
  # download=True: the download host is probed first (this machine is offline; online the
  # probe succeeds and tfds downloads, which this test cannot exercise).
  if builders.online("www.cs.toronto.edu"):
    pytest.skip("www.cs.toronto.edu is reachable: prepare would download CIFAR-100.")
  t = time.perf_counter()
  with pytest.raises(jd.DatasetNotFoundError, match="cannot be reached"):
    jd.prepare("cifar100", str(tmp_path / "dd"), manual_dir=str(tmp_path))
  assert time.perf_counter() - t < 10.0


def test_cli_missing_dataset_exits_nonzero_fast(tmp_path):
  t = time.perf_counter()
  out = subprocess.run(
      [sys.executable, "-m", "jaxkd.data.prepare", "imagenet2012", "--data_dir",
       str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 1
  assert "python -m jaxkd.data.prepare imagenet2012" in out.stderr
  assert time.perf_counter() - t < 10.0


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="cifar100, fashion_mnist, imagenet2012"):
    jd.spec("cifar10")
