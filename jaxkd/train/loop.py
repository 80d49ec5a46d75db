"""The trainer: a RunSpec wired to data, models and checkpoints, and the loop that runs it.

Three modes (docs/METHODS.md): `teacher` (supervised CE training of any model; its result is a
teacher), `distill` (two-stage KD: a frozen teacher restored from a model checkpoint runs in
inference mode inside the same jitted step, under stop_gradient), `self_distill` (one-stage
PS-KD: the model's own previous-epoch predictions, kept per example in the train state, are
the soft targets; optionally IPW-weighted).

One jitted step trains S ≥ 1 students (seeds) over a data-parallel mesh of all devices:
parameters replicated, batch `[S, B, ...]` sharded on B, state donated. The global batch is
the recipe's; results do not depend on the number of devices or processes
(docs/DESIGN.md#sharding). An interrupted run resumes exactly from its last checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import checkpoint
from jaxkd import config as jconfig
from jaxkd import data as jdata
from jaxkd import models
from jaxkd import sharding
from jaxkd.train import diagnose
from jaxkd.train import interrupts
from jaxkd.train import report
from jaxkd.train import resume
from jaxkd.train import step as jstep
from jaxkd.train import workdir as jworkdir

IncompatibleCheckpointError = resume.IncompatibleCheckpointError
RunError = jworkdir.RunError


class TrainingDiverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is untouched."""


Interrupted = interrupts.Interrupted


# The layout of a run checkpoint (train state with a leading seed axis, data state, per-seed
# summaries); a checkpoint of another layout is refused with a clear message.
RUN_CHECKPOINT_FORMAT = "jaxkd-run-2"


class Experiment:
  """Mesh, data, teacher and compiled steps, built once from a RunSpec.

  With S = len(spec.seeds) > 1, S independent students (their own initialisation and data
  order, each at the recipe's batch size) train in one jitted step over a train state with a
  leading seed axis; `spec.seeds_per_vmap` of them are vectorised together (0: the platform's
  default, `step.default_seeds_per_vmap`). S = 1 is the same path with one seed.
  """

  def __init__(self, spec: jconfig.RunSpec, devices=None):
    self.spec = spec
    self.mesh = sharding.make_mesh(devices)
    self.num_seeds = len(spec.seeds)
    self.seeds_per_vmap = spec.seeds_per_vmap or jstep.default_seeds_per_vmap(
        self.num_seeds, self.mesh.devices.flat[0].platform)
    d = spec.data
    self.ds_spec = jdata.spec(d.name, **dict(d.spec_overrides))
    self.num_classes = self.ds_spec.num_classes
    self.data_dir = data_dir = jdata.ensure_prepared(d.name, d.data_dir)
    self.train_data = jdata.make_train_loader(
        self.ds_spec, data_dir, mesh=self.mesh, global_batch=spec.batch_size,
        seeds=spec.seeds, device_resident=d.device_resident,
        long_tail_factor=d.long_tail_factor, long_tail_seed=d.long_tail_seed,
        worker_count=d.num_workers)
    self.eval_data = jdata.make_eval_loader(
        self.ds_spec, data_dir, mesh=self.mesh, global_batch=spec.eval_batch_size,
        device_resident=d.device_resident, worker_count=d.num_workers)
    self.steps_per_epoch = self.train_data.steps_per_epoch
    self.total_steps = spec.num_epochs * self.steps_per_epoch
    if spec.max_steps:
      self.total_steps = min(self.total_steps, spec.max_steps)
    self.teacher_variables, teacher_model = self._restore_teacher()
    self.step_config = jstep.make_step_config(
        model=spec.model, num_classes=self.num_classes, objective=spec.objective,
        optimizer=spec.optimizer, steps_per_epoch=self.steps_per_epoch,
        num_epochs=spec.num_epochs, teacher_model=teacher_model, dtype=spec.dtype)
    repl = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        functools.partial(jstep.seeds_train_step, self.step_config,
                          seeds_per_vmap=self.seeds_per_vmap),
        donate_argnums=(0,), out_shardings=(repl, repl))
    self.eval_step = jax.jit(
        functools.partial(jstep.seeds_eval_step, self.step_config.model, self.num_classes,
                          seeds_per_vmap=self.seeds_per_vmap), out_shardings=repl)
    self.teacher_eval_step = None
    if self.step_config.teacher is not None:
      self.teacher_eval_step = jax.jit(
          functools.partial(jstep.seeds_eval_step, self.step_config.teacher, self.num_classes),
          out_shardings=repl)

  def _restore_teacher(self):
    spec = self.spec
    if spec.objective.targets != "teacher":
      return None, None
    name = check_teacher(spec, self.num_classes)["model"]
    try:
      variables, _ = checkpoint.restore_model_variables(spec.teacher_checkpoint)
    except Exception as e:  # orbax and tensorstore raise many kinds for a damaged folder
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      raise RunError(f"the teacher checkpoint {spec.teacher_checkpoint} could not be read "
                     f"({type(e).__name__}: {first}); convert or train the teacher again "
                     f"(see `python -m jaxkd.convert --help`).") from None
    return sharding.put_replicated(variables, self.mesh), name

  def init_state(self) -> jstep.TrainState:
    """A fresh state with a leading seed axis, born replicated on the mesh."""
    init = functools.partial(jstep.init_train_state, self.step_config,
                             image_shape=self.ds_spec.image_shape,
                             feature_dim=models.feature_dim(self.spec.model),
                             index_size=self.train_data.index_size)
    keys = jnp.stack([jax.random.key(s) for s in self.spec.seeds])
    return jax.jit(lambda k: jstep.map_seeds(init, k),
                   out_shardings=sharding.replicated(self.mesh))(keys)

  def evaluate(self, eval_step, variables) -> tuple[list[dict[str, Any]], list[dict]]:
    """Per seed of `variables` (leading seed axis): eval summary, calibration (diagnose)."""
    return diagnose.evaluate(eval_step, variables, self.eval_data)

  def evaluate_teacher(self) -> dict[str, Any]:
    variables = jax.tree.map(lambda x: x[None], self.teacher_variables)
    return self.evaluate(self.teacher_eval_step, variables)[0][0]


