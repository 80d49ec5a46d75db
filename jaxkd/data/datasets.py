"""Dataset specs, reading prepared tfds datasets, and whole-split arrays.

Every dataset is a tfds dataset written as array_record (see `builders.py` for how it gets
there) and read through `tfds.data_source`, which needs neither TensorFlow nor a network.
This module knows what each dataset is (`DatasetSpec`), opens its splits with errors that
say what is wrong and what to run (`open_source`), and reads small splits into uint8 arrays
(`jaxkd/data/arrays.py`'s `load_arrays`) for the device-resident path.
"""

import dataclasses
import os
import re
import shutil
from typing import Any, Sequence

import numpy as np

from jaxkd.data import long_tail as long_tail_lib


class DatasetNotFoundError(ValueError):
  """A dataset is neither prepared in the data dir nor obtainable right now."""


class BadDataError(ValueError):
  """A record file, a field or a value of a prepared dataset is not what it must be."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the trainer and the pipelines need to know about one dataset.

  Attributes:
    name: the registered tfds name (also the folder under the data dir).
    num_classes: number of classes of `label`.
    image_shape: (H, W, C) of the model input (after crop / resize).
    mean, std: per-channel normalisation, in [0, 1] pixel units.
    train_split, eval_split: tfds split names.
    fits_on_device: whether the uint8 train split is small enough for the device-resident
      path (it is then the default).
    id_key: the tfds feature holding a stable per-example id, or None (Fashion-MNIST has
      none; its `index`, the position in the data source, is the id).
    train_augment: "pad_crop_flip" (CIFAR, Fashion-MNIST; host and device) or
      "random_resized_crop" (ImageNet; host only).
    pad: zero padding of the random crop, in pixels (0: no crop).
    flip: random horizontal flip.
    eval_resize: shorter side before the eval center crop ("random_resized_crop" only).
    num_train, num_eval: sizes of the full splits, for documentation and sanity checks.
    download_url: where tfds downloads the raw files from (its host is probed before any
      download), or None when the dataset can only be prepared from files the user has.
    manual_files: what `--manual_dir` should hold, for error messages.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = "train"
  eval_split: str = "test"
  fits_on_device: bool = False
  id_key: str | None = None
  train_augment: str = "pad_crop_flip"
  pad: int = 0
  flip: bool = False
  eval_resize: int | None = None
  num_train: int = 0
  num_eval: int = 0
  download_url: str | None = None
  manual_files: str = ""


# Normalisation constants: CIFAR-100, mdistiller's; ImageNet, torchvision's; Fashion-MNIST,
# the mean and std of the 60k training pixels.
SPECS = {
    "cifar100": DatasetSpec(
        name="cifar100", num_classes=100, image_shape=(32, 32, 3),
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
        fits_on_device=True, id_key="id", pad=4, flip=True,
        num_train=50_000, num_eval=10_000, download_url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        manual_files="cifar-100-python.tar.gz or cifar-100-binary.tar.gz"),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
        mean=(0.2860,), std=(0.3530,), fits_on_device=True, pad=0, flip=False,
        num_train=60_000, num_eval=10_000,
        download_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        manual_files=("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                      "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz")),
    "imagenet2012": DatasetSpec(
        name="imagenet2012", num_classes=1000, image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        eval_split="validation", fits_on_device=False, id_key="file_name",
        train_augment="random_resized_crop", flip=True, eval_resize=256,
        num_train=1_281_167, num_eval=50_000, download_url=None,
        manual_files="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"),
}


def spec(name: str, **overrides: Any) -> DatasetSpec:
  """Returns the spec of dataset `name`, with fields replaced by `overrides`.

  E.g. `spec("fashion_mnist", pad=2)` turns on a 2-pixel padding crop.
  """
  if isinstance(name, DatasetSpec):
    return dataclasses.replace(name, **overrides)
  if name not in SPECS:
    raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(sorted(SPECS))}.")
  return dataclasses.replace(SPECS[name], **overrides)


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (tfds's own default)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir or default_data_dir())))


def prepare_command(name: str, data_dir: str, manual_dir: str | None = None) -> str:
  """The exact command line that prepares `name` into `data_dir`."""
  cmd = f"python -m jaxkd.data.prepare {name} --data_dir {data_dir}"
  if manual_dir is not None:
    cmd += f" --manual_dir {manual_dir}"
  elif SPECS[name].manual_files:
    cmd += " [--manual_dir DIR]"
  return cmd


def fix_commands(name: str, data_dir: str) -> list[str]:
  """The command lines, one of which prepares `name` into `data_dir` on this machine."""
  if name != "fashion_mnist":
    return [prepare_command(name, data_dir)]
  cmds = []
  if shutil.which("apt-get"):  # Debian/Ubuntu
    sudo = "" if os.geteuid() == 0 else "sudo "
    cmds.append(f"{sudo}apt-get install -y dataset-fashion-mnist   "
                "# then jaxkd prepares it on first use")
  cmds.append(prepare_command(name, data_dir, manual_dir="DIR"))
  return cmds


def not_prepared_message(name: str, data_dir: str, reason: str = "") -> str:
  s = SPECS[name]
  lines = [f"Dataset {name!r} is not prepared in {data_dir} (looked for "
           f"{os.path.join(data_dir, name, '<version>', 'dataset_info.json')})."]
  if reason:
    lines.append(reason)
  cmds = fix_commands(name, data_dir)
  lines.append(f"Prepare it with{' one of' if len(cmds) > 1 else ''}:\n  " + "\n  ".join(cmds))
  if s.manual_files:
    where = f" (from {s.download_url})" if s.download_url else ""
    lines.append(f"--manual_dir DIR: a folder with the files you have, {s.manual_files}{where}.")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Reading a split.
# ------------------------------------------------------------------------------------------


def _split_names(split: str) -> list[str]:
  """Base split names of a tfds split expression, e.g. 'train[:10%]+test' -> [train, test]."""
  return re.findall(r"(?:^|\+)\s*([A-Za-z_][\w-]*)", split)


class Source:
  """A prepared split, read by record key, with errors that name the file or field.

  Wraps `tfds.data_source(...)` (or, in tests, any sequence of example dicts). Picklable,
  so grain's worker processes can read from it.
  """

  def __init__(self, source: Sequence[dict], *, name: str, split: str,
               files: Sequence[str] = (), remedy: str = ""):
    self._source = source
    self.name = name
    self.split = split
    self.files = list(files)
    self.remedy = remedy or "delete the dataset folder and prepare it again"

  def __len__(self) -> int:
    return len(self._source)

  def read(self, keys: Sequence[int]) -> list[dict]:
    """Returns the examples at `keys` (record keys, positions in the data source)."""
    keys = [int(k) for k in keys]
    try:
      try:
        return list(self._source.__getitems__(keys))
      except (AttributeError, TypeError):
        # Plain sequences have no batched read, and tfds.testing.mock_data's data source
        # breaks on it; one example at a time is the same data, only slower.
        return [self._source[k] for k in keys]
    except BadDataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise BadDataError(self._describe_failure(keys, e)) from e

  def _describe_failure(self, keys: Sequence[int], error: Exception) -> str:
    """Finds which record file fails to read, so that the message can name it."""
    where = f"{self.name}/{self.split}"
    inner = getattr(self._source, "data_source", None)
    per_reader = getattr(inner, "_split_keys_per_reader", None)
    bad_file = None
    if callable(per_reader) and self.files:
      for reader_idx, positions in per_reader(keys).items():
        try:
          for _, i in positions:
            inner[keys[i]]
        except Exception:  # pylint: disable=broad-except
          bad_file = inner._read_instructions[reader_idx].filename  # pylint: disable=protected-access
          break
    files = bad_file or ", ".join(self.files) or "(unknown files)"
    return (f"Could not read examples {keys[:8]}{'...' if len(keys) > 8 else ''} of {where} "
            f"from record file {files}: {type(error).__name__}: {error}. The file is "
            f"corrupted or truncated; {self.remedy}.")


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(name, data_dir=data_dir)


def open_source(name: str, split: str, data_dir: str | None = None, *,
                raw_images: bool = False) -> Source:
  """Opens split `split` of prepared dataset `name` for random access.

  Args:
    name: a dataset name of `SPECS`.
    split: a tfds split expression ('train', 'test', 'train[:10%]', ...).
    data_dir: the tfds data dir (default: `default_data_dir()`).
    raw_images: return the encoded image bytes instead of decoded arrays (the ImageNet
      pipeline decodes at reduced size itself). Where tfds cannot hand out bytes (under
      `tfds.testing.mock_data`, which would need TensorFlow to encode its random images),
      images come decoded; consumers accept both.

  Raises:
    DatasetNotFoundError: the dataset is not prepared (the message gives the command).
    ValueError: `split` names a split the dataset does not have (the message lists them).
    BadDataError: a record file is missing, corrupted or truncated.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec(name)
  data_dir = resolve_data_dir(data_dir)
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if "array_record" not in fmt:
      raise DatasetNotFoundError(
          f"Dataset {name!r} in {builder.data_dir} is stored as {fmt}; jaxkd reads "
          "array_record (tfds.data_source, no TensorFlow). Prepare it into another data dir:"
          f"\n  {prepare_command(name, '<new data dir>')}")
    available = sorted(builder.info.splits)
    unknown = [s for s in _split_names(split) if s not in available]
    if unknown or not _split_names(split):
      raise ValueError(f"Unknown split {split!r} for dataset {name!r} in {builder.data_dir}; "
                       f"available splits: {', '.join(available)}.")
  decoders = None
  if raw_images:
    decoders = {"image": tfds.decode.SkipDecoding()}
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                           decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    if builder.is_prepared():
      raise
    # Not on disk and not mocked: tfds's own message here is misleading (it speaks of
    # file formats), so say what is missing and how to get it.
    raise DatasetNotFoundError(not_prepared_message(name, data_dir)) from e
  if raw_images and not type(getattr(src, "data_source", None)).__module__.startswith(
      "array_record"):
    # Only real array_record files hold encoded bytes; mock_data's source would need
    # TensorFlow to encode its random images.
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  files = []
  paths = getattr(getattr(src, "data_source", None), "_paths", None)
  if isinstance(paths, (list, tuple)):
    files = [os.fspath(p) for p in paths]
    for f in files:
      if not os.path.exists(f):
        raise BadDataError(f"Record file {f} of {name}/{split} is missing; delete "
                           f"{builder.data_dir} and prepare the dataset again:\n  "
                           f"{prepare_command(name, data_dir)}")
  remedy = (f"delete {builder.data_dir} and prepare the dataset again:\n  "
            f"{prepare_command(name, data_dir)}")
  return Source(src, name=name, split=split, files=files, remedy=remedy)


