"""Shared helpers of the tests (not a test module): generated raw archives in the official
formats, a small generated Fashion-MNIST, the real one, and tiny trainer runs.

Trainer tests use `small_fashion_data_dir()` by default, so they never skip. The real
Fashion-MNIST (`fashion_data_dir()`) is prepared the way the quickstart prepares it; in CI
(`CI=true`) it must be there, so a missing dataset fails instead of skipping. Each is built
once per test session, whichever module asks first.
"""

import atexit
import contextlib
import functools
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np
import PIL.Image
import pytest

from jaxkd import checkpoint
from jaxkd import config as jconfig
from jaxkd import train
from jaxkd.data import builders
from jaxkd.data import datasets
from jaxkd.data import raw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def config_module(name: str):
  """`configs/<name>.py` as a module, loaded by path (configs/ is not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"jaxkd_test_config_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _session_dir(prefix: str) -> str:
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, True)
  return path


# ------------------------------------------------------------------------------------------
# The real Fashion-MNIST.
# ------------------------------------------------------------------------------------------


_REAL_FASHION = {}  # the session's one outcome: (data_dir, seconds) or the failure


def _real_fashion() -> tuple[str, float]:
  """Prepared once, as `python -m jaxkd.main` would: from Debian's files; in CI also by
  installing the package or downloading (`ensure_prepared`), so CI checks that path too."""
  if not in_ci() and raw.debian_fashion_mnist_files() is None:
    pytest.skip("Debian package dataset-fashion-mnist is not installed (apt-get install -y "
                "dataset-fashion-mnist); the real Fashion-MNIST tests need its files. "
                "With CI=true, these tests install it or fail.")
  if not _REAL_FASHION:
    data_dir = _session_dir("jaxkd-fashion-")
    t = time.perf_counter()
    try:
      builders.ensure_prepared("fashion_mnist", data_dir)
      _REAL_FASHION["ok"] = (data_dir, time.perf_counter() - t)
    except datasets.DatasetNotFoundError as e:
      _REAL_FASHION["error"] = str(e)
  if "error" in _REAL_FASHION:
    pytest.fail("The real Fashion-MNIST is required (CI=true) and could not be prepared: "
                + _REAL_FASHION["error"], pytrace=False)
  return _REAL_FASHION["ok"]


def fashion_data_dir() -> str:
  """A data dir holding the real tfds fashion_mnist (60k / 10k)."""
  return _real_fashion()[0]


def fashion_build_seconds() -> float:
  return _real_fashion()[1]


def debian_fashion_files_or_skip() -> dict[str, str]:
  """The Debian package's IDX files; skip without them, except in CI, where they must be."""
  files = raw.debian_fashion_mnist_files()
  if files is None:
    msg = ("Debian package dataset-fashion-mnist is not installed (apt-get install -y "
           "dataset-fashion-mnist); the real Fashion-MNIST tests need its files.")
    if in_ci():
      pytest.fail("CI=true: " + msg)
    pytest.skip(msg)
  return files


# ------------------------------------------------------------------------------------------
# A small generated Fashion-MNIST, in the real on-disk format.
# ------------------------------------------------------------------------------------------


def fashion_like_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`n` 28x28 uint8 images with a learnable class signal, and their labels (10 classes).

  Class c is a bright 8x8 square centred on cell c of a 4x3 grid (the last two cells stay
  empty), jittered by up to 2 pixels, over noise in [0, 90): a small CNN learns it within
  an epoch, and nothing else about the images is informative.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = rng.integers(0, 90, (n, 28, 28)).astype(np.uint8)
  rows, cols = labels // 3, labels % 3
  dy, dx = rng.integers(-2, 3, (2, n))
  for i in range(n):
    y, x = 3 + 6 * rows[i] + dy[i], 4 + 8 * cols[i] + dx[i]
    y, x = int(np.clip(y, 0, 20)), int(np.clip(x, 0, 20))
    images[i, y:y + 8, x:x + 8] = rng.integers(180, 256, (8, 8))
  return images, labels


def idx_bytes(arr: np.ndarray) -> bytes:
  """`arr` (uint8) as an IDX file: magic 0 0 8 ndim, big-endian uint32 dims, data."""
  arr = np.ascontiguousarray(arr, np.uint8)
  return bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes()


def write_fashion_idx(directory: str, n_train: int = 1000, n_test: int = 500, seed: int = 0,
                      gz: bool = True) -> dict[str, np.ndarray]:
  """Writes the four Fashion-MNIST IDX files (named as the release names them) of
  `fashion_like_arrays` into `directory`; returns the arrays by `raw.IDX_FILES` key."""
  os.makedirs(directory, exist_ok=True)
  x_train, y_train = fashion_like_arrays(n_train, seed)
  x_test, y_test = fashion_like_arrays(n_test, seed + 1)
  arrays = {"train_images": x_train, "train_labels": y_train,
            "test_images": x_test, "test_labels": y_test}
  for key, stem in raw.IDX_FILES.items():
    data = idx_bytes(arrays[key])
    with open(os.path.join(directory, stem + (".gz" if gz else "")), "wb") as f:
      f.write(gzip.compress(data, mtime=0) if gz else data)
  return arrays