def check_teacher(spec: jconfig.RunSpec, num_classes: int) -> dict[str, Any]:
  """The teacher's model.json, checked against the config and the dataset before anything is
  built; raises RunError with what to do."""
  path = spec.teacher_checkpoint
  try:
    meta = checkpoint.read_metadata(path)
  except (FileNotFoundError, ValueError) as e:
    nested = os.path.join(path, "model")
    hint = (f"; did you mean {nested}?" if os.path.isfile(
        os.path.join(nested, checkpoint.METADATA_FILE)) else "")
    raise RunError(f"config.teacher.checkpoint: {e}{hint}") from None
  name = meta.get("model", spec.teacher_model)
  if spec.teacher_model and models.spec(name).name != models.spec(spec.teacher_model).name:
    raise RunError(f"the teacher checkpoint {path} holds a {name}, but config.teacher.model is "
                   f"{spec.teacher_model}; set --config.teacher.model={name} or point "
                   f"config.teacher.checkpoint at a {spec.teacher_model}.")
  if meta.get("num_classes") != num_classes:
    raise RunError(f"the teacher checkpoint {path} has {meta.get('num_classes')} classes, but "
                   f"{spec.data.name} has {num_classes}; use a teacher trained on this "
                   f"dataset.")
  return meta


def _due(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, evaluate, save) runs after `done` steps."""
  return done == total or (every > 0 and done % every == 0)


class _Run:
  """A run's mutable state (train state, per-seed summaries, checkpoints, writers)."""

  def __init__(self, exp: Experiment, workdir: str):
    self.exp, self.workdir = exp, workdir
    spec = exp.spec
    self.fingerprint = jworkdir.fingerprint(spec)
    self.manager = checkpoint.run_manager(os.path.join(workdir, "checkpoints"),
                                          keep=spec.checkpoint_keep,
                                          async_save=not sharding.multi_device_cpu())
    self.state = exp.init_state()
    self.runs = [report.new_run_summary(s) for s in spec.seeds]
    self.teacher = None
    self.images_per_sec = None
    self.resumed = resume.restore(
        self.manager, self.state, workdir=workdir, fmt=RUN_CHECKPOINT_FORMAT,
        fingerprint=self.fingerprint, allowed=spec.allow_changes,
        restore_step=spec.restore_step)
    if self.resumed is not None:
      meta = self.resumed.meta
      self.state = self.resumed.state
      self.runs, self.teacher = meta["runs"], meta.get("teacher")
      exp.train_data.set_state(meta["data"])
      if jax.process_index() == 0:
        jworkdir.drop_replayed_metrics(workdir, self.resumed.step)
      print(f"Resumed from {self.manager.directory}/{self.resumed.step}.", flush=True)
    self.diag = diagnose.Diagnostics(exp, self.resumed and self.resumed.meta.get("diagnostics"))
    self.writer = report.MetricWriter(
        workdir, purge_step=None if self.resumed is None else self.resumed.step + 1)
    self._unchecked = []  # saved steps whose checksums are not recorded yet

  @property
  def step(self) -> int:
    return int(np.max(jax.device_get(self.state.step)))

  def suffix(self, i: int) -> str:
    """File-name suffix of seed i: none for a single-seed run."""
    return "" if self.exp.num_seeds == 1 else f"_seed{i}"

  def first_nonfinite(self) -> int | None:
    bad = np.asarray(jax.device_get(self.state.nonfinite_step)).reshape(-1)
    bad = bad[bad >= 0]
    return int(bad.min()) if bad.size else None

  def save(self, step: int, *, block: bool = False) -> None:
    if self.first_nonfinite() is not None:
      return
    # orbax waits for the previous save before starting this one anyway; waiting here lets
    # the checksums of that (now complete) step be recorded first.
    self.record_checksums()
    checkpoint.save_run(self.manager, step, self.state,
                        {"format": RUN_CHECKPOINT_FORMAT, "data": self.exp.train_data.get_state(),
                         "runs": self.runs, "teacher": self.teacher,
                         "fingerprint": self.fingerprint, "diagnostics": self.diag.state()})
    self._unchecked.append(step)
    if block:
      self.record_checksums()

  def record_checksums(self) -> None:
    """Waits for the save in flight, then records the checksums of every completed step."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unchecked:
        where = checkpoint.step_directory(self.manager, step)
        if os.path.isdir(where):  # not already removed by keep=k
          checkpoint.record_checksums(where)
    self._unchecked = []

  def check_finite(self) -> None:
    bad = self.first_nonfinite()
    if bad is None:
      return
    self.record_checksums()
    steps = sorted(self.manager.all_steps())
    where = "no checkpoint had been written yet"
    if steps:
      # The guard checks every floating value of the state (parameters, BatchNorm statistics,
      # optimizer state) before a step is kept, and no step is saved after it fired.
      where = (f"the newest checkpoint, {self.manager.directory}/{steps[-1]}, holds only finite "
               f"values; rerun with the same --workdir to resume from it after fixing the cause "
               f"(e.g. a lower learning rate, with --config.checkpoint.allow_changes=optimizer.lr)"
               + (f", or from an older step with --config.checkpoint.restore_step=N (saved: "
                  f"{', '.join(map(str, steps))})" if len(steps) > 1 else ""))
    # `nonfinite_step` is the state's step counter before the bad update: metrics.jsonl
    # counts that update as step bad + 1.
    raise TrainingDiverged(f"The loss or the state became NaN or inf at step {bad + 1}; "
                           f"{where}.")

  def evaluate_teacher(self, step: int) -> None:
    if self.exp.teacher_eval_step is None or self.teacher is not None:
      return
    result = self.exp.evaluate_teacher()
    self.teacher = {k: v for k, v in result.items() if k != "per_class_recall"}
    self.writer.write(step, self.teacher, prefix="teacher/")
    print(f"Teacher top-1 {self.teacher['top1']:.2f}%", flush=True)

  def evaluate(self, done: int) -> None:
    epoch = math.ceil(done / self.exp.steps_per_epoch)
    results, self.diag.calibration = self.exp.evaluate(self.exp.eval_step,
                                                       jstep.model_variables(self.state))
    for i, (run, result) in enumerate(zip(self.runs, results)):
      path = lambda kind, i=i: os.path.join(self.workdir, f"eval_{kind}{self.suffix(i)}.json")
      if report.record_eval(run, result, epoch, done):
        report.write_json(path("best"), {"epoch": epoch, **result})
      report.write_json(path("last"), {"epoch": epoch, **result})
    scalars = {k: float(np.mean([r[k] for r in results])) for k in ("top1", "top5", "ce")}
    if len(results) > 1:
      scalars.update({f"top1_seed{i}": r["top1"] for i, r in enumerate(results)})
    self.writer.write(done, scalars, prefix="eval/")
    self.diag.write(self.workdir, done, epoch)

  def log(self, done: int, pending: list, progress: report.Progress) -> None:
    fetched = jax.device_get(pending)
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    self.check_finite()
    self.images_per_sec = progress.update(done, {"loss": f"{scalars['loss']:.3f}"})
    if self.images_per_sec is not None:
      scalars["images_per_sec"] = self.images_per_sec
    self.writer.write(done, scalars, prefix="train/")

  def export(self, model: str) -> None:
    """The deployable models (params + BN statistics) in the converter's format: what a
    later `distill` run names as its teacher."""
    variables = jstep.model_variables(self.state)
    for i in range(self.exp.num_seeds):
      checkpoint.save_model_variables(
          os.path.join(self.workdir, "model" + self.suffix(i)),
          jax.tree.map(lambda x, i=i: x[i], variables), model=models.spec(model).name,
          num_classes=self.exp.num_classes, source=f"jaxkd run {self.workdir}{self.suffix(i)}",
          overwrite=True)

  def close(self) -> None:
    self.record_checksums()
    self.manager.close()
    self.writer.close()


def _save_run_info(config: ml_collections.ConfigDict, workdir: str, run: _Run) -> None:
  """config.json and run_info.json, written once the run has started or resumed for sure."""
  if jax.process_index() != 0:
    return
  exp = run.exp
  report.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  info = {"versions": report.versions(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count(),
          "global_batch": exp.spec.batch_size, "steps_per_epoch": exp.steps_per_epoch,
          "total_steps": exp.total_steps, "device_resident_input": exp.spec.data.device_resident,
          "python": sys.version.split()[0]}
  r = run.resumed
  start = {"start_step": run.step, "resumed_from": None if r is None else r.step,
           "pid": os.getpid()}
  if r is not None and r.changes:
    start["allowed_changes"] = [{"field": k, "old": a, "new": b} for k, a, b in r.changes]
  if r is not None and r.skipped:
    start["skipped_checkpoints"] = r.skipped
  jworkdir.record_start(workdir, info, start)


def _train(run: _Run, interrupt: interrupts.Interrupt) -> None:
  """Steps from the run's current step to the end, or until Ctrl-C."""
  exp, spec = run.exp, run.exp.spec
  total, start = exp.total_steps, run.step
  save_every = spec.checkpoint_every_steps or exp.steps_per_epoch
  eval_every = exp.steps_per_epoch * spec.eval_every_epochs
  progress = report.Progress(total, start, spec.batch_size * exp.num_seeds, spec.progress_bar)
  pending = []
  try:
    for step in range(start, total):
      run.state, metrics = exp.train_step(run.state, next(exp.train_data),
                                          exp.teacher_variables)
      done = step + 1
      run.diag.add_step(metrics, done)  # takes the [S, B] weights out before the log
      pending.append(metrics)
      if _due(done, spec.log_every_steps, total):
        run.log(done, pending, progress)
        pending = []
      if _due(done, eval_every, total):
        run.check_finite()
        run.evaluate(done)
      if _due(done, save_every, total):
        run.save(done)
      if interrupt.requested:
        break
  finally:
    progress.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir` and returns its summary.

  The summary (also `workdir/summary.json`): best and last top-1/top-5, the best epoch,
  per-class recall of the last and best evaluations (also `eval_last.json`,
  `eval_best.json`), the teacher's accuracy, images/s. With `num_seeds` > 1: one such
  summary per seed under "seeds" (files `eval_last_seed{i}.json`, ...), and the mean ± std
  of best and last top-1 over seeds; each seed's model is exported to `model_seed{i}`.

  `devices` (default: all) builds the mesh from a subset, for tests and benchmarks.
  """
  jconfig.validate(config, device_count=len(devices) if devices else jax.device_count())
  spec = jconfig.resolve(config)
  workdir = os.path.abspath(workdir)
  jworkdir.prepare(workdir, spec.teacher_checkpoint)
  for i in range(len(spec.seeds)):  # the folders `_Run.export` writes at the end
    try:
      checkpoint.check_replaceable(
          os.path.join(workdir, "model" + ("" if len(spec.seeds) == 1 else f"_seed{i}")),
          overwrite=True)
    except checkpoint.ModelExistsError as e:
      raise RunError(f"the run would export its model there at the end, but {e}.") from None
  with jworkdir.WorkdirLock(workdir, active=jax.process_index() == 0):
    if spec.objective.targets == "teacher":
      check_teacher(spec, jdata.spec(spec.data.name, **dict(spec.data.spec_overrides)).num_classes)
    # A changed config stops the run here, before any data is read or anything compiled.
    resume.precheck(os.path.join(workdir, "checkpoints"), fmt=RUN_CHECKPOINT_FORMAT,
                    fingerprint=jworkdir.fingerprint(spec), allowed=spec.allow_changes,
                    restore_step=spec.restore_step)
    exp = Experiment(spec, devices)
    try:
      return _train_and_evaluate(config, spec, exp, workdir)
    finally:
      exp.train_data.close()
      exp.eval_data.close()


def _train_and_evaluate(config, spec, exp, workdir):
  run = _Run(exp, workdir)
  _save_run_info(config, workdir, run)
  try:
    run.evaluate_teacher(run.step)
    run.diag.start(exp.teacher_variables)
    with interrupts.Interrupt() as interrupt:
      _train(run, interrupt)
    if interrupt.requested:
      step = run.step
      if run.manager.latest_step() != step:
        run.save(step, block=True)
      name = signal.Signals(interrupt.signum).name
      print(f"Interrupted: saved step {step} in {run.manager.directory} ({name}); rerun with "
            f"the same --workdir to resume.", flush=True)
      raise Interrupted(interrupt.signum)
    run.manager.wait_until_finished()
    run.check_finite()
    run.export(spec.model)
    run.diag.finish(jstep.model_variables(run.state), workdir, run.step)
    final = report.final_summary(
        run.runs, teacher=run.teacher, images_per_sec=run.images_per_sec, steps=run.step,
        model=spec.model, mode=spec.mode, method=spec.method)
    report.write_json(os.path.join(workdir, "summary.json"), final)
    return final
  finally:
    run.close()
