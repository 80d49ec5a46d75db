"""Preparing tfds datasets without TensorFlow: real Fashion-MNIST, CIFAR-100 and ImageNet
from their raw formats; where `ensure_prepared` gets Fashion-MNIST from on a machine that
lacks it (Debian's package, apt-get, a download), with apt and the network replaced by
fakes; and the fast, explicit error when a dataset cannot be had."""

import dataclasses
import functools
import http.server
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
import jaxkd.data as jd
from jaxkd.data import builders
from jaxkd.data import datasets
from jaxkd.data import raw


def test_no_tensorflow_anywhere():
  # Reading and preparing must work without TF; the test environment has none, so a
  # sneaky `import tensorflow` anywhere in jaxkd.data would fail the tests below anyway.
  assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None


# ------------------------------------------------------------------------------------------
# Real Fashion-MNIST from Debian's dataset-fashion-mnist.
# ------------------------------------------------------------------------------------------


def test_fashion_mnist_from_debian_equals_idx_files():
  data_dir = helpers.fashion_data_dir()  # first: in CI this installs the package
  files = helpers.debian_fashion_files_or_skip()
  print(f"fashion_mnist prepared in {helpers.fashion_build_seconds():.1f} s")
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  assert builder.is_prepared() and str(builder.version) == "3.0.1"
  assert builder.info.file_format.value == "array_record"
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  for split in ("train", "test"):
    raw_x = raw.read_idx(files[f"{split}_images"])
    raw_y = raw.read_idx(files[f"{split}_labels"]).astype(np.int32)
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
  data_dir = helpers.fashion_data_dir()
  t = time.perf_counter()
  assert jd.ensure_prepared("fashion_mnist", data_dir) == os.path.abspath(data_dir)
  assert time.perf_counter() - t < 2.0


def _multiset(images, labels):
  """(image bytes, label) pairs, sorted: tfds shuffles at write time, and fashion_mnist has
  no id feature."""
  return sorted(zip(map(bytes, np.asarray(images)), np.asarray(labels).tolist()))


def _assert_holds(data_dir, arrays):
  for split in ("train", "test"):
    got = jd.load_arrays("fashion_mnist", split, data_dir)
    assert _multiset(got["image"][..., 0], got["label"]) == \
        _multiset(arrays[f"{split}_images"], arrays[f"{split}_labels"])


def test_fashion_mnist_from_manual_dir_idx(tmp_path):
  # --manual_dir with (uncompressed) IDX files; a small slice keeps this test quick.
  arrays = helpers.write_fashion_idx(str(tmp_path / "manual"), n_train=40, n_test=10,
                                     gz=False)
  jd.prepare("fashion_mnist", str(tmp_path / "dd"), manual_dir=str(tmp_path / "manual"))
  _assert_holds(str(tmp_path / "dd"), arrays)


def test_small_fashion_data_dir_is_learnable_tfds_data():
  data_dir = helpers.small_fashion_data_dir()
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  assert str(builder.version) == "3.0.1" and builder.info.file_format.value == "array_record"
  train = jd.load_arrays("fashion_mnist", "train", data_dir)
  test = jd.load_arrays("fashion_mnist", "test", data_dir)
  assert train["image"].shape == (1000, 28, 28, 1) and test["image"].shape == (500, 28, 28, 1)
  assert np.bincount(train["label"], minlength=10).min() > 50
  # The class signal: nearest class mean (from train) classifies the test split.
  x = lambda a: a["image"].reshape(len(a["label"]), -1).astype(np.float32)
  means = np.stack([x(train)[train["label"] == c].mean(0) for c in range(10)])
  pred = ((x(test)[:, None] - means[None]) ** 2).sum(-1).argmin(1)
  assert (pred == test["label"]).mean() > 0.9


# ------------------------------------------------------------------------------------------
# ensure_prepared on a machine without Fashion-MNIST: apt, dpkg and the network are fakes.
# ------------------------------------------------------------------------------------------

APT_INSTALL = ["install", "-y", "-qq", "dataset-fashion-mnist"]