@functools.lru_cache(maxsize=None)
def small_fashion_data_dir() -> str:
  """A data dir holding a tfds fashion_mnist of 1,000 train / 500 test generated images.

  Written by jaxkd's own builder from IDX files in a manual dir, so it is the real on-disk
  format (array_record, version 3.0.1, the real features) that `ensure_prepared` and the
  trainer read; only the images are `fashion_like_arrays`.
  """
  root = _session_dir("jaxkd-small-fashion-")
  write_fashion_idx(os.path.join(root, "manual"))
  data_dir = os.path.join(root, "data")
  builders.prepare("fashion_mnist", data_dir, manual_dir=os.path.join(root, "manual"))
  return data_dir


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


# ------------------------------------------------------------------------------------------
# Trainer runs: tiny configs, in-process runs on 2 devices, the CLI in subprocesses.
# ------------------------------------------------------------------------------------------


def quick_config(data_dir, *, mode="teacher", method="ce", steps=6, batch=32, **overrides):
  c = jconfig.default_config()
  jconfig.apply_method(c, method)
  c.mode = mode
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = data_dir
  c.model = "quick_student"
  c.teacher.model = "quick_teacher"
  c.batch_size = batch
  c.eval_batch_size = 1000
  c.num_epochs = 1
  c.max_steps = steps
  c.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.progress_bar = False
  c.optimizer.milestones = ()
  c.optimizer.schedule = "cosine"
  c.optimizer.nesterov = True
  return set_fields(c, overrides)


def set_fields(config, fields):
  """Sets dotted fields ("optimizer.lr": 0.1) of a ConfigDict; returns it."""
  for key, value in fields.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def train_run(config, workdir, devices=None):
  """In-process runs use 2 of the 8 virtual devices: XLA's CPU collectives over all 8 can
  starve each other's rendezvous on a 2-core machine once earlier tests left threads behind;
  the 8-device comparison runs in fresh subprocesses instead."""
  return train.train_and_evaluate(config, workdir, devices=devices or jax.devices()[:2])


@functools.lru_cache(maxsize=None)
def quick_teacher_dir() -> str:
  """The model folder of a quick teacher trained 4 steps on `small_fashion_data_dir()`,
  once per session: the distillation tests of several modules read it (its quality does not
  matter to them, only that it is a real trainer-written teacher)."""
  workdir = _session_dir("jaxkd-quick-teacher-")
  train_run(quick_config(small_fashion_data_dir(), model="quick_teacher", steps=4), workdir)
  return os.path.join(workdir, "model")


def read_metrics(workdir, prefix="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r[prefix]) for r in rows if prefix in r]


def load_params(workdir):
  variables, _ = checkpoint.restore_model_variables(os.path.join(workdir, "model"))
  return variables


def assert_trees_equal(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@contextlib.contextmanager
def count_compilations(fragment):
  """Collects the names of the functions XLA compiles in the block whose name holds
  `fragment` (compilations, not cache hits: jax reports each backend compile)."""
  names = []

  def listener(event, duration, **kwargs):
    del duration
    name = str(kwargs.get("fun_name", ""))
    if event == "/jax/core/compile/backend_compile_duration" and fragment in name:
      names.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def cli_env(env=None):
  """The environment of a `python -m jaxkd.main` subprocess: CPU with one device, as the command
  runs on a user's CPU machine, unless `env` asks for more (EIGHT_DEVICES). The tests' own
  process has 8 virtual devices; a subprocess does not inherit them because XLA:CPU now and then
  aborts a run of several devices on this 2-core machine (docs/NOTES.md#xlacpu-collective-hangs),
  so only the tests that compare device counts pay that risk."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", **ONE_DEVICE, **(env or {})}


def cli(args, env=None, **kwargs):
  return subprocess.run([sys.executable, "-m", "jaxkd.main", *args], cwd=REPO, env=cli_env(env),
                        capture_output=True, text=True, **kwargs)


def signal_cli_run(args, workdir, signum, after_rows, env=None):
  """Starts `python -m jaxkd.main ARGS`, sends it `signum` once its teacher run has logged
  `after_rows` rows of metrics.jsonl, and returns (returncode, stdout, stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", "jaxkd.main", *args], cwd=REPO,
                          env=cli_env(env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "teacher", "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (
      os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= after_rows):
    assert proc.poll() is None, "the run ended before the signal could be sent"
    time.sleep(0.05)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def kill_after_checkpoint(args, checkpoints, at_least, env=None):
  """Starts `python -m jaxkd.main ARGS`, SIGKILLs it once the folder `checkpoints` holds a
  step >= `at_least`, and returns the newest step there (asserted to be one)."""
  proc = subprocess.Popen([sys.executable, "-m", "jaxkd.main", *args], cwd=REPO,
                          env=cli_env(env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  steps = lambda: ([int(d) for d in os.listdir(checkpoints) if d.isdigit()]
                   if os.path.isdir(checkpoints) else [])
  deadline = time.time() + 300
  while time.time() < deadline and not (steps() and max(steps()) >= at_least):
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert steps(), "no checkpoint was written before the kill"
  return max(steps())


def run_cli_config(workdir, data_dir, steps, extra=()):
  return ["--config", os.path.join(REPO, "configs", "quickstart.py"),
          "--workdir", workdir, f"--config.dataset.data_dir={data_dir}",
          "--config.suite=('teacher',)", f"--config.max_steps={steps}",
          "--config.checkpoint.every_steps=2", "--config.progress_bar=False",
          "--config.log_every_steps=1", "--config.batch_size=32", *extra]
