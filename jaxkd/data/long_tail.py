"""Long-tailed subsets with the exponential profile of CIFAR-100-LT.

Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"
(NeurIPS 2019), Sec. 4: class c of C keeps n_c = floor(n_max * rho^(-c / (C - 1))) examples,
so class 0 keeps n_max and class C-1 keeps n_max / rho (CIFAR-100-LT, rho = 100: 500 ... 5,
10,847 images in all). Only the train split is subsampled; the test split stays balanced.
"""

import numpy as np


def long_tail_counts(n_max: int, num_classes: int, factor: float) -> np.ndarray:
  """Per-class counts n_c = floor(n_max * factor^(-c / (C - 1))), c = 0..C-1.

  Args:
    n_max: count of the head class (class 0).
    num_classes: C >= 2.
    factor: imbalance factor rho = n_0 / n_{C-1} >= 1.

  Returns:
    int64 [C], non-increasing, counts[0] == n_max.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
  if not factor >= 1:
    raise ValueError(f"long_tail_factor must be >= 1, got {factor}.")
  c = np.arange(num_classes, dtype=np.float64)
  # The tiny epsilon keeps exact powers (e.g. 500 * 100^-1 = 5) from flooring to one less
  # through float rounding.
  return np.floor(n_max * factor ** (-c / (num_classes - 1)) + 1e-9).astype(np.int64)


def long_tail_indices(labels: np.ndarray, num_classes: int, factor: float, *,
                      seed: int = 0) -> np.ndarray:
  """Indices of a long-tailed subset of a dataset with labels `labels`.

  n_max is the largest count every class can supply (the smallest class count; 500 on
  CIFAR-100), so every class gets exactly `long_tail_counts(n_max, C, factor)[c]` examples,
  drawn without replacement, uniformly within the class, from a generator seeded by `seed`.

  Args:
    labels: int [N] in [0, num_classes).
    num_classes: C.
    factor: imbalance factor rho.
    seed: which examples are kept; the same seed always gives the same subset.

  Returns:
    int32 [M], sorted ascending (so the subset keeps the data source's order).
  """
  labels = np.asarray(labels)
  per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
  n_max = min(len(idx) for idx in per_class)
  if n_max == 0:
    empty = [c for c, idx in enumerate(per_class) if len(idx) == 0][:10]
    raise ValueError(f"Classes {empty} have no examples; a long-tailed subset needs every "
                     "class.")
  counts = long_tail_counts(n_max, num_classes, factor)
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(idx)[:n] for idx, n in zip(per_class, counts)]
  return np.sort(np.concatenate(keep)).astype(np.int32)