@pytest.fixture
def machine(monkeypatch, tmp_path):
  """A fake machine: which commands exist, root or not, online or not. apt-get calls are
  recorded; `apt-get install` "installs" generated IDX files into a temp dir, which the
  Debian-file lookup then finds. Nothing real is installed, run or downloaded."""
  m = types.SimpleNamespace(apt=True, sudo=False, root=True, sudo_ok=True, online=False,
                            lists_empty=False, install_error=None, calls=[],
                            pkg=str(tmp_path / "usr_share_dataset_fashion_mnist"),
                            arrays=None)

  def run(argv, timeout):
    del timeout
    m.calls.append(list(argv))
    ok = subprocess.CompletedProcess(argv, 0, "", "")
    if argv == ["sudo", "-n", "true"]:
      return ok if m.sudo_ok else subprocess.CompletedProcess(argv, 1, "", "password needed")
    if "update" in argv:
      m.lists_empty = False
      return ok
    if m.lists_empty:
      return subprocess.CompletedProcess(
          argv, 100, "", "E: Unable to locate package dataset-fashion-mnist")
    if m.install_error:
      return subprocess.CompletedProcess(argv, 100, "", m.install_error)
    m.arrays = helpers.write_fashion_idx(m.pkg, n_train=60, n_test=20, seed=3)
    return ok

  monkeypatch.setattr(builders, "_run", run)
  monkeypatch.setattr(raw, "debian_fashion_mnist_files",
                      lambda: raw.find_idx_files(m.pkg) if os.path.isdir(m.pkg) else None)
  monkeypatch.setattr(builders, "online", lambda url, timeout=3.0: m.online)
  real_which = builders.shutil.which
  monkeypatch.setattr(builders.shutil, "which", lambda cmd: (
      f"/usr/bin/{cmd}" if {"apt-get": m.apt, "sudo": m.sudo}.get(cmd) else
      None if cmd in ("apt-get", "sudo") else real_which(cmd)))
  monkeypatch.setattr(builders.os, "geteuid", lambda: 0 if m.root else 1000)
  monkeypatch.delenv(builders.NO_APT_ENV, raising=False)
  return m


@pytest.mark.parametrize("case", ["root", "empty_lists", "sudo"])
def test_apt_installs_the_package_then_builds_from_its_files(machine, tmp_path, capsys, case):
  prefix = ["apt-get"]
  if case == "empty_lists":
    machine.lists_empty = True
  if case == "sudo":
    machine.root, machine.sudo = False, True
    prefix = ["sudo", "-n", "apt-get"]
  data_dir = str(tmp_path / "dd")
  assert jd.ensure_prepared("fashion_mnist", data_dir) == data_dir
  expected = {"root": [prefix + APT_INSTALL],
              "empty_lists": [prefix + APT_INSTALL, prefix + ["update", "-qq"],
                              prefix + APT_INSTALL],
              "sudo": [["sudo", "-n", "true"], prefix + APT_INSTALL]}[case]
  assert machine.calls == expected
  err = capsys.readouterr().err
  assert err.count("installing its Debian package") == 1 and "JAXKD_NO_APT=1" in err
  _assert_holds(data_dir, machine.arrays)  # built from what apt "installed"
  machine.calls.clear()
  assert jd.ensure_prepared("fashion_mnist", data_dir) == data_dir and not machine.calls


