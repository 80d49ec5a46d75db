"""The official raw formats of the datasets, read with plain Python/NumPy.

Fashion-MNIST's IDX files (LeCun's MNIST format, gzipped or not, in a folder or Debian's
`dataset-fashion-mnist` package), CIFAR-100's python and binary archives (a .tar.gz or its
extracted folder; the python batches through a restricted unpickler), and ImageNet's tars,
streamed. tfds's own builders read these with `tf.io.gfile` / TensorFlow ops; `builders`
feeds tfds these readers instead. Bad files raise `datasets.BadDataError` naming the file.
"""

import gzip
import io
import os
import pickle
import subprocess
import tarfile
from typing import Iterator

import numpy as np

from jaxkd.data import datasets

# Fashion-MNIST's four IDX files as the release names them (without .gz), by split and kind.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (LeCun's MNIST format, optionally gzipped) as a uint8 array.

  Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one
  big-endian uint32 size per dimension.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip's magic number (tfds names downloads its own way)
      data = gzip.decompress(data)
  except (OSError, EOFError) as e:
    raise datasets.BadDataError(f"Cannot read IDX file {path}: {e}") from e
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
    raise datasets.BadDataError(f"{path} is not a uint8 IDX file (header {data[:4]!r}).")
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)):
    raise datasets.BadDataError(f"IDX file {path} holds {len(data) - offset} bytes of data "
                                f"for shape {shape}; it is truncated or corrupted.")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def debian_fashion_mnist_files() -> dict[str, str] | None:
  """The IDX files of Debian's `dataset-fashion-mnist` package, found with `dpkg -L`."""
  try:
    out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                         text=True, timeout=10, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  by_name = {os.path.basename(p): p for p in out.split() if p.endswith("-ubyte.gz")}
  files = {k: by_name.get(v + ".gz") for k, v in IDX_FILES.items()}
  if not all(files.values()) or not all(os.path.exists(p) for p in files.values()):
    return None
  return files


def find_idx_files(directory: str) -> dict[str, str] | None:
  """The four Fashion-MNIST IDX files in `directory` (gzipped or not), or None."""
  files = {}
  for key, stem in IDX_FILES.items():
    for candidate in (stem + ".gz", stem):
      if os.path.exists(os.path.join(directory, candidate)):
        files[key] = os.path.join(directory, candidate)
        break
  return files if len(files) == len(IDX_FILES) else None


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles CIFAR's python batches (dicts of lists, bytes and numpy arrays) and nothing
  else: pickle can run arbitrary code, and the archive comes from outside."""

  # The official batches are Python 2 pickles; a Python 3 protocol-2 re-pickle spells
  # bytes with _codecs.encode.
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
              ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"CIFAR archive refers to {module}.{name}, which a CIFAR "
                                 "batch never does.")


def _cifar_python(members: dict[str, bytes], path: str) -> dict:
  """Arrays of the python-version archive (`cifar-100-python/{train,test,meta}`)."""
  out = {}
  meta = _CifarUnpickler(io.BytesIO(members["meta"]), encoding="bytes").load()
  out["fine_names"] = [n.decode() for n in meta[b"fine_label_names"]]
  out["coarse_names"] = [n.decode() for n in meta[b"coarse_label_names"]]
  for split in ("train", "test"):
    d = _CifarUnpickler(io.BytesIO(members[split]), encoding="bytes").load()
    data = np.asarray(d[b"data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
      raise datasets.BadDataError(f"{path}: '{split}' data has shape {data.shape}; "
                                  "expected (N, 3072).")
    out[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                  np.asarray(d[b"fine_labels"], np.int64),
                  np.asarray(d[b"coarse_labels"], np.int64))
  return out


def _cifar_binary(members: dict[str, bytes], path: str) -> dict:
  """Arrays of the binary-version archive: records of <coarse><fine><3072 bytes CHW>."""
  out = {"fine_names": members["fine_label_names.txt"].decode().split(),
         "coarse_names": members["coarse_label_names.txt"].decode().split()}
  for split in ("train", "test"):
    raw = np.frombuffer(members[split + ".bin"], np.uint8)
    if raw.size % 3074:
      raise datasets.BadDataError(f"{path}: {split}.bin has {raw.size} bytes, not a "
                                  "multiple of 3074; it is truncated.")
    rec = raw.reshape(-1, 3074)
    out[split] = (rec[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                  rec[:, 1].astype(np.int64), rec[:, 0].astype(np.int64))
  return out


_CIFAR_PYTHON = ("train", "test", "meta")
_CIFAR_BINARY = ("train.bin", "test.bin", "fine_label_names.txt", "coarse_label_names.txt")


def read_cifar100(path: str) -> dict:
  """CIFAR-100 from the python or binary archive (a .tar.gz, or its extracted folder).

  Returns:
    {'train': (images uint8 [N,32,32,3], fine int [N], coarse int [N]), 'test': (...),
     'fine_names': [100 str], 'coarse_names': [20 str]}, in the archive's record order
    (the order tfds's ids `train_00000`... follow; both archives of the release hold the
    images in the same order).
  """
  members = {}
  try:
    if os.path.isdir(path):
      for root, _, names in os.walk(path):
        for n in names:
          if n in _CIFAR_PYTHON + _CIFAR_BINARY:
            with open(os.path.join(root, n), "rb") as f:
              members[n] = f.read()
    else:
      with tarfile.open(path, "r:*") as tar:
        for m in tar:
          n = os.path.basename(m.name)
          if m.isfile() and n in _CIFAR_PYTHON + _CIFAR_BINARY:
            members[n] = tar.extractfile(m).read()
  except (OSError, tarfile.TarError, EOFError) as e:
    raise datasets.BadDataError(f"Cannot read CIFAR-100 archive {path}: {e}") from e
  try:
    if all(k in members for k in _CIFAR_PYTHON):
      return _cifar_python(members, path)
    if all(k in members for k in _CIFAR_BINARY):
      return _cifar_binary(members, path)
  except (KeyError, pickle.UnpicklingError, EOFError, ValueError) as e:
    raise datasets.BadDataError(f"CIFAR-100 archive {path} is corrupted: {e}") from e
  raise datasets.BadDataError(
      f"{path} holds neither the CIFAR-100 python version ({', '.join(_CIFAR_PYTHON)}) nor "
      f"the binary version ({', '.join(_CIFAR_BINARY)}); found {sorted(members) or 'none'}.")


def find_cifar100_archive(directory: str) -> str | None:
  """CIFAR-100's python or binary archive (or its extracted folder) in `directory`, or None."""
  for name in ("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz", "cifar-100-python",
               "cifar-100-binary"):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def iter_tar(path: str) -> Iterator[tuple[str, io.BufferedReader]]:
  """(name, file object) of each file of a tar, streamed (tfds's reader opens it with TF)."""
  with tarfile.open(path, "r|*") as tar:
    for m in tar:
      if m.isfile():
        yield os.path.basename(m.name), tar.extractfile(m)
