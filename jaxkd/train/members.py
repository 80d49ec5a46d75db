"""What one member of a run writes: its S seeds' summaries, metrics, evaluations, models.

A single run has one member, whose folder is the run's workdir. A sweep has one member per
objective, each in `workdir/<name>/`, laid out as a single run's workdir (so that
`python -m jaxkd.report` and a later `distill` run read it as one): `config.json` (the
member's own single-run config), `run_info.json`, `metrics.jsonl`, `eval_{best,last}*.json`,
`diagnostics.json`, `summary.json` and `model[_seed{i}]`. The train state and its
checkpoints are the run's, shared by all members (`jaxkd/train/loop.py`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from jaxkd import checkpoint
from jaxkd import models
from jaxkd.train import diagnose
from jaxkd.train import report

__all__ = ["MemberRun"]


class MemberRun:
  """Member `index` of experiment `exp`: its seeds' summaries, metric writer, diagnostics.

  `saved`: this member's entry of the checkpoint's metadata ({"runs", "diagnostics"}), or
  None for a fresh run; `purge_step`: the step after the checkpoint a resumed run restarts
  from (TensorBoard drops the later events written before the restart).
  """

  def __init__(self, exp, index: int, folder: str, saved: dict[str, Any] | None,
               purge_step: int | None):
    self.exp, self.index, self.folder = exp, index, folder
    self.member = exp.spec.members[index]
    self.name, self.method = self.member.name, self.member.method
    saved = saved or {}
    self.runs = saved.get("runs") or [report.new_run_summary(s) for s in exp.spec.seeds]
    self.diag = diagnose.Diagnostics(exp, saved.get("diagnostics"),
                                     step_config=exp.step_configs[index])
    if jax.process_index() == 0:
      os.makedirs(folder, exist_ok=True)
    self.writer = report.MetricWriter(folder, purge_step=purge_step)

  def state(self) -> dict[str, Any]:
    """This member's part of the checkpoint's metadata."""
    return {"name": self.name, "runs": self.runs, "diagnostics": self.diag.state()}

  def suffix(self, i: int) -> str:
    """File-name suffix of seed i: none for a single seed."""
    return "" if self.exp.num_seeds == 1 else f"_seed{i}"

  def mark_diverged(self, nonfinite_steps) -> list[int]:
    """Records the seeds whose state stopped at a non-finite step ([S] ints, −1: finite);
    returns the seed indices that are newly so."""
    new = []
    for i, bad in enumerate(np.asarray(nonfinite_steps).reshape(-1)):
      if bad >= 0 and self.runs[i].get("diverged_at_step") is None:
        # `nonfinite_step` is the state's step counter before the bad update.
        self.runs[i]["diverged_at_step"] = int(bad) + 1
        new.append(i)
    return new

  def evaluate(self, variables, done: int) -> None:
    """Evaluates this member's models (leading seed axis) after `done` steps."""
    epoch = math.ceil(done / self.exp.steps_per_epoch)
    results, self.diag.calibration = self.exp.evaluate(self.exp.eval_step, variables)
    for i, (run, result) in enumerate(zip(self.runs, results)):
      path = lambda kind, i=i: os.path.join(self.folder, f"eval_{kind}{self.suffix(i)}.json")
      if report.record_eval(run, result, epoch, done):
        report.write_json(path("best"), {"epoch": epoch, **result})
      report.write_json(path("last"), {"epoch": epoch, **result})
    scalars = {k: float(np.mean([r[k] for r in results])) for k in ("top1", "top5", "ce")}
    if len(results) > 1:
      scalars.update({f"top1_seed{i}": r["top1"] for i, r in enumerate(results)})
    self.writer.write(done, scalars, prefix="eval/")
    self.diag.write(self.folder, done, epoch)

  def log(self, done: int, fetched: list[dict[str, Any]], images_per_sec: float | None) -> None:
    """Writes the mean of this member's fetched step metrics (over steps and seeds)."""
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    if images_per_sec is not None:
      scalars["images_per_sec"] = images_per_sec
    self.writer.write(done, scalars, prefix="train/")

  def export(self, variables) -> None:
    """The deployable models (params + BN statistics) in the converter's format: what a
    later `distill` run names as its teacher."""
    model = self.exp.spec.model
    for i in range(self.exp.num_seeds):
      checkpoint.save_model_variables(
          os.path.join(self.folder, "model" + self.suffix(i)),
          jax.tree.map(lambda x, i=i: x[i], variables), model=models.spec(model).name,
          num_classes=self.exp.num_classes, source=f"jaxkd run {self.folder}{self.suffix(i)}",
          overwrite=True)

  def finish(self, variables, step: int, **fields: Any) -> dict[str, Any]:
    """At the end: diagnostics, then this member's summary.json (returned)."""
    self.diag.finish(variables, self.folder, step)
    spec = self.exp.spec
    final = report.final_summary(
        self.runs, steps=step, model=spec.model,
        mode="teacher" if self.member.objective.targets == "labels" else spec.mode,
        method=self.method, **fields)
    report.write_json(os.path.join(self.folder, "summary.json"), final)
    return final

  def close(self) -> None:
    self.writer.close()

