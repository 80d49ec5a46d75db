"""The trainer: a RunSpec wired to data, models and checkpoints, and the loop that runs it.

Three modes (docs/METHODS.md): `teacher` (supervised CE training of any model; its result is a
teacher), `distill` (two-stage KD: a frozen teacher restored from a model checkpoint runs in
inference mode inside the same jitted step, under stop_gradient), `self_distill` (one-stage
PS-KD: the model's own previous-epoch predictions, kept per example in the train state, are
the soft targets; optionally IPW-weighted).

One jitted step trains M × S ≥ 1 students (members × seeds; a sweep has M > 1 objectives
sharing one teacher forward, docs/DESIGN.md#sweeps) over a data-parallel mesh of all devices:
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
from jaxkd.train import compare
from jaxkd.train import interrupts
from jaxkd.train import members as jmembers
from jaxkd.train import report
from jaxkd.train import resume
from jaxkd.train import step as jstep
from jaxkd.train import teacher as jteacher
from jaxkd.train import workdir as jworkdir

IncompatibleCheckpointError = resume.IncompatibleCheckpointError
RunError = jworkdir.RunError


class TrainingDiverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is untouched."""


Interrupted = interrupts.Interrupted


# The layout of a run checkpoint (per member a train state with a leading seed axis; data
# state; per member its seeds' summaries); a checkpoint of another layout is refused with a clear message.
RUN_CHECKPOINT_FORMAT = "jaxkd-run-3"


class Experiment:
  """Mesh, data, teacher and compiled steps, built once from a RunSpec.

  With S = len(spec.seeds) > 1, S independent students (their own initialisation and data
  order, each at the recipe's batch size) train in one jitted step over a train state with a
  leading seed axis; `spec.seeds_per_vmap` of them are vectorised together (0: the platform's
  default, `step.default_seeds_per_vmap`). S = 1 is the same path with one seed. Each of the
  M members (`spec.members`) has such a state, and all share each seed's batch and teacher
  forward (`step.sweep_train_step`).
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
    self.teacher_variables, teacher_model = None, None
    if spec.needs_teacher:
      self.teacher_variables, teacher_model = jteacher.restore(spec, self.num_classes, self.mesh)
    self.step_configs = tuple(jstep.make_step_config(
        model=spec.model, num_classes=self.num_classes, objective=m.objective,
        optimizer=spec.optimizer, steps_per_epoch=self.steps_per_epoch,
        num_epochs=spec.num_epochs, teacher_model=teacher_model, dtype=spec.dtype)
        for m in spec.members)
    self.step_config = self.step_configs[0]
    self.teacher = next((c.teacher for c in self.step_configs if c.teacher is not None), None)
    repl = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        functools.partial(jstep.sweep_train_step, self.step_configs,
                          seeds_per_vmap=self.seeds_per_vmap),
        donate_argnums=(0,), out_shardings=(repl, repl))
    self.eval_step = jax.jit(
        functools.partial(jstep.seeds_eval_step, self.step_config.model, self.num_classes,
                          seeds_per_vmap=self.seeds_per_vmap), out_shardings=repl)
    self.teacher_eval_step = None
    if self.teacher is not None:
      self.teacher_eval_step = jax.jit(
          functools.partial(jstep.seeds_eval_step, self.teacher, self.num_classes),
          out_shardings=repl)

  def init_state(self) -> tuple[jstep.TrainState, ...]:
    """Fresh states, one per member with a leading seed axis, born replicated on the mesh.
    Seed s initialises the student alike in every member (the paired comparison)."""
    keys = jnp.stack([jax.random.key(s) for s in self.spec.seeds])
    inits = [functools.partial(jstep.init_train_state, cfg, image_shape=self.ds_spec.image_shape,
                               feature_dim=models.feature_dim(self.spec.model),
                               index_size=self.train_data.index_size)
             for cfg in self.step_configs]
    # One program for every member: one compilation, not M.
    return jax.jit(lambda k: tuple(jstep.map_seeds(init, k) for init in inits),
                   out_shardings=sharding.replicated(self.mesh))(keys)

  def evaluate(self, eval_step, variables) -> tuple[list[dict[str, Any]], list[dict]]:
    """Per seed of `variables` (leading seed axis): eval summary, calibration (diagnose)."""
    return diagnose.evaluate(eval_step, variables, self.eval_data)

  def evaluate_teacher(self) -> dict[str, Any]:
    variables = jax.tree.map(lambda x: x[None], self.teacher_variables)
    return self.evaluate(self.teacher_eval_step, variables)[0][0]


def _due(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, evaluate, save) runs after `done` steps."""
  return done == total or (every > 0 and done % every == 0)


