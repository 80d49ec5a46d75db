"""What a run writes and prints: metrics, progress, evaluation summaries and run files.

Everything here is host-side I/O on plain Python and NumPy values; only process 0 writes.
Files of a run (in its workdir): `metrics.jsonl` (+ TensorBoard in `tb/` when tensorboardX is
installed), `config.json`, `run_info.json`, `eval_last.json` / `eval_best.json` (with
`_seed{i}` for several seeds), `summary.json`, and `diagnostics.json` (class mass,
calibration, sample weights; written by `jaxkd/train/diagnose.py`, schema in
`jaxkd/report_runs.py`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

__all__ = ["MetricWriter", "Progress", "summarize_eval", "new_run_summary", "record_eval",
           "final_summary", "mean_std", "describe", "write_json", "versions"]


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` atomically (temporary file, then rename), on process 0 only."""
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def versions() -> dict[str, str]:
  """The installed versions of jaxkd and the libraries its results depend on."""
  import importlib.metadata as md
  out = {}
  for pkg in ("jaxkd", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
              "tensorflow-datasets", "grain"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`), process 0 only.

  `purge_step` (a resumed run: the step after its checkpoint) tells TensorBoard to discard
  the events of later steps written before the restart, which the run logs again.
  """

  def __init__(self, workdir: str, purge_step: int | None = None):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.active:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)
    except ImportError:
      pass

  def write(self, step: int, scalars: dict[str, Any], prefix: str = "") -> None:
    if not self.active:
      return
    row = {"step": int(step), **{prefix + k: v for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(prefix + k, v, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class Progress:
  """A progress bar with images/s (compilation excluded) and ETA on process 0's terminal."""

  def __init__(self, total: int, initial: int, images_per_step: int, enabled: bool):
    self.images_per_step = images_per_step
    self.bar = None
    if enabled and jax.process_index() == 0:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)
      except ImportError:
        pass
    self.t0 = self.s0 = None

  def update(self, step: int, postfix: dict[str, Any] | None = None) -> float | None:
    """Advances to `step`; returns images/s since the first (compiled) step, if known."""
    now = time.perf_counter()
    if self.t0 is None:
      self.t0, self.s0 = now, step
      rate = None
    else:
      rate = (step - self.s0) * self.images_per_step / max(now - self.t0, 1e-9)
    if self.bar is not None:
      self.bar.n = step
      if rate is not None:
        left = (self.bar.total - step) * self.images_per_step / max(rate, 1e-9)
        self.bar.set_postfix({"img/s": f"{rate:,.0f}", "eta": f"{left/60:.1f}min",
                              **(postfix or {})}, refresh=False)
      self.bar.refresh()
    return rate

  def close(self):
    if self.bar is not None:
      self.bar.close()


def summarize_eval(sums: dict[str, np.ndarray]) -> dict[str, Any]:
  """Percentages from one model's accumulated eval sums; per-class recall (None: no examples)."""
  n = max(int(sums["count"]), 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = 100.0 * sums["class_hits"] / sums["class_count"]
  return {"top1": 100.0 * float(sums["top1"]) / n, "top5": 100.0 * float(sums["top5"]) / n,
          "ce": float(sums["ce"]) / n, "count": int(sums["count"]),
          "per_class_recall": [None if math.isnan(r) else round(float(r), 4) for r in recall]}


def new_run_summary(seed: int) -> dict[str, Any]:
  return {"seed": seed, "best_top1": None, "best_epoch": None, "history": []}


def record_eval(summary: dict[str, Any], result: dict[str, Any], epoch: int, step: int) -> bool:
  """Adds an evaluation to a run's summary; returns whether it is the best so far."""
  summary["history"].append({"epoch": epoch, "step": step, "top1": result["top1"],
                             "top5": result["top5"]})
  summary["last"] = result
  best = summary["best_top1"] is None or result["top1"] > summary["best_top1"]
  if best:
    summary["best_top1"], summary["best_epoch"], summary["best"] = result["top1"], epoch, result
  return best


def mean_std(values: list[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def final_summary(runs: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
  """The run's summary.json: one seed's summary itself, or several under "seeds" with the
  mean ± std of best and last top-1; `fields` (teacher, images/s, ...) added to either."""
  for run in runs:
    run["last_top1"] = run["last"]["top1"] if "last" in run else None
  if len(runs) == 1:
    final = dict(runs[0])
  else:
    final = {"seeds": runs, "best_top1": mean_std([r["best_top1"] for r in runs]),
             "last_top1": mean_std([r["last_top1"] for r in runs])}
  final.update(fields, num_seeds=len(runs))
  return final


def describe(summary: dict[str, Any]) -> str:
  """One line: best and last top-1 (mean ± std over seeds for a multi-seed run)."""
  if summary.get("num_seeds", 1) > 1:
    b, l = summary["best_top1"], summary["last_top1"]
    return (f"best top-1 {b['mean']:.2f} ± {b['std']:.2f}%, last {l['mean']:.2f} ± "
            f"{l['std']:.2f}% over {summary['num_seeds']} seeds")
  return (f"best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']}), last "
          f"{summary['last_top1']:.2f}%")
