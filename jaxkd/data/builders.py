"""Preparing tfds datasets as array_record, without TensorFlow, online or from local files.

Each builder here subclasses tfds's own (`FashionMNIST`, `Cifar100`, imagenet2012's
`Builder`), keeps its registered name, version and features, and replaces only what reads
the raw files, which tfds does with `tf.io.gfile` / TensorFlow ops: here `raw`'s plain
Python readers, and PIL for the images. What gets written is exactly what
`tfds.data_source(name, data_dir=...)` reads with tfds's registered builder.

Where the raw files come from (docs/ENVIRONMENT.md#getting-the-datasets):
- `prepare` (and `python -m jaxkd.data.prepare`): `manual_dir` (files the user has); for
  Fashion-MNIST without one, the files of Debian's `dataset-fashion-mnist` package; then
  tfds's download manager, only after a short probe finds the download host reachable
  (offline, tfds would retry DNS for minutes).
- `ensure_prepared` (what the trainer calls), for Fashion-MNIST: the Debian files; if the
  package is missing, `apt-get install`s it when apt-get is there and we are root or have
  passwordless sudo (`JAXKD_NO_APT=1` turns this off); else the download; else an error
  within seconds naming the command that fixes it. Other datasets are never fetched
  behind the user's back: it names the `prepare` command instead.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.parse

from jaxkd.data import datasets
from jaxkd.data import raw

# ------------------------------------------------------------------------------------------
# Debian's package, apt-get, the network.
# ------------------------------------------------------------------------------------------

DEBIAN_PACKAGE = "dataset-fashion-mnist"
NO_APT_ENV = "JAXKD_NO_APT"  # set (not "0" or empty): never install the package by itself


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
  """Runs apt-get / sudo (the one door to the system, which tests replace)."""
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                        env=env)


def apt_prefix() -> tuple[list[str] | None, str]:
  """The argv that runs apt-get as root here (`apt-get` or `sudo -n apt-get`), else
  (None, why not)."""
  if os.environ.get(NO_APT_ENV, "") not in ("", "0"):
    return None, f"{NO_APT_ENV} is set"
  if shutil.which("apt-get") is None:
    return None, "apt-get is not on this machine"
  if os.geteuid() == 0:
    return ["apt-get"], ""
  if shutil.which("sudo"):
    try:
      if _run(["sudo", "-n", "true"], 10).returncode == 0:
        return ["sudo", "-n", "apt-get"], ""
    except (OSError, subprocess.SubprocessError):
      pass
  return None, "installing it needs root, and `sudo -n` is not allowed without a password"


def install_debian_fashion_mnist() -> str:
  """Installs Debian's `dataset-fashion-mnist` with apt-get; returns "" or why not."""
  prefix, why = apt_prefix()
  if prefix is None:
    return why
  install = prefix + ["install", "-y", "-qq", DEBIAN_PACKAGE]
  print(f"jaxkd: Fashion-MNIST is not prepared; installing its Debian package (30 MB): "
        f"{' '.join(install)}   ({NO_APT_ENV}=1 turns this off)", file=sys.stderr, flush=True)
  try:
    out = _run(install, 600)
    if out.returncode != 0 and "Unable to locate package" in out.stdout + out.stderr:
      # Empty or stale package lists (fresh containers ship none): fetch them once.
      _run(prefix + ["update", "-qq"], 300)
      out = _run(install, 600)
  except (OSError, subprocess.SubprocessError) as e:
    return f"`{' '.join(install)}` failed: {e}"
  if out.returncode != 0:
    lines = (out.stderr.strip() or out.stdout.strip()).splitlines()
    return f"`{' '.join(install)}` failed: {lines[-1] if lines else out.returncode}"
  return ""