class _Run:
  """A run's mutable state: the members' train states, checkpoints, and each member's
  outputs (`members.MemberRun`)."""

  def __init__(self, exp: Experiment, workdir: str):
    self.exp, self.workdir = exp, workdir
    spec = exp.spec
    self.fingerprint = jworkdir.fingerprint(spec)
    self.manager = checkpoint.run_manager(os.path.join(workdir, "checkpoints"),
                                          keep=spec.checkpoint_keep,
                                          async_save=not sharding.multi_device_cpu())
    self.state = exp.init_state()
    self.teacher = None
    self.images_per_sec = None
    self.resumed = resume.restore(
        self.manager, self.state, workdir=workdir, fmt=RUN_CHECKPOINT_FORMAT,
        fingerprint=self.fingerprint, allowed=spec.allow_changes,
        restore_step=spec.restore_step)
    saved = [None] * len(spec.members)
    if self.resumed is not None:
      meta = self.resumed.meta
      self.state, self.teacher, saved = self.resumed.state, meta.get("teacher"), meta["members"]
      exp.train_data.set_state(meta["data"])
      if jax.process_index() == 0:
        for folder in self.folders():
          jworkdir.drop_replayed_metrics(folder, self.resumed.step)
      print(f"Resumed from {self.manager.directory}/{self.resumed.step}.", flush=True)
    purge = None if self.resumed is None else self.resumed.step + 1
    self.members = [jmembers.MemberRun(exp, m, folder, saved[m], purge)
                    for m, folder in enumerate(self.folders())]
    self._unchecked = []  # saved steps whose checksums are not recorded yet

  def folders(self) -> list[str]:
    """Each member's output folder: the workdir itself for a single run."""
    if not self.exp.spec.sweep:
      return [self.workdir]
    return [os.path.join(self.workdir, m.name) for m in self.exp.spec.members]

  @property
  def step(self) -> int:
    return int(max(np.max(jax.device_get(s.step)) for s in self.state))

  @property
  def num_students(self) -> int:
    return len(self.members) * self.exp.num_seeds

  def nonfinite(self) -> list[np.ndarray]:
    """Per member, [S] steps at which each student's state stopped (−1: still finite)."""
    return [np.asarray(x).reshape(-1) for x in jax.device_get(
        [s.nonfinite_step for s in self.state])]

  def save(self, step: int, *, block: bool = False) -> None:
    # A diverged student's state is frozen at its last finite value (the step's guard), so a
    # sweep saves on; a single student's run stops instead (`check_finite`).
    if self.num_students == 1 and self.nonfinite()[0][0] >= 0:
      return
    # orbax waits for the previous save before starting this one anyway; waiting here lets
    # the checksums of that (now complete) step be recorded first.
    self.record_checksums()
    checkpoint.save_run(self.manager, step, self.state,
                        {"format": RUN_CHECKPOINT_FORMAT, "data": self.exp.train_data.get_state(),
                         "members": [m.state() for m in self.members], "teacher": self.teacher,
                         "fingerprint": self.fingerprint})
    self._unchecked.append(step)
    if block:
      self.record_checksums()

  def record_checksums(self) -> None:
    """Waits for the save in flight, then records the checksums of every completed step."""
    checkpoint.record_saved_checksums(self.manager, self._unchecked)
    self._unchecked = []

  def check_finite(self) -> None:
    """Reports students whose state became non-finite; raises once none is left."""
    bad = self.nonfinite()
    for member, steps in zip(self.members, bad):
      for i in member.mark_diverged(steps):
        if self.num_students > 1:
          print(f"Student {member.name} seed {self.exp.spec.seeds[i]} diverged (NaN or inf) at "
                f"step {member.runs[i]['diverged_at_step']}; it is frozen at its last finite "
                f"state and left out of the comparison, the others go on.", flush=True)
    if not all(np.all(b >= 0) for b in bad):
      return
    self.record_checksums()
    where = resume.after_divergence(self.manager)
    # `nonfinite_step` is the state's step counter before the bad update: metrics.jsonl
    # counts that update as step bad + 1.
    first = int(min(b.min() for b in bad)) + 1
    what = (f"The loss or the state became NaN or inf at step {first}" if self.num_students == 1
            else f"Every student diverged (NaN or inf), the first at step {first}")
    raise TrainingDiverged(f"{what}; {where}.")

  def evaluate_teacher(self, step: int) -> None:
    if self.exp.teacher_eval_step is None or self.teacher is not None:
      return
    result = self.exp.evaluate_teacher()
    self.teacher = {k: v for k, v in result.items() if k != "per_class_recall"}
    for m in self.members:
      m.writer.write(step, self.teacher, prefix="teacher/")
    print(f"Teacher top-1 {self.teacher['top1']:.2f}%", flush=True)

  def start_diagnostics(self) -> None:
    known = None  # the teacher's class mass: one pass over the training set for all members
    for m in self.members:
      m.diag.start(self.exp.teacher_variables, known)
      known = known or m.diag.teacher_mass

  def evaluate(self, done: int) -> None:
    for m, state in zip(self.members, self.state):
      m.evaluate(jstep.model_variables(state), done)

  def log(self, done: int, pending: list, progress: report.Progress) -> None:
    fetched = jax.device_get(pending)  # per step, an M-tuple of [S] metrics
    self.check_finite()
    loss = np.mean([np.mean(m["loss"]) for step in fetched for m in step])
    self.images_per_sec = progress.update(done, {"loss": f"{loss:.3f}"})
    for i, m in enumerate(self.members):
      m.log(done, [step[i] for step in fetched], self.images_per_sec)

  def close(self) -> None:
    self.record_checksums()
    self.manager.close()
    for m in self.members:
      m.close()


