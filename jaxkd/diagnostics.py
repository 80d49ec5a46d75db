"""Diagnostics of a run in plain NumPy (float64): calibration, the teacher's class mass, the
recall gain by teacher-mass rank, and the sample weights a method gave.

    probs = softmax(logits)                                   # [N, C]
    calibration(logits, labels)      # {"nll", "ece", "aurc", "e_aurc", "bins": {...}}
    class_mass(teacher_logits, (1, 2, 4, 8))                  # [T, C]
    recall_gain_by_group(recall_kd, recall_ce, mass)          # IPWD's Table 1 row
    weight_stats(weights, labels, num_classes)                # mean, std, percentiles, ...

Nothing here imports jaxkd's trainer (or JAX): the functions take host arrays, so the
trainer, `jaxkd.report` and a user's own notebook compute the same numbers. Each function
states its formula and paper. The file a run writes is `diagnostics.json`, whose schema
`DIAGNOSTICS_FORMAT` names and `jaxkd/report.py` documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DIAGNOSTICS_FORMAT", "ECE_BINS", "TEMPERATURES", "PERCENTILES", "softmax", "nll",
           "confidence_and_correct", "reliability_bins", "ece", "risk_coverage", "aurc",
           "e_aurc", "calibration", "calibration_from", "class_mass", "class_mass_record", "mass_order",
           "per_class_recall", "rank_groups", "grouped_recall", "recall_gain_by_group",
           "weight_stats", "epoch_weight_record", "spearman"]

DIAGNOSTICS_FORMAT = "jaxkd-diagnostics-1"
ECE_BINS = 15                 # Guo et al. 2017 (and PS-KD, IPWD) report ECE over 15 bins
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)  # IPWD Fig. 1's curves
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def _logits(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or z.shape[1] < 2:
    raise ValueError(f"logits must be [N, C] with C >= 2 classes, got shape {z.shape}.")
  if not np.all(np.isfinite(z)):
    raise ValueError("logits hold NaN or inf; diagnostics need finite logits.")
  return z


def _labels(labels, n: int, num_classes: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape ({n},), got {y.dtype} {y.shape}.")
  if n and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}].")
  return y


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
  """softmax(z / τ) over the last axis, float64, shifted by the row maximum. [N, C] → [N, C]."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  u = _logits(logits) / float(temperature)
  e = np.exp(u - u.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def nll(logits, labels) -> float:
  """Mean negative log-likelihood, (1/N) Σ_i [logsumexp(z_i) − z_{i,y_i}] (nats). [N, C], [N]."""
  z = _logits(logits)
  y = _labels(labels, len(z), z.shape[1])
  m = z.max(axis=1)
  lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
  return float(np.mean(lse - z[np.arange(len(z)), y]))


def confidence_and_correct(logits, labels) -> tuple[np.ndarray, np.ndarray]:
  """Maximum softmax probability [N] and top-1 correctness [N] (bool; argmax ties go to the
  lower class, as `lax.top_k` and the trainer's eval step break them)."""
  p = softmax(logits)
  y = _labels(labels, len(p), p.shape[1])
  return p.max(axis=1), np.argmax(p, axis=1) == y


def _conf(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
  c = np.asarray(confidence, np.float64)
  k = np.asarray(correct)
  if c.ndim != 1 or k.shape != c.shape:
    raise ValueError(f"confidence and correct must be [N] of one length, got {c.shape} and "
                     f"{k.shape}.")
  if c.size and (not np.all(np.isfinite(c)) or c.min() < 0 or c.max() > 1):
    raise ValueError("confidence must be finite probabilities in [0, 1].")
  return c, k.astype(bool)


def reliability_bins(confidence, correct, num_bins: int = ECE_BINS) -> dict[str, list]:
  """The table a reliability diagram draws: `num_bins` equal-width confidence bins.

  Bin b (0-based) holds the confidences in (e_b, e_{b+1}], e = numpy.linspace(0, 1, M + 1),
  M = num_bins, and bin 0 also holds confidence 0 (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

  Args:
    confidence: [N] the predicted class's probability.  correct: [N] bool.

  Returns:
    {"lower", "upper": [M] bin edges, "count": [M] ints, "accuracy", "confidence": [M] means
    over the bin (None for an empty bin)}.
  """
  c, k = _conf(confidence, correct)
  if int(num_bins) != num_bins or num_bins < 1:
    raise ValueError(f"num_bins must be a positive integer, got {num_bins}.")
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Compared with the edges themselves, not as ceil(c·M) − 1: 0.2 · 15 is 3.0000000000000004
  # in float64, which would move an edge value one bin up.
  b = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, num_bins - 1)
  count = np.bincount(b, minlength=num_bins)
  hits = np.bincount(b, weights=k.astype(np.float64), minlength=num_bins)
  conf = np.bincount(b, weights=c, minlength=num_bins)
  mean = lambda s: [None if n == 0 else float(v / n) for v, n in zip(s, count)]
  return {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(),
          "count": count.astype(int).tolist(), "accuracy": mean(hits), "confidence": mean(conf)}


def ece(confidence, correct, num_bins: int = ECE_BINS) -> float:
  """Expected calibration error, Σ_b (n_b / N) · |acc_b − conf_b| over `reliability_bins`
  (a fraction in [0, 1]; Guo et al. 2017). [N], [N] → scalar."""
  bins = reliability_bins(confidence, correct, num_bins)
  n = sum(bins["count"])
  if n == 0:
    raise ValueError("ece needs at least one example.")
  return float(sum(cnt * abs(a - c) for cnt, a, c in
                   zip(bins["count"], bins["accuracy"], bins["confidence"]) if cnt) / n)


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
  """The risk–coverage curve of selective classification (Geifman & El-Yaniv 2017).

  Examples are accepted in order of decreasing confidence; at coverage k/N (k = 1..N) the
  risk is the error rate of the k accepted examples. Ties: examples of equal confidence
  are accepted as a block in unspecified order, so the risk inside a block is its
  expectation over the block's orderings, (E_before + (k − k_before) · E_block / n_block) / k,
  where E counts errors. The curve then does not depend on how the input is ordered.

  Returns:
    (coverage [N] = k/N, risk [N]).
  """
  c, k = _conf(confidence, correct)
  n = c.size
  if n == 0:
    raise ValueError("risk_coverage needs at least one example.")
  order = np.argsort(-c, kind="stable")
  c, err = c[order], (~k[order]).astype(np.float64)
  # Block boundaries of equal confidences, and each position's block.
  starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
  ends = np.r_[starts[1:], n]
  block = np.repeat(np.arange(len(starts)), ends - starts)
  cum = np.r_[0.0, np.cumsum(err)]
  before, in_block = cum[starts][block], (cum[ends] - cum[starts])[block]
  size, kk = (ends - starts)[block], np.arange(1, n + 1)
  risk = (before + (kk - starts[block]) * in_block / size) / kk
  return kk / n, risk


def aurc(confidence, correct) -> float:
  """Area under the risk–coverage curve, (1/N) Σ_{k=1..N} risk(k/N) (`risk_coverage`;
  Geifman et al., "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR
  2019), as a fraction in [0, 1]; lower is better. [N], [N] → scalar."""
  return float(np.mean(risk_coverage(confidence, correct)[1]))


def e_aurc(confidence, correct) -> float:
  """Excess AURC: AURC minus that of the ideal ranking (all correct examples first), whose
  risk at coverage k is max(0, k − (N − E)) / k for E errors. [N], [N] → scalar."""
  c, k = _conf(confidence, correct)
  n, errors = c.size, int(np.sum(~k))
  kk = np.arange(1, n + 1)
  return aurc(c, k) - float(np.mean(np.maximum(0, kk - (n - errors)) / kk))


def calibration(logits, labels, num_bins: int = ECE_BINS) -> dict[str, Any]:
  """NLL, ECE, AURC and E-AURC of a classifier's logits [N, C] on labels [N], and the
  reliability bins: the `calibration` entry of diagnostics.json."""
  conf, correct = confidence_and_correct(logits, labels)
  return calibration_from(conf, correct, nll(logits, labels), num_bins)


def calibration_from(confidence, correct, nll_value: float, num_bins: int = ECE_BINS
                     ) -> dict[str, Any]:
  """`calibration` from per-example confidences [N] and correctness [N] and the mean NLL
  (the trainer's eval "ce"), so that no [N, C] logits need to reach the host."""
  c, k = _conf(confidence, correct)
  if c.size == 0:
    raise ValueError("calibration needs at least one example.")
  return {"num_examples": int(c.size), "top1": float(100.0 * k.mean()),
          "nll": float(nll_value), "ece": ece(c, k, num_bins), "aurc": aurc(c, k),
          "e_aurc": e_aurc(c, k), "num_bins": int(num_bins),
          "bins": reliability_bins(c, k, num_bins)}


def class_mass(teacher_logits, temperatures: Sequence[float] = TEMPERATURES) -> np.ndarray:
  """The teacher's probability mass per class, M_c(τ) = Σ_i softmax(z_i / τ)_c (IPWD, Niu et
  al. NeurIPS 2022, Fig. 1: "Avg. Prob. × # Total Samples"). Rows sum to N.

  Args:
    teacher_logits: [N, C] over the training set without augmentation.
    temperatures: T values of τ > 0.

  Returns:
    [T, C] float64, in class order (rank it with `mass_order`).
  """
  z = _logits(teacher_logits)
  return np.stack([softmax(z, t).sum(axis=0) for t in temperatures])


def class_mass_record(mass, temperatures: Sequence[float], num_examples: int,
                      split: str = "train") -> dict[str, Any]:
  """The `teacher_class_mass` / `self_class_mass` entry of diagnostics.json from mass [T, C]
  (`class_mass`, or the same sums accumulated batch by batch on the devices)."""
  m = np.asarray(mass, np.float64)
  if m.ndim != 2 or m.shape[0] != len(temperatures):
    raise ValueError(f"mass must be [T, C] with T = {len(temperatures)} temperatures, got "
                     f"shape {m.shape}.")
  return {"split": split, "augmentation": False, "num_examples": int(num_examples),
          "temperatures": [float(t) for t in temperatures], "mass": m.tolist()}


def mass_order(mass) -> np.ndarray:
  """Classes ranked by decreasing mass [C] → [C] class indices (ties: the lower class first)."""
  m = np.asarray(mass, np.float64)
  if m.ndim != 1:
    raise ValueError(f"mass must be [C], got shape {m.shape}.")
  return np.argsort(-m, kind="stable")


def per_class_recall(predictions, labels, num_classes: int) -> np.ndarray:
  """Recall of each class in percent, 100 · hits_c / count_c; NaN for a class without test
  examples. predictions, labels: [N] ints → [C]."""
  pred = np.asarray(predictions)
  y = _labels(labels, pred.shape[0] if pred.ndim == 1 else -1, num_classes)
  hits = np.bincount(y[pred == y], minlength=num_classes).astype(np.float64)
  count = np.bincount(y, minlength=num_classes).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return 100.0 * hits / count


def rank_groups(mass, num_groups: int = 4) -> list[np.ndarray]:
  """The classes split by teacher-mass rank into `num_groups` contiguous groups, the most
  massive first (IPWD Table 1: CIFAR-100 in quarters of 25). When G does not divide C, the
  first C mod G groups get one class more (`numpy.array_split`). [C] → G arrays of classes."""
  order = mass_order(mass)
  if not 1 <= num_groups <= order.size:
    raise ValueError(f"num_groups must be from 1 to the number of classes {order.size}, got "
                     f"{num_groups}.")
  return np.array_split(order, num_groups)


def _recall(recall, num_classes: int) -> np.ndarray:
  r = np.asarray([np.nan if v is None else v for v in recall], np.float64)
  if r.shape != (num_classes,):
    raise ValueError(f"per-class recall must have one value per class ({num_classes}), got "
                     f"shape {r.shape}.")
  return r


def grouped_recall(recall, mass, num_groups: int = 4) -> list[float | None]:
  """Macro-average recall of each `rank_groups` group: the mean over its classes that have
  test examples (None/NaN recalls are skipped; None if a group has none). [C], [C] → [G]."""
  r = _recall(recall, len(np.asarray(mass)))
  out = []
  for g in rank_groups(mass, num_groups):
    v = r[g][~np.isnan(r[g])]
    out.append(float(v.mean()) if v.size else None)
  return out


def recall_gain_by_group(recall, baseline_recall, mass, num_groups: int = 4
                         ) -> list[float | None]:
  """IPWD Table 1: per teacher-mass group, the macro-average recall of a run minus that of
  the baseline (vanilla student), mean_{c ∈ g} (r_c − r⁰_c) over the classes where both are
  defined, in percentage points. [C], [C], [C] → [G] (None for a group with no such class)."""
  c = len(np.asarray(mass))
  diff = _recall(recall, c) - _recall(baseline_recall, c)
  return grouped_recall([None if np.isnan(d) else d for d in diff], mass, num_groups)


def weight_stats(weights, labels=None, num_classes: int | None = None,
                 percentiles: Sequence[float] = PERCENTILES, bins: int = 30
                 ) -> dict[str, Any]:
  """Summary of the per-example sample weights w [N] a method gave (ER-KD, EA-KD, IPWD).

  Returns {"count", "mean", "std" (population, ddof 0), "min", "max", "percentiles":
  {"p": value} (numpy's linear interpolation), "histogram": {"edges": [bins + 1], "counts":
  [bins]} over [min, max]} and, given labels [N] and num_classes, "class_mean": [C], the
  mean weight of each class's examples (None for a class with none).
  """
  w = np.asarray(weights, np.float64).reshape(-1)
  if w.size == 0 or not np.all(np.isfinite(w)):
    raise ValueError("weights must be a non-empty array of finite values.")
  counts, edges = np.histogram(w, bins=bins)
  out = {"count": int(w.size), "mean": float(w.mean()), "std": float(w.std()),
         "min": float(w.min()), "max": float(w.max()),
         "percentiles": {f"{p:g}": float(v) for p, v in
                         zip(percentiles, np.percentile(w, list(percentiles)))},
         "histogram": {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}}
  if labels is not None:
    if num_classes is None:
      raise ValueError("weight_stats with labels needs num_classes.")
    y = _labels(np.asarray(labels).reshape(-1), w.size, num_classes)
    n = np.bincount(y, minlength=num_classes)
    s = np.bincount(y, weights=w, minlength=num_classes)
    out["class_mean"] = [None if k == 0 else float(v / k) for v, k in zip(s, n)]
  return out


def epoch_weight_record(epoch: int, weights, percentiles: Sequence[float] = PERCENTILES
                        ) -> dict[str, Any]:
  """One `weights.per_epoch` entry of diagnostics.json: {"epoch", "mean", "std",
  "percentiles"} of the weights w [N] of an epoch's training examples."""
  s = weight_stats(weights, percentiles=percentiles)
  return {"epoch": int(epoch), "mean": s["mean"], "std": s["std"],
          "percentiles": s["percentiles"]}


def _average_ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(x.size)
  ranks[order] = np.arange(x.size, dtype=np.float64)
  for v in np.unique(x):  # ties share their mean rank
    tie = x == v
    ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(x, y) -> float | None:
  """Spearman's rank correlation of two [C] vectors (tied values get their average rank);
  None/NaN entries of either are dropped, and None is returned if fewer than 3 remain or
  either is constant. Used for a class's mean weight against its teacher mass."""
  a = np.asarray([np.nan if v is None else v for v in x], np.float64)
  b = np.asarray([np.nan if v is None else v for v in y], np.float64)
  keep = ~(np.isnan(a) | np.isnan(b))
  a, b = a[keep], b[keep]
  if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return None
  return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])
