"""The figures of `jaxkd.report`, drawn with matplotlib's Agg renderer (no display needed).

Each function takes plain Python data (lists of per-run dicts built by `jaxkd/report.py`),
writes one PNG and returns its path, or returns None when there is nothing to draw, so a
report shows a figure only when its data exists. One idea per figure; a run keeps its
colour across all of them (`colour`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

__all__ = ["colour", "learning_curves", "train_loss", "class_mass", "recall_gain",
           "weight_histograms", "weight_vs_mass", "weights_over_training", "reliability"]

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")
DPI = 110


def colour(i: int) -> str:
  return _PALETTE[i % len(_PALETTE)]


def _figure(width: float = 6.4, height: float = 4.0) -> Figure:
  fig = Figure(figsize=(width, height), layout="constrained")
  fig.set_dpi(DPI)
  return fig


def _save(fig: Figure, out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=DPI)
  return path


def _panels(n: int, width: float = 3.4, height: float = 2.8, max_cols: int = 4):
  cols = min(n, max_cols)
  rows = -(-n // cols)
  fig = _figure(width * cols, height * rows)
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def _curves(runs: Sequence[dict[str, Any]], key: str, out_dir: str, name: str, ylabel: str,
            title: str, unit: str) -> str | None:
  """runs: [{"name", "colour", key: (epochs [K], values [K])}]; skips runs without data."""
  drawn = [r for r in runs if r.get(key) and len(r[key][0])]
  if not drawn or max(len(r[key][0]) for r in drawn) < 2:
    return None  # one point per run is no curve (the table has the numbers)
  fig = _figure()
  ax = fig.subplots()
  for r in drawn:
    x, y = r[key]
    ax.plot(x, y, marker="o" if len(x) < 12 else None, ms=4, color=r["colour"],
            label=r["name"])
  ax.set_xlabel(unit)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2 if len(drawn) > 6 else 1)
  return _save(fig, out_dir, name)


def learning_curves(runs, out_dir: str, unit: str = "epoch") -> str | None:
  """Test top-1 of every run at each evaluation (the mean over seeds); x in `unit`."""
  return _curves(runs, "eval_curve", out_dir, "learning_curves.png", "test top-1 (%)",
                 "Test accuracy during training", unit)


def train_loss(runs, out_dir: str, unit: str = "epoch") -> str | None:
  """The training objective of every run at each logged step; x in `unit`."""
  return _curves(runs, "loss_curve", out_dir, "train_loss.png", "training loss",
                 "Training objective (each method's own loss)", unit)


def class_mass(teachers: Sequence[dict[str, Any]], out_dir: str) -> str | None:
  """IPWD Fig. 1: Σ_i softmax(z_i/τ)_c per class, classes ranked by mass, one line per τ.

  teachers: [{"name", "temperatures": [T], "mass": [T, C], "num_examples": N}], one panel each.
  """
  if not teachers:
    return None
  fig, axes = _panels(len(teachers), 6.4 if len(teachers) == 1 else 4.8, 4.0, max_cols=2)
  for ax, t in zip(axes, teachers):
    mass = np.asarray(t["mass"], np.float64)
    rank = np.arange(1, mass.shape[1] + 1)
    for j, tau in enumerate(t["temperatures"]):
      ax.plot(rank, np.sort(mass[j])[::-1], marker="o" if mass.shape[1] <= 20 else None,
              ms=3, label=f"τ = {tau:g}")
    ax.axhline(t["num_examples"] / mass.shape[1], color="k", ls="--", lw=1,
               label="balanced (N / C)")
    ax.set_xlabel("class rank by mass (most first)")
    ax.set_ylabel(r"$\sum_i\, p_c(x_i)$  (avg. prob. × N)")
    ax.set_title(t["name"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Predicted probability mass per class (training set)", fontsize=11)
  return _save(fig, out_dir, "class_mass.png")


def recall_gain(rows: Sequence[dict[str, Any]], group_labels: Sequence[str], baseline: str,
                out_dir: str) -> str | None:
  """IPWD Table 1 as bars: per teacher-rank group, each run's macro recall gain over the
  baseline. rows: [{"name", "colour", "gain": [G] (None: no class), "std": [G] or None}]."""
  if not rows:
    return None
  fig = _figure(max(6.4, 1.4 * len(group_labels) + 0.4 * len(rows)), 4.0)
  ax = fig.subplots()
  width = 0.8 / len(rows)
  x = np.arange(len(group_labels))
  for i, r in enumerate(rows):
    gain = np.asarray([np.nan if g is None else g for g in r["gain"]], np.float64)
    err = None if r.get("std") is None else np.asarray(
        [np.nan if s is None else s for s in r["std"]], np.float64)
    ax.bar(x - 0.4 + width * (i + 0.5), gain, width, yerr=err, capsize=2, color=r["colour"],
           label=r["name"])
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(x, group_labels)
  ax.set_xlabel("classes, ranked by the teacher's probability mass (most first)")
  ax.set_ylabel(f"macro recall gain over {baseline} (points)")
  ax.set_title("Where distillation helps: recall gain by teacher-mass rank")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out_dir, "recall_gain.png")


def weight_histograms(rows: Sequence[dict[str, Any]], out_dir: str) -> str | None:
  """The final sample-weight distribution of each weighted run, one panel per run.
  rows: [{"name", "colour", "histogram": {"edges", "counts"}, "mean"}]."""
  if not rows:
    return None
  fig, axes = _panels(len(rows))
  for ax, r in zip(axes, rows):
    edges = np.asarray(r["histogram"]["edges"], np.float64)
    counts = np.asarray(r["histogram"]["counts"], np.float64)
    ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, color=r["colour"], alpha=0.8)
    ax.axvline(r["mean"], color="k", ls="--", lw=1, label=f"mean {r['mean']:.3g}")
    ax.set_xlabel("sample weight w_i")
    ax.set_ylabel("fraction of examples")
    ax.set_title(r["name"], fontsize=10)
    ax.legend(fontsize=7)
  fig.suptitle("Sample weights in the last epoch", fontsize=11)
  return _save(fig, out_dir, "weight_histograms.png")


def weight_vs_mass(rows: Sequence[dict[str, Any]], out_dir: str) -> str | None:
  """Each class's mean weight against its teacher mass (IPWD: over-represented classes should
  get less weight). rows: [{"name", "colour", "mass": [C], "class_mean": [C], "spearman"}]."""
  if not rows:
    return None
  fig, axes = _panels(len(rows))
  for ax, r in zip(axes, rows):
    m = np.asarray(r["mass"], np.float64)
    w = np.asarray([np.nan if v is None else v for v in r["class_mean"]], np.float64)
    ax.scatter(m, w, s=14, color=r["colour"])
    rho = r.get("spearman")
    ax.set_title(r["name"] + ("" if rho is None else f"  (Spearman ρ = {rho:+.2f})"),
                 fontsize=10)
    ax.set_xlabel("teacher mass of the class (τ = 1)")
    ax.set_ylabel("mean weight of its examples")
    ax.grid(alpha=0.3)
  fig.suptitle("Class weight against teacher class mass", fontsize=11)
  return _save(fig, out_dir, "weight_vs_mass.png")


def weights_over_training(rows: Sequence[dict[str, Any]], out_dir: str, unit: str = "epoch"
                          ) -> str | None:
  """Mean sample weight during training, with the 5th–95th percentile band when known.
  rows: [{"name", "colour", "epochs": [K], "mean": [K], "low": [K] | None, "high"}]."""
  if not rows or max(len(r["epochs"]) for r in rows) < 2 and all(
      r.get("low") is None for r in rows):
    return None  # one batch mean per run is no curve
  fig = _figure()
  ax = fig.subplots()
  for r in rows:
    ax.plot(r["epochs"], r["mean"], color=r["colour"], label=r["name"],
            marker="o" if len(r["epochs"]) < 12 else None, ms=4)
    if r.get("low") is not None and len(r["epochs"]) > 1:
      ax.fill_between(r["epochs"], r["low"], r["high"], color=r["colour"], alpha=0.2)
    elif r.get("low") is not None:  # one epoch: a band would be a hairline
      m = np.asarray(r["mean"])
      ax.errorbar(r["epochs"], m, yerr=[m - r["low"], np.asarray(r["high"]) - m],
                  color=r["colour"], capsize=4, ls="none")
  ax.set_xlabel(unit)
  band = any(r.get("low") is not None for r in rows)
  ax.set_ylabel("mean sample weight" + (" (bars/band: 5th–95th pct.)" if band else
                                        " (per logged step)"))
  ax.set_title("Sample weights during training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out_dir, "weights_over_training.png")


def reliability(rows: Sequence[dict[str, Any]], out_dir: str) -> str | None:
  """Reliability diagrams: accuracy against confidence per bin, one panel per run.
  rows: [{"name", "colour", "bins": reliability_bins(...), "ece"}]."""
  if not rows:
    return None
  fig, axes = _panels(len(rows), 3.0, 3.0)
  for ax, r in zip(axes, rows):
    b = r["bins"]
    lo, hi = np.asarray(b["lower"]), np.asarray(b["upper"])
    acc = np.asarray([np.nan if a is None else a for a in b["accuracy"]], np.float64)
    ax.bar(lo, acc, hi - lo, align="edge", color=r["colour"], edgecolor="k", lw=0.4)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (max. probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{r['name']}  (ECE {100 * r['ece']:.2f}%)", fontsize=9)
  fig.suptitle("Reliability on the test split: accuracy per confidence bin (15 bins); "
               "dashed: perfect calibration", fontsize=10)
  return _save(fig, out_dir, "reliability.png")
