"""Whole (small) splits as NumPy arrays, for the device-resident path and the diagnostics.

    arrays = load_arrays("fashion_mnist", "train", data_dir)   # {"image", "label", "index"}

The last two splits decoded are kept, keyed by their files (names, sizes, modification
times), so a run that reads its train split again (the class-mass pass of
`jaxkd/train/diagnose.py`), or the next run of a suite, does not decode it again.
"""

from __future__ import annotations

import os

import numpy as np

from jaxkd.data import datasets

__all__ = ["load_arrays"]


def load_arrays(name: str, split: str, data_dir: str | None = None, *,
                long_tail_factor: float | None = None, seed: int = 0,
                with_ids: bool = False, source: datasets.Source | None = None,
                chunk: int = 2048) -> dict[str, np.ndarray]:
  """Reads a whole (small) split into arrays, e.g. for the device-resident path.

  Args:
    name: dataset name (`SPECS`).
    split: tfds split.
    data_dir: tfds data dir (default `default_data_dir()`).
    long_tail_factor: imbalance factor rho of the exponential long-tail profile, applied to
      the train split only (`long_tail.long_tail_indices`); None keeps the whole split.
    seed: which examples the long-tailed subset keeps.
    with_ids: also return `id`, the tfds id strings (for datasets that have one).
    source: read from this `Source` instead of opening the split (tests).
    chunk: examples read per call.

  Returns:
    {'image': uint8 [N, H, W, C], 'label': int32 [N], 'index': int32 [N]} (+ 'id': str [N]),
    where `index` is the example's position (record key) in the tfds data source of the
    whole split: stable across runs, seeds and long-tail factors, so per-example tables
    (self-distillation) can be keyed by it; size them `len(datasets.open_source(...))`.

  Raises:
    BadDataError: an image of another shape than `spec(name).image_shape`, a label out of
      range, or an unreadable record file, each named.
  """
  ds_spec = datasets.spec(name)
  key = None if source is not None else _files_key(name, split, data_dir, with_ids)
  if key is not None and key in _DECODED:
    images, labels, ids = _DECODED[key]
  else:
    images, labels, ids = _decode(ds_spec, split, source or datasets.open_source(name, split, data_dir),
                                  with_ids, chunk)
    if key is not None:
      while len(_DECODED) >= _KEEP:  # the oldest goes first (dicts keep insertion order)
        del _DECODED[next(iter(_DECODED))]
      _DECODED[key] = (images, labels, ids)
  keep = datasets.select_examples(labels, split, ds_spec, long_tail_factor=long_tail_factor,
                         seed=seed)
  if len(keep) == len(labels):  # the whole split: no copy of the images
    out = {"image": images, "label": labels, "index": keep}
  else:
    out = {"image": images[keep], "label": labels[keep], "index": keep}
  if ids is not None:
    out["id"] = np.asarray(ids, dtype=object)[keep]
  return out


# The last splits decoded by `load_arrays`, keyed by their files: a run reads its train split
# again for the diagnostics' class-mass pass, and decoding 60,000 PNGs takes seconds. The
# arrays are read-only, so no consumer can change what the next one gets.
_DECODED: dict[tuple, tuple] = {}
_KEEP = 2  # a run's train and eval splits; only datasets small enough for the devices come here


def _files_key(name: str, split: str, data_dir: str | None, with_ids: bool) -> tuple | None:
  """(name, split, with_ids, every file of the prepared dataset with size and mtime)."""
  root = os.path.join(datasets.resolve_data_dir(data_dir), name)
  if not os.path.isdir(root):
    return None
  files = []
  for folder, _, names in os.walk(root):
    for n in names:
      st = os.stat(os.path.join(folder, n))
      files.append((os.path.join(folder, n), st.st_size, st.st_mtime_ns))
  return (name, split, with_ids, tuple(sorted(files)))


def _decode(ds_spec: datasets.DatasetSpec, split: str, src: datasets.Source, with_ids: bool, chunk: int):
  """(images uint8 [N, H, W, C], labels int32 [N], ids or None) of a whole split, checked."""
  where = f"{ds_spec.name}/{split}"
  n = len(src)
  images = np.empty((n, *ds_spec.image_shape), np.uint8)
  labels = np.empty(n, np.int32)
  ids = [] if with_ids else None
  for start in range(0, n, chunk):
    keys = range(start, min(start + chunk, n))
    for k, ex in zip(keys, src.read(keys)):
      img = datasets.as_image(ex["image"], f"{where} example {k}")
      datasets.check_image_shape(img, ds_spec.image_shape, f"{where} example {k}")
      images[k] = img
      labels[k] = int(ex["label"])
      if ids is not None:
        key = ds_spec.id_key
        ids.append(datasets._as_str(ex[key]) if key and key in ex else str(k))
  datasets.check_labels(labels, ds_spec.num_classes, where)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels, ids
