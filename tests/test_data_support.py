"""Shared helpers of the data tests: generated raw archives and the real Fashion-MNIST.

Not a test module (it defines no tests); named test_data_* to sit with the data tests.
The real Fashion-MNIST is built once per test session, whichever module asks first.
"""

import atexit
import functools
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import time

import numpy as np
import PIL.Image
import pytest

from jaxkd.data import builders


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def debian_fashion_files_or_skip() -> dict[str, str]:
  """The Debian package's IDX files; skip without them, except in CI, where they must be."""
  files = builders.debian_fashion_mnist_files()
  if files is None:
    msg = ("Debian package dataset-fashion-mnist is not installed (apt-get install -y "
           "dataset-fashion-mnist); the real Fashion-MNIST tests need its files.")
    if in_ci():
      pytest.fail("CI=true: " + msg)
    pytest.skip(msg)
  return files


@functools.lru_cache(maxsize=None)
def _build_fashion(files_key: tuple) -> tuple[str, float]:
  data_dir = tempfile.mkdtemp(prefix="jaxkd-fashion-")
  atexit.register(shutil.rmtree, data_dir, True)
  t = time.perf_counter()
  builders.prepare("fashion_mnist", data_dir, download=False)
  return data_dir, time.perf_counter() - t


def fashion_data_dir() -> str:
  """A data dir holding the real tfds fashion_mnist, prepared from the Debian files."""
  files = debian_fashion_files_or_skip()
  return _build_fashion(tuple(sorted(files.items())))[0]


def fashion_build_seconds() -> float:
  files = debian_fashion_files_or_skip()
  return _build_fashion(tuple(sorted(files.items())))[1]


# ------------------------------------------------------------------------------------------
# Generated raw files in the official formats.
# ------------------------------------------------------------------------------------------


def fake_cifar100(n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    out[split] = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 100, n), rng.integers(0, 20, n))
  return out


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_cifar100_python(data: dict, path: str) -> str:
  """`cifar-100-python.tar.gz`: pickled dicts with b'data' (N, 3072) in CHW order."""
  with tarfile.open(path, "w:gz") as tar:
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    _tar_add(tar, "cifar-100-python/meta", pickle.dumps(meta, protocol=3))
    for split in ("train", "test"):
      images, fine, coarse = data[split]
      batch = {b"data": images.transpose(0, 3, 1, 2).reshape(len(fine), -1),
               b"fine_labels": [int(x) for x in fine],
               b"coarse_labels": [int(x) for x in coarse]}
      _tar_add(tar, f"cifar-100-python/{split}", pickle.dumps(batch, protocol=3))
  return path


def write_cifar100_binary(data: dict, path: str) -> str:
  """`cifar-100-binary.tar.gz`: records <coarse byte><fine byte><3072 bytes CHW>."""
  with tarfile.open(path, "w:gz") as tar:
    _tar_add(tar, "cifar-100-binary/fine_label_names.txt",
             "\n".join(f"fine{i}" for i in range(100)).encode())
    _tar_add(tar, "cifar-100-binary/coarse_label_names.txt",
             "\n".join(f"coarse{i}" for i in range(20)).encode())
    for split in ("train", "test"):
      images, fine, coarse = data[split]
      rec = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8),
                            images.transpose(0, 3, 1, 2).reshape(len(fine), -1)], axis=1)
      _tar_add(tar, f"cifar-100-binary/{split}.bin", rec.tobytes())
  return path


def jpeg_bytes(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> bytes:
  arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  buf = io.BytesIO()
  PIL.Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


IMAGENET_SYNSETS = ("n01440764", "n01443537", "n01739381")  # labels 0, 1, 59


def write_imagenet_tars(manual_dir: str, per_class: int = 4, n_val: int = 8,
                        seed: int = 0) -> dict:
  """ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar (flat).

  Includes one of the CMYK JPEGs tfds converts (n01739381_1309.JPEG) and a grey JPEG.
  Returns {file_name: (height, width)} of every train image.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  sizes = {}
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for syn in IMAGENET_SYNSETS:
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        names = [(f"{syn}_{i}.JPEG", "RGB") for i in range(per_class)]
        if syn == "n01739381":
          names += [("n01739381_1309.JPEG", "CMYK"), (f"{syn}_grey.JPEG", "L")]
        for name, mode in names:
          h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
          _tar_add(inner, name, jpeg_bytes(rng, h, w, mode))
          sizes[name] = (h, w)
      _tar_add(outer, f"{syn}.tar", buf.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i in range(1, n_val + 1):
      _tar_add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(rng, 64, 80))
  return sizes