@pytest.mark.parametrize("case", ["no_apt", "not_root", "opted_out", "apt_fails"])
def test_offline_without_the_package_fails_within_seconds(machine, tmp_path, monkeypatch,
                                                          case):
  apt_cmd = "apt-get install -y dataset-fashion-mnist"
  why = {"no_apt": "apt-get is not on this machine",
         "not_root": "installing it needs root",
         "opted_out": "JAXKD_NO_APT is set",
         "apt_fails": "Could not get lock"}[case]
  if case == "no_apt":
    machine.apt = False
  elif case == "not_root":
    machine.root, machine.sudo, machine.sudo_ok = False, True, False
    apt_cmd = "sudo " + apt_cmd
  elif case == "opted_out":
    monkeypatch.setenv("JAXKD_NO_APT", "1")
  else:
    machine.install_error = "E: Could not get lock /var/lib/dpkg/lock-frontend"
  data_dir = str(tmp_path / "dd")
  t = time.perf_counter()
  with pytest.raises(jd.DatasetNotFoundError) as err:
    jd.ensure_prepared("fashion_mnist", data_dir)
  assert time.perf_counter() - t < 10.0
  msg = str(err.value)
  assert why in msg and "cannot be reached to download it" in msg
  assert f"python -m jaxkd.data.prepare fashion_mnist --data_dir {data_dir} " \
         "--manual_dir DIR" in msg
  assert (apt_cmd in msg) == (case != "no_apt"), msg
  installs = [c for c in machine.calls if c[-1] == "dataset-fashion-mnist"]
  assert len(installs) == (1 if case == "apt_fails" else 0)
  assert not jd.is_prepared("fashion_mnist", data_dir)


def test_mocked_dataset_needs_no_install(machine, tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    assert jd.ensure_prepared("fashion_mnist", str(tmp_path)) == str(tmp_path)
  assert not machine.calls


@pytest.fixture
def fashion_server(tmp_path):
  """An HTTP server on localhost serving generated Fashion-MNIST .gz files, as the release
  names them."""
  root = tmp_path / "www"
  arrays = helpers.write_fashion_idx(str(root), n_train=50, n_test=20, seed=5)

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                           functools.partial(Quiet, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/", arrays
  server.shutdown()
  server.server_close()


def test_online_without_the_package_downloads_through_tfds(machine, fashion_server,
                                                           tmp_path, monkeypatch, capsys):
  # apt is off, the Debian files absent; the download URL points at the local server, so
  # the real probe and tfds's real download manager (requests over HTTP) do the work.
  url, arrays = fashion_server
  monkeypatch.setenv("JAXKD_NO_APT", "1")
  monkeypatch.setattr(builders, "online", _REAL_ONLINE)
  monkeypatch.setitem(datasets.SPECS, "fashion_mnist",
                      dataclasses.replace(datasets.SPECS["fashion_mnist"], download_url=url))
  data_dir = str(tmp_path / "dd")
  assert jd.ensure_prepared("fashion_mnist", data_dir) == data_dir
  assert "downloading it (30 MB) from 127.0.0.1 with tfds" in capsys.readouterr().err
  _assert_holds(data_dir, arrays)
  downloaded = [f for _, _, fs in os.walk(os.path.join(data_dir, "downloads")) for f in fs]
  assert sum(f.endswith(".gz") for f in downloaded) == 4, downloaded
  assert not machine.calls


def test_fashion_mnist_url_is_tfds_own():
  # The spec's URL (what the probe and the download use) is the one tfds registers
  # checksums for, so a real download is verified.
  assert jd.spec("fashion_mnist").download_url == tfds.image_classification.FashionMNIST.URL


_REAL_ONLINE = builders.online


# ------------------------------------------------------------------------------------------
# CIFAR-100 from the python and the binary archives.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_cifar100_from_archive(tmp_path, fmt):
  data = helpers.fake_cifar100(n_train=120, n_test=40)
  manual = tmp_path / "manual"
  manual.mkdir()
  write = helpers.write_cifar100_python if fmt == "python" else helpers.write_cifar100_binary
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
  data = helpers.fake_cifar100(n_train=20, n_test=10)
  helpers.write_cifar100_binary(data, str(tmp_path / "cifar-100-binary.tar.gz"))
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
  sizes = helpers.write_imagenet_tars(str(tmp_path / "manual"))
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
  # A new interpreter importing tfds: about 5 s on an idle core, 13 s seen on a busy 2-core
  # CPU; hanging on the network would take minutes.
  assert time.perf_counter() - t < 30.0


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="cifar100, fashion_mnist, imagenet2012"):
    jd.spec("cifar10")