# ------------------------------------------------------------------------------------------
# Checks and whole-split arrays.
# ------------------------------------------------------------------------------------------


def as_image(value: Any, where: str) -> np.ndarray:
  """A decoded example image as a uint8 HWC array (grey images get a channel axis)."""
  img = np.asarray(value)
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.dtype != np.uint8:
    raise BadDataError(f"Field 'image' of {where} has shape {img.shape} and dtype "
                       f"{img.dtype}; expected a uint8 (H, W, C) image.")
  return img


def check_image_shape(img: np.ndarray, expected: Sequence[int], where: str) -> None:
  if tuple(img.shape) != tuple(expected):
    raise BadDataError(f"Field 'image' of {where} has shape {tuple(img.shape)}; expected "
                       f"{tuple(expected)}.")


def check_labels(labels: np.ndarray, num_classes: int, where: str,
                 index: np.ndarray | None = None) -> None:
  """Raises `BadDataError` naming the first label outside [0, num_classes)."""
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    at = int(index[i]) if index is not None else i
    raise BadDataError(f"Field 'label' of {where} example {at} is {int(labels[i])}, outside "
                       f"[0, {num_classes}) ({bad.size} such labels).")


def read_labels(source: Source, num_classes: int, chunk: int = 4096) -> np.ndarray:
  """int32 labels of every example of `source`, in record-key order."""
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), chunk):
    keys = range(start, min(start + chunk, len(source)))
    labels[start:start + len(keys)] = [int(ex["label"]) for ex in source.read(keys)]
  check_labels(labels, num_classes, f"{source.name}/{source.split}")
  return labels


def select_examples(labels: np.ndarray, split: str, ds_spec: DatasetSpec, *,
                    long_tail_factor: float | None, seed: int) -> np.ndarray:
  """Record keys used from a split: all of them, or the long-tailed subset of the train split.

  The long-tailed subset applies to `ds_spec.train_split` only; other splits stay whole.
  """
  if long_tail_factor is None or split != ds_spec.train_split:
    return np.arange(len(labels), dtype=np.int32)
  return long_tail_lib.long_tail_indices(labels, ds_spec.num_classes, long_tail_factor,
                                         seed=seed)


def _as_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode()
  return str(value.item() if isinstance(value, np.ndarray) else value)