def online(url: str | None, timeout: float = 3.0) -> bool:
  """Whether the host of `url` accepts a TCP connection within `timeout` seconds.

  Runs in a thread, because name resolution ignores socket timeouts.
  """
  if not url:
    return False
  parsed = urllib.parse.urlparse(url if "//" in url else "https://" + url)
  port = parsed.port or (80 if parsed.scheme == "http" else 443)
  result = []

  def probe():
    try:
      socket.create_connection((parsed.hostname, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout + 0.5)
  return bool(result)


# ------------------------------------------------------------------------------------------
# Builders: tfds's own, with plain-Python readers.
# ------------------------------------------------------------------------------------------


def _builder_classes():
  """Defined lazily: importing tfds's dataset modules costs time `import jaxkd` need not pay."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as inb  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top

  class FashionMnist(tfds.image_classification.FashionMNIST, skip_registration=True):
    """tfds `fashion_mnist` 3.0.1 from IDX files (`idx_files`), or downloaded."""
    name = "fashion_mnist"
    idx_files: dict[str, str] | None = None

    def _split_generators(self, dl_manager):
      files = self.idx_files
      if files is None:  # tfds downloads the .gz files (from `URL`); no extraction needed
        files = dl_manager.download({k: self.URL + v + ".gz" for k, v in raw.IDX_FILES.items()})
        files = {k: os.fspath(v) for k, v in files.items()}
      return {"train": self._examples(files["train_images"], files["train_labels"]),
              "test": self._examples(files["test_images"], files["test_labels"])}

    def _examples(self, images_path, labels_path):
      images, labels = raw.read_idx(images_path), raw.read_idx(labels_path)
      if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise datasets.BadDataError(f"{images_path} / {labels_path}: images {images.shape} "
                                    f"and labels {labels.shape} are not a 28x28 dataset.")
      for i in range(len(labels)):
        # PIL images: tfds encodes them to PNG with PIL (numpy images need TensorFlow).
        yield i, {"image": PIL.Image.fromarray(images[i]), "label": int(labels[i])}

  class Cifar100(tfds.image_classification.Cifar100, skip_registration=True):
    """tfds `cifar100` 3.0.2 from the python or binary archive (`archive`), or downloaded."""
    name = "cifar100"
    archive: str | None = None

    def _split_generators(self, dl_manager):
      path = self.archive or os.fspath(dl_manager.download(self._cifar_info.url))
      data = raw.read_cifar100(path)
      self.info.features["label"].names = data["fine_names"]
      self.info.features["coarse_label"].names = data["coarse_names"]
      return {"train": self._examples("train_", *data["train"]),
              "test": self._examples("test_", *data["test"])}

    def _examples(self, prefix, images, fine, coarse):
      for i in range(len(fine)):
        # Same keys and ids as tfds's generator: the index in the archive's record order.
        yield i, {"id": f"{prefix}{i:05d}", "image": PIL.Image.fromarray(images[i]),
                  "label": int(fine[i]), "coarse_label": int(coarse[i])}

  class Imagenet2012(inb.Builder, skip_registration=True):
    """tfds `imagenet2012` 5.1.0 from the ILSVRC2012 tars in `manual_dir`."""
    name = "imagenet2012"
    # README / citations / checksums come from tfds's own imagenet2012 folder.
    pkg_dir_path = inb.Builder._get_pkg_dir_path()  # pylint: disable=protected-access

    def _split_generators(self, dl_manager):
      manual = os.fspath(dl_manager.manual_dir)
      splits = {}
      for split, fname in (("train", "ILSVRC2012_img_train.tar"),
                           ("validation", "ILSVRC2012_img_val.tar"),
                           ("test", "ILSVRC2012_img_test.tar")):
        path = os.path.join(manual, fname)
        if not os.path.exists(path):
          continue
        kwargs = {"archive": raw.iter_tar(path)}
        if split == "validation":
          kwargs["validation_labels"] = _validation_labels(path)
        if split == "test":
          kwargs["labels_exist"] = False
        splits[split] = self._generate_examples(**kwargs)
      if not splits:
        raise datasets.DatasetNotFoundError(
            f"No ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar or ILSVRC2012_img_test.tar "
            f"in {manual}.")
      return splits

    def _fix_image(self, image_fname, image):
      # tfds converts the 22 CMYK JPEGs and the one PNG with TensorFlow; PIL does the same.
      if image_fname in inb.CMYK_IMAGES or image_fname in inb.PNG_IMAGES:
        buf = io.BytesIO()
        PIL.Image.open(image).convert("RGB").save(buf, format="JPEG", quality=100)
        buf.seek(0)
        return buf
      return image

  def _validation_labels(val_path):
    # tfds's labels file lists the validation labels in the sorted order of file names.
    path = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)  # pylint: disable=protected-access
    with open(os.fspath(path)) as f:
      labels = f.read().strip().splitlines()
    with tarfile.open(val_path, "r:") as tar:
      names = sorted(os.path.basename(n) for n in tar.getnames())
    return dict(zip(names, labels))

  return {"fashion_mnist": FashionMnist, "cifar100": Cifar100, "imagenet2012": Imagenet2012}


# ------------------------------------------------------------------------------------------
# prepare / ensure_prepared.
# ------------------------------------------------------------------------------------------


def is_prepared(name: str, data_dir: str | None = None) -> bool:
  """Whether `name` is prepared in `data_dir` (any file format)."""
  data_dir = datasets.resolve_data_dir(data_dir)
  return datasets._builder(datasets.spec(name).name, data_dir).is_prepared()  # pylint: disable=protected-access


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            download: bool = True) -> str:
  """Prepares tfds dataset `name` as array_record in `data_dir`; returns its folder.

  Args:
    name: "fashion_mnist", "cifar100" or "imagenet2012".
    data_dir: tfds data dir (default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    manual_dir: a folder with files the user has: Fashion-MNIST's four IDX files (.gz or
      not); `cifar-100-python.tar.gz` or `cifar-100-binary.tar.gz` (or their extracted
      folders); `ILSVRC2012_img_train.tar` and/or `ILSVRC2012_img_val.tar`.
    download: allow tfds to download when no local files are found (after a probe of the
      download host; never for ImageNet, which tfds cannot download).

  Returns:
    The dataset's version folder, `<data_dir>/<name>/<version>`.

  Raises:
    DatasetNotFoundError: no local files and no download possible; within seconds.
    BadDataError: local files that are truncated or not what they should be.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds_spec = datasets.spec(name)
  data_dir = datasets.resolve_data_dir(data_dir)
  if is_prepared(name, data_dir):
    return datasets._builder(name, data_dir).data_dir  # pylint: disable=protected-access
  cls = _builder_classes()[name]
  builder = cls(data_dir=data_dir, file_format="array_record")
  looked = []
  local = None
  if name == "fashion_mnist":
    if manual_dir:
      local = raw.find_idx_files(manual_dir)
      looked.append(manual_dir)
    else:
      local = raw.debian_fashion_mnist_files()
      looked.append("Debian package dataset-fashion-mnist (dpkg -L)")
    builder.idx_files = local
    builder.URL = ds_spec.download_url  # tfds's own URL; the spec is the one place it is set
  elif name == "cifar100":
    if manual_dir:
      local = raw.find_cifar100_archive(manual_dir)
      looked.append(manual_dir)
    builder.archive = local
  elif name == "imagenet2012":
    if manual_dir:
      looked.append(manual_dir)
      if any(os.path.exists(os.path.join(manual_dir, f)) for f in (
          "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_img_test.tar")):
        local = manual_dir
  if local is None:
    where = f"in {', '.join(looked)}" if looked else "(no --manual_dir given)"
    reason = f"No {ds_spec.manual_files} found {where}"
    if not ds_spec.download_url:
      reason += "; tfds cannot download it: it needs the files you obtained yourself"
    elif not download:
      reason += "; downloading is off"
    elif not online(ds_spec.download_url):
      host = urllib.parse.urlparse(ds_spec.download_url).hostname
      reason += f", and {host} cannot be reached to download it"
    else:
      reason = ""
    if reason:
      raise datasets.DatasetNotFoundError(
          datasets.not_prepared_message(name, data_dir, reason + "."))
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  try:
    builder.download_and_prepare(download_config=config)
  finally:
    # tfds leaves an empty downloads/ folder behind even when nothing was downloaded.
    downloads = os.path.join(data_dir, "downloads")
    if os.path.isdir(downloads) and not any(f for _, _, f in os.walk(downloads)):
      shutil.rmtree(downloads, ignore_errors=True)
  return builder.data_dir


def ensure_prepared(name: str, data_dir: str | None = None) -> str:
  """Returns the data dir once `name` can be read from it; raises within seconds when it
  cannot be had.

  Prepared (or mocked by `tfds.testing.mock_data`): returns at once. Fashion-MNIST that is
  not (docs/ENVIRONMENT.md#getting-the-datasets), in this order:
    1. built from the files of Debian's `dataset-fashion-mnist` (90-115 s on a busy 2-core
       CPU);
    2. without them, that package is installed first with
       `apt-get install -y -qq dataset-fashion-mnist` (after `apt-get update` if apt does
       not know the package) when apt-get is there and we are root or `sudo -n` works,
       saying so on stderr; `JAXKD_NO_APT=1` turns this off;
    3. else downloaded through tfds's download manager when the download host answers;
    4. else `DatasetNotFoundError` naming the commands that fix it.
  Other datasets: `DatasetNotFoundError` with the `prepare` command; nothing is installed
  or downloaded for them here.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds_spec = datasets.spec(name)
  data_dir = datasets.resolve_data_dir(data_dir)
  if is_prepared(name, data_dir):
    datasets.open_source(name, ds_spec.train_split, data_dir)  # checks the file format
    return data_dir
  try:  # mock_data serves any name without files on disk
    tfds.data_source(name, split=ds_spec.train_split, data_dir=data_dir, download=False)
    return data_dir
  except Exception:  # pylint: disable=broad-except
    pass
  if name != "fashion_mnist":
    raise datasets.DatasetNotFoundError(datasets.not_prepared_message(name, data_dir))
  reasons = []
  if raw.debian_fashion_mnist_files() is None:
    why = install_debian_fashion_mnist()
    if why:
      reasons.append(f"Debian's {DEBIAN_PACKAGE} is not installed, and jaxkd did not "
                     f"install it: {why}.")
  if raw.debian_fashion_mnist_files() is not None:
    prepare(name, data_dir, download=False)
    return data_dir
  host = urllib.parse.urlparse(ds_spec.download_url).hostname
  if online(ds_spec.download_url):
    print(f"jaxkd: Fashion-MNIST is not prepared; downloading it (30 MB) from {host} "
          "with tfds", file=sys.stderr, flush=True)
    prepare(name, data_dir, download=True)
    return data_dir
  reasons.append(f"{host} cannot be reached to download it.")
  raise datasets.DatasetNotFoundError(
      datasets.not_prepared_message(name, data_dir, " ".join(reasons)))