def _save_run_info(config: ml_collections.ConfigDict, workdir: str, run: _Run) -> None:
  """config.json and run_info.json, written once the run has started or resumed for sure;
  in a sweep also each member's own (single-run) config and the run's info in its folder."""
  if jax.process_index() != 0:
    return
  exp = run.exp
  as_json = lambda c: json.loads(c.to_json_best_effort())
  report.write_json(os.path.join(workdir, "config.json"), as_json(config))
  info = {"versions": report.versions(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count(),
          "global_batch": exp.spec.batch_size, "steps_per_epoch": exp.steps_per_epoch,
          "total_steps": exp.total_steps, "device_resident_input": exp.spec.data.device_resident,
          "python": sys.version.split()[0]}
  if exp.spec.sweep:
    info["members"] = [m.name for m in exp.spec.members]
    for m in run.members:
      report.write_json(os.path.join(m.folder, "config.json"),
                        as_json(jconfig.member_config(config, m.name)))
      report.write_json(os.path.join(m.folder, "run_info.json"), info)
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
  progress = report.Progress(total, start, spec.batch_size * run.num_students,
                             spec.progress_bar)
  pending = []
  try:
    for step in range(start, total):
      run.state, metrics = exp.train_step(run.state, next(exp.train_data),
                                          exp.teacher_variables)
      done = step + 1
      for member, m in zip(run.members, metrics):
        member.diag.add_step(m, done)  # takes the [S, B] weights out before the log
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
  A sweep writes that summary per member in `workdir/<member>/` and returns the comparison
  (`compare.sweep_summary`, also `workdir/summary.json` and `summary.md`).

  `devices` (default: all) builds the mesh from a subset, for tests and benchmarks.
  """
  jconfig.validate(config, device_count=len(devices) if devices else jax.device_count())
  spec = jconfig.resolve(config)
  workdir = os.path.abspath(workdir)
  jworkdir.prepare(workdir, spec.teacher_checkpoint)
  for m in spec.members:  # the folders `MemberRun.export` writes at the end
    folder = os.path.join(workdir, m.name) if spec.sweep else workdir
    for i in range(len(spec.seeds)):
      try:
        checkpoint.check_replaceable(
            os.path.join(folder, "model" + ("" if len(spec.seeds) == 1 else f"_seed{i}")),
            overwrite=True)
      except checkpoint.ModelExistsError as e:
        raise RunError(f"the run would export its model there at the end, but {e}.") from None
  with jworkdir.WorkdirLock(workdir, active=jax.process_index() == 0):
    if spec.needs_teacher:
      jteacher.check(spec, jdata.spec(spec.data.name, **dict(spec.data.spec_overrides)).num_classes)
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
    run.start_diagnostics()
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
    finals = []
    for m, state in zip(run.members, run.state):
      m.export(jstep.model_variables(state))
      finals.append(m.finish(jstep.model_variables(state), run.step, teacher=run.teacher,
                             images_per_sec=run.images_per_sec))
    if not spec.sweep:
      return finals[0]
    summary = compare.sweep_summary(
        [{"name": m.name, "method": m.method, "seeds": m.runs} for m in run.members],
        model=spec.model, teacher_model=spec.teacher_model, teacher=run.teacher,
        seeds=list(spec.seeds), steps=run.step, images_per_sec=run.images_per_sec,
        students_per_step=run.num_students)
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    table = compare.format_table(summary)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)
    return summary
  finally:
    run.close()
