"""The trainer's diagnostics: what a run writes to `diagnostics.json` (docs/DESIGN.md#diagnostics).

    diag = Diagnostics(exp, saved)      # saved: the checkpoint's "diagnostics" entry, or None
    diag.start(exp.teacher_variables)   # distill: the teacher's class mass, once per run
    diag.add_step(metrics, done)        # pops the step's [S, B] weights; epoch records
    diag.calibration = ...              # from `evaluate` at each evaluation
    diag.write(workdir, step, epoch)    # process 0
    diag.finish(variables, workdir, step)   # + teacher / self_distill: the model's own mass

The schema is documented in jaxkd/report_runs.py; the numbers are `jaxkd.diagnostics`'
(float64 NumPy on the host). On the devices only sums and per-example vectors are made:
the class mass as Σ_i softmax(z_i/τ) [T, C] per batch (padding rows skipped), the eval's
per-example maximum probability and top-1 hit, the train step's per-example weights. So no
[N, C] logits ever reach the host, and the train step keeps its cost (one [B] output more).

Resume: the teacher's class mass, the last calibration, every finished epoch's weight
record and the last epoch's weight statistics travel in the checkpoint's metadata
(`state()`). The weights of
an epoch are collected from its steps in this process, so after a resume in the middle of
an epoch, that epoch's record covers the steps since the resume.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import data as jdata
from jaxkd import diagnostics as dg
from jaxkd.train import report
from jaxkd.train import step as jstep

__all__ = ["Diagnostics", "evaluate", "class_mass_step"]


def evaluate(eval_step, variables, loader) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """One pass of `eval_step` (`step.seeds_eval_step`) over `loader`: per seed, the eval
  summary (`report.summarize_eval`) and the calibration (`diagnostics.calibration_from` on
  the per-example maximum probability and top-1 hit, NLL = the eval's mean CE)."""
  sums, examples = None, []
  for batch in loader:
    out = dict(eval_step(variables, batch))
    examples.append(out.pop("examples"))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums, examples = jax.device_get((sums, examples))
  num_seeds = jax.tree.leaves(sums)[0].shape[0]
  joined = {k: np.concatenate([e[k] for e in examples], axis=1) for k in examples[0]}
  results, calibration = [], []
  for i in range(num_seeds):
    result = report.summarize_eval(jax.tree.map(lambda x, i=i: x[i], sums))
    keep = joined["mask"][i]
    results.append(result)
    calibration.append(dg.calibration_from(joined["confidence"][i][keep],
                                           joined["correct"][i][keep], result["ce"]))
  return results, calibration


def class_mass_step(model, temperatures: tuple[float, ...], variables: Any,
                    batch: dict[str, jax.Array]) -> jax.Array:
  """Σ_i softmax(z_i / τ) over a batch's real rows, for each τ: float32 [T, C] (IPWD Fig. 1;
  `diagnostics.class_mass`)."""
  z = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
  keep = batch["mask"][:, None]
  return jnp.stack([jnp.sum(jnp.where(keep, jax.nn.softmax(z / t), 0.0), axis=0)
                    for t in temperatures])


class Diagnostics:
  """A run's diagnostics: teacher class mass, calibration, sample weights (per seed)."""

  def __init__(self, exp, saved: dict[str, Any] | None = None, step_config=None):
    self.exp = exp
    self.step_config = step_config or exp.step_config  # a sweep's: this member's
    self.num_seeds, self.num_classes = exp.num_seeds, exp.num_classes
    saved = saved or {}
    self.teacher_mass = saved.get("teacher_class_mass")
    self.per_epoch = saved.get("per_epoch") or [[] for _ in range(self.num_seeds)]
    self.final = saved.get("final") or [None] * self.num_seeds
    self.self_mass = [None] * self.num_seeds
    self.calibration = saved.get("calibration") or [None] * self.num_seeds
    self._weights, self._labels = [], []  # this epoch's steps, as fetched device arrays

  def state(self) -> dict[str, Any]:
    """What the checkpoint's metadata keeps (JSON; a copy: the save may finish later)."""
    return copy.deepcopy({"teacher_class_mass": self.teacher_mass, "per_epoch": self.per_epoch,
                          "final": self.final, "calibration": self.calibration})

  def _mass(self, model, variables, seeds_per_vmap=None) -> list[dict[str, Any]]:
    """The class mass of `variables` (leading seed axis) over the training examples (the
    long-tailed subset if one is set), in order and without augmentation."""
    spec, d = self.exp.spec, self.exp.spec.data
    loader = jdata.make_eval_loader(
        self.exp.ds_spec, self.exp.data_dir, mesh=self.exp.mesh,
        global_batch=spec.eval_batch_size, device_resident=d.device_resident,
        worker_count=d.num_workers, split=self.exp.ds_spec.train_split,
        long_tail_factor=d.long_tail_factor, long_tail_seed=d.long_tail_seed)
    temps = tuple(float(t) for t in dg.TEMPERATURES)
    fn = jax.jit(lambda v, b: jstep.map_seeds(
        functools.partial(class_mass_step, model, temps, batch=b), v, seeds_per_vmap))
    total = None
    try:
      for batch in loader:
        out = fn(variables, batch)
        total = out if total is None else total + out
    finally:
      loader.close()
    total = np.asarray(jax.device_get(total), np.float64)
    return [dg.class_mass_record(m, temps, loader.num_examples,
                                 split=self.exp.ds_spec.train_split) for m in total]

  def start(self, teacher_variables, known: dict[str, Any] | None = None) -> None:
    """The frozen teacher's class mass (distill runs), unless the checkpoint has it or it is
    `known` (another member of the sweep computed it)."""
    teacher = self.step_config.teacher
    if teacher is not None and self.teacher_mass is None:
      self.teacher_mass = known or self._teacher_run_mass()
    if teacher is not None and self.teacher_mass is None:
      variables = jax.tree.map(lambda x: x[None], teacher_variables)
      self.teacher_mass = self._mass(teacher, variables)[0]

  def _teacher_run_mass(self) -> dict[str, Any] | None:
    """The teacher's class mass as its own jaxkd run recorded it (`self_class_mass` of
    `…/teacher/diagnostics.json` beside `…/teacher/model[_seed{k}]`), when that run trained
    on the same examples; None otherwise (then it is computed)."""
    folder, model = os.path.split(os.path.normpath(self.exp.spec.teacher_checkpoint))
    k = int(model[len("model_seed"):]) if model.startswith("model_seed") else 0
    try:
      with open(os.path.join(folder, "config.json")) as f:
        data = json.load(f).get("dataset") or {}
      with open(os.path.join(folder, "diagnostics.json")) as f:
        record = json.load(f)["seeds"][k]["self_class_mass"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
      return None
    d = self.exp.spec.data
    same = (data.get("name") == d.name and data.get("long_tail_factor") == d.long_tail_factor
            and (d.long_tail_factor is None or data.get("long_tail_seed") == d.long_tail_seed)
            and record.get("split") == self.exp.ds_spec.train_split
            and record.get("temperatures") == [float(t) for t in dg.TEMPERATURES])
    return record if same else None

  def add_step(self, metrics: dict[str, Any], done: int) -> None:
    """Takes the step's "weights" / "weight_labels" [S, B] out of `metrics` (the rest is
    averaged by the log) and closes the epoch's record at its last step or the run's."""
    weights, labels = metrics.pop("weights", None), metrics.pop("weight_labels", None)
    if weights is None:
      return
    self._weights.append(weights)
    self._labels.append(labels)
    spe = self.exp.steps_per_epoch
    if done % spe == 0 or done == self.exp.total_steps:
      self._end_epoch(-(-done // spe))

  def _end_epoch(self, epoch: int) -> None:
    w, y = jax.device_get((self._weights, self._labels))
    self._weights, self._labels = [], []
    w, y = np.concatenate(w, axis=1), np.concatenate(y, axis=1)  # [S, steps · B]
    for i in range(self.num_seeds):
      # A run extended past a partial last epoch finishes that epoch's record again.
      self.per_epoch[i] = [r for r in self.per_epoch[i] if r["epoch"] != epoch]
      self.per_epoch[i].append(dg.epoch_weight_record(epoch, w[i]))
      self.final[i] = dg.weight_stats(w[i], y[i], self.num_classes)

  def finish(self, variables, workdir: str, step: int) -> None:
    """At the run's end: the model's own class mass (teacher and self_distill runs), then
    `write`."""
    if self.step_config.teacher is None:
      self.self_mass = self._mass(self.step_config.model, variables,
                                  self.exp.seeds_per_vmap)
    self.write(workdir, step, -(-step // self.exp.steps_per_epoch))

  def write(self, workdir: str, step: int, epoch: int) -> None:
    """`workdir/diagnostics.json` (process 0), with what is known at this step."""
    out = {"format": dg.DIAGNOSTICS_FORMAT, "step": int(step), "epoch": int(epoch),
           "num_classes": self.num_classes}
    if self.teacher_mass is not None:
      out["teacher_class_mass"] = self.teacher_mass
    seeds = []
    for i, seed in enumerate(self.exp.spec.seeds):
      entry = {"seed": int(seed)}
      if self.self_mass[i] is not None:
        entry["self_class_mass"] = self.self_mass[i]
      if self.calibration[i] is not None:
        entry["calibration"] = self.calibration[i]
      if self.per_epoch[i] or self.final[i]:
        entry["weights"] = {"per_epoch": self.per_epoch[i], "final": self.final[i]}
      seeds.append(entry)
    out["seeds"] = seeds
    report.write_json(os.path.join(workdir, "diagnostics.json"), out)
