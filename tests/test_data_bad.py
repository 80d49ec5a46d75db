"""Bad data gives a clear error that names the file or the field."""

import glob
import os
import shutil

import numpy as np
import pytest

import helpers
import jaxkd.data as jd
from jaxkd.data import datasets
from jaxkd.data import raw


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar_bad")
  helpers.write_cifar100_binary(helpers.fake_cifar100(n_train=400, n_test=50),
                                str(root / "cifar-100-binary.tar.gz"))
  jd.prepare("cifar100", str(root / "dd"), manual_dir=str(root))
  return str(root / "dd")


def _copy_with_damaged_train_file(src_dir, dst_dir, damage):
  shutil.copytree(src_dir, dst_dir)
  (path,) = glob.glob(os.path.join(dst_dir, "cifar100", "*", "cifar100-train.array_record*"))
  damage(path)
  return path


@pytest.mark.parametrize("kind", ["truncated", "corrupted"])
def test_damaged_record_file_is_named(cifar_dir, tmp_path, kind):
  def damage(path):
    size = os.path.getsize(path)
    if kind == "truncated":
      os.truncate(path, size // 2)
    else:  # flip bytes in the middle of the file
      with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
  path = _copy_with_damaged_train_file(cifar_dir, str(tmp_path / "dd"), damage)
  with pytest.raises(jd.BadDataError) as err:
    jd.load_arrays("cifar100", "train", str(tmp_path / "dd"))
  assert path in str(err.value) and "cifar100/train" in str(err.value)
  it = jd.host_iterator("cifar100", data_dir=str(tmp_path / "dd"), global_batch=400,
                        process_index=0, process_count=1)
  with pytest.raises(jd.BadDataError, match="record file"):
    next(it)


def test_missing_record_file_is_named(cifar_dir, tmp_path):
  path = _copy_with_damaged_train_file(cifar_dir, str(tmp_path / "dd"), os.remove)
  with pytest.raises(jd.BadDataError, match=f"Record file {path} .* is missing"):
    jd.open_source("cifar100", "train", str(tmp_path / "dd"))


def test_wrong_split_lists_the_available_ones(cifar_dir):
  for split in ("validation", "train[:10%]+valid"):
    with pytest.raises(ValueError, match=r"Unknown split .*available splits: test, train"):
      jd.load_arrays("cifar100", split, cifar_dir)
  with pytest.raises(ValueError, match="available splits: test, train"):
    jd.host_iterator("cifar100", "tran", cifar_dir, global_batch=8, process_index=0,
                     process_count=1)
  assert len(jd.open_source("cifar100", "train[:10%]", cifar_dir)) == 40


def _source(n=16, bad_at=None, image_shape=(32, 32, 3), label=None):
  examples = []
  for i in range(n):
    shape = image_shape if i == bad_at else (32, 32, 3)
    y = label if (i == bad_at and label is not None) else i % 100
    examples.append({"image": np.zeros(shape, np.uint8), "label": np.int64(y)})
  return datasets.Source(examples, name="cifar100", split="train")


def test_label_out_of_range_is_named():
  with pytest.raises(jd.BadDataError,
                     match=r"Field 'label' of cifar100/train example 5 is 100, outside "
                           r"\[0, 100\)"):
    jd.load_arrays("cifar100", "train", source=_source(bad_at=5, label=100))
  it = jd.host_iterator("cifar100", global_batch=16, source=_source(bad_at=3, label=-1),
                        process_index=0, process_count=1, train=False)
  with pytest.raises(jd.BadDataError, match="Field 'label' .* example 3 is -1"):
    next(it)


def test_image_of_unexpected_shape_is_named():
  with pytest.raises(jd.BadDataError,
                     match=r"Field 'image' of cifar100/train example 7 has shape "
                           r"\(30, 32, 3\); expected \(32, 32, 3\)"):
    jd.load_arrays("cifar100", "train", source=_source(bad_at=7, image_shape=(30, 32, 3)))
  it = jd.host_iterator("cifar100", global_batch=16, process_index=0, process_count=1,
                        source=_source(bad_at=2, image_shape=(32, 32, 1)))
  with pytest.raises(jd.BadDataError, match=r"example 2 has shape \(32, 32, 1\)"):
    next(it)


def test_undecodable_imagenet_image_is_named(tmp_path):
  examples = [{"image": b"not a jpeg", "label": np.int64(1), "file_name": b"x.JPEG"}] * 2
  src = datasets.Source(examples, name="imagenet2012", split="train")
  it = jd.host_iterator("imagenet2012", global_batch=2, source=src, process_index=0,
                        process_count=1)
  with pytest.raises(jd.BadDataError, match="Field 'image' of imagenet2012/train example 0"):
    next(it)


def test_bad_raw_files_are_named(tmp_path):
  good = tmp_path / "train-images-idx3-ubyte"
  good.write_bytes(bytes([0, 0, 8, 3]) + np.asarray([2, 28, 28], ">u4").tobytes()
                   + bytes(2 * 28 * 28))
  assert raw.read_idx(str(good)).shape == (2, 28, 28)
  short = tmp_path / "short-idx"
  short.write_bytes(good.read_bytes()[:-10])
  with pytest.raises(jd.BadDataError, match=f"IDX file {short} .* truncated"):
    raw.read_idx(str(short))
  archive = tmp_path / "cifar-100-python.tar.gz"
  helpers.write_cifar100_python(helpers.fake_cifar100(10, 10), str(archive))
  cut = tmp_path / "cut" / "cifar-100-python.tar.gz"
  cut.parent.mkdir()
  cut.write_bytes(archive.read_bytes()[:2000])
  with pytest.raises(jd.BadDataError, match=str(cut)):
    jd.prepare("cifar100", str(tmp_path / "dd"), manual_dir=str(cut.parent))
  assert not jd.is_prepared("cifar100", str(tmp_path / "dd"))
