"""The language-model trainer: an `LMRunSpec` wired to text, models and checkpoints.

    summary = train_and_evaluate(config, workdir)   # config: configs/lm.py, task "lm"

`teacher` trains a causal LM with next-token CE and exports it to `workdir/model`;
`distill` trains a student from that frozen teacher with one method, or several at once
(a sweep: every student sees the same batches and the same initialisation, and the
teacher's forward runs once per batch for all of them; each writes `workdir/<method>/`).
One jitted step over a data-parallel mesh of all devices: the batch sharded over devices,
parameters and optimizer state replicated, or split over the devices with `fsdp`
(`sharding.fsdp_sharded`). Checkpoints every `checkpoint.every_steps` hold the states and
the data iterator's position, so a killed run resumes exactly; Ctrl-C / SIGTERM saves first.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import checkpoint
from jaxkd import lm_config
from jaxkd import sharding
from jaxkd.data import text
from jaxkd.data import text_builder
from jaxkd.data import text_loader
from jaxkd.models import transformer
from jaxkd.train import interrupts
from jaxkd.train import lm_export
from jaxkd.train import lm_results
from jaxkd.train import lm_step
from jaxkd.train import report
from jaxkd.train import resume
from jaxkd.train import workdir as jworkdir

RUN_FORMAT = "jaxkd-lm-run-1"


class TrainingDiverged(RuntimeError):
  """A loss became NaN or inf; the last good checkpoint is untouched."""


def prepare_dataset(spec: lm_config.LMRunSpec) -> str:
  """The prepared dataset folder of the spec's corpus (prepared on first use)."""
  kw = dict(vocab_size=spec.vocab_size, seq_len=spec.seq_len,
            heldout_fraction=spec.heldout_fraction)
  if spec.corpus == "fortunes":
    return text_builder.ensure_fortunes(spec.data_dir, **kw)
  return text_builder.prepare_text(spec.corpus, spec.data_dir, **kw)


def objective(spec: lm_config.LMRunSpec, method: str) -> lm_step.DistillConfig:
  loss = spec.loss
  ce, kd = (1.0, 0.0) if method == "ce" else (loss["ce_weight"], loss["kd_weight"])
  return lm_step.DistillConfig(method=method, temperature=loss["temperature"],
                               weighting_temperature=loss["weighting_temperature"],
                               ce_weight=ce, kd_weight=kd, divergence=loss["divergence"],
                               chunk_size=loss["chunk_size"])


class LMExperiment:
  """Mesh, data, models, teacher and compiled steps, built once from a spec."""

  def __init__(self, spec: lm_config.LMRunSpec, devices=None):
    self.spec = spec
    self.mesh = mesh = sharding.make_mesh(devices)
    self.dataset = prepare_dataset(spec)
    self.tokenizer_path = os.path.join(self.dataset, "tokenizer.json")
    info = text_builder.dataset_info(self.dataset)
    self.vocab_size, pad_id = int(info["vocab_size"]), int(info["pad_id"])
    train_rows = text_builder.load_rows(self.dataset, "train")
    val_rows = text_builder.load_rows(self.dataset, "validation")
    if len(train_rows) < spec.batch_size:
      raise lm_config.ConfigError(
          f"config.batch_size={spec.batch_size} is more than the {len(train_rows)} training "
          f"rows of {self.dataset}; use a smaller batch or a larger corpus.")
    self.unigram_ppl = text.unigram_perplexity(train_rows, val_rows, self.vocab_size, pad_id)
    on_device = spec.device_resident and text_loader.fits_on_device(train_rows)
    loader = text_loader.DeviceTextLoader if on_device else text_loader.TextLoader
    self.train_data = loader(train_rows, global_batch=spec.batch_size, mesh=mesh,
                             seed=spec.seed, pad_id=pad_id, fingerprint={"dataset": self.dataset})
    self.eval_data = loader(val_rows, global_batch=spec.eval_batch_size, mesh=mesh,
                            train=False, pad_id=pad_id)
    dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    self.student = transformer.create_lm(spec.model, self.vocab_size, dtype=dtype)
    self.cfgs = tuple(objective(spec, m) for m in spec.members)
    o = spec.optimizer
    self.tx, self.schedule = lm_step.make_optimizer(
        o["lr"], warmup_steps=spec.warmup_steps, total_steps=spec.steps,
        weight_decay=o["weight_decay"], b1=o["b1"], b2=o["b2"], clip_norm=o["clip_norm"],
        end_ratio=o["end_ratio"])
    place = (lambda tree: sharding.fsdp_sharded(tree, mesh)) if spec.fsdp else (
        lambda tree: jax.tree.map(lambda _: sharding.replicated(mesh), tree))
    self.state_sharding = place(jax.eval_shape(self._init, jax.random.key(0)))
    self.init_state = jax.jit(self._init, out_shardings=self.state_sharding)
    self.teacher, self.teacher_params, self.teacher_meta = None, None, None
    if spec.needs_teacher:
      self._restore_teacher(dtype, place)
    repl = sharding.replicated(mesh)
    self.train_step = jax.jit(
        functools.partial(lm_step.train_step, student=self.student, teacher=self.teacher,
                          tx=self.tx, cfgs=self.cfgs),
        donate_argnums=(0,), out_shardings=(self.state_sharding, repl))
    chunk = spec.loss["chunk_size"]
    self.eval_step = jax.jit(lambda params, tp, batch: tuple(
        lm_step.eval_sums(p, batch, model=self.student, teacher=self.teacher,
                          teacher_params=tp, cfg=c, chunk_size=chunk)
        for p, c in zip(params, self.cfgs)), out_shardings=repl)
    self.teacher_eval_step = None
    if self.teacher is not None:
      self.teacher_eval_step = jax.jit(lambda tp, batch: lm_step.eval_sums(
          {"model": tp}, batch, model=self.teacher, chunk_size=chunk), out_shardings=repl)

  def _init(self, key):
    # Every member starts from the same student (the paired comparison of a sweep).
    return tuple(lm_step.init_state(self.student, self.tx, key, self.spec.seq_len, c)
                 for c in self.cfgs)

  def _restore_teacher(self, dtype, place) -> None:
    spec, where = self.spec, self.spec.teacher_checkpoint
    meta = lm_export.read_metadata(where)
    lm_export.check_fits(meta, directory=where, model=spec.teacher_model,
                         vocab_size=self.vocab_size, tokenizer_path=self.tokenizer_path)
    self.teacher = transformer.create_lm(spec.teacher_model, self.vocab_size, dtype=dtype)
    like = jax.eval_shape(lambda k: self.teacher.init(
        k, jnp.zeros((1, spec.seq_len), jnp.int32))["params"], jax.random.key(0))
    self.teacher_params = lm_export.restore(where, like, place(like))
    self.teacher_meta = meta

  def evaluate(self, states) -> list[dict[str, Any]]:
    """Per member, `lm_results.eval_metrics` over the whole validation split."""
    params = tuple(s.params for s in states)
    totals = [None] * len(states)
    for step in range(self.eval_data.steps_per_epoch):
      sums = jax.device_get(self.eval_step(params, self.teacher_params,
                                           self.eval_data.batch_at(step)))
      totals = [lm_results.add_sums(t, s) for t, s in zip(totals, sums)]
    return [lm_results.eval_metrics(t, self.vocab_size) for t in totals]

  def evaluate_teacher(self) -> dict[str, Any]:
    total = None
    for step in range(self.eval_data.steps_per_epoch):
      total = lm_results.add_sums(total, jax.device_get(self.teacher_eval_step(
          self.teacher_params, self.eval_data.batch_at(step))))
    return {"model": self.spec.teacher_model, **lm_results.eval_metrics(total, self.vocab_size)}


def _due(done: int, every: int, total: int) -> bool:
  return done == total or (every > 0 and done % every == 0)


class _Run:
  """The states, checkpoints and each member's outputs (folder, metrics, evaluations)."""

  def __init__(self, exp: LMExperiment, workdir: str):
    self.exp, self.workdir, spec = exp, workdir, exp.spec
    self.fingerprint = {k: v for k, v in jworkdir.fingerprint(spec).items()
                        if k.split(".")[0] not in lm_config.NOT_IN_FINGERPRINT}
    self.manager = checkpoint.run_manager(os.path.join(workdir, "checkpoints"),
                                          keep=spec.checkpoint_keep,
                                          async_save=not sharding.multi_device_cpu())
    self.state = exp.init_state(jax.random.key(spec.seed))
    self.folders = ([os.path.join(workdir, m) for m in spec.members] if spec.sweep
                    else [workdir])
    self.histories = [{} for _ in spec.members]
    self.teacher, self.tokens_per_sec = None, None
    self.resumed = resume.restore(self.manager, self.state, workdir=workdir, fmt=RUN_FORMAT,
                                  fingerprint=self.fingerprint, allowed=spec.allow_changes,
                                  restore_step=spec.restore_step)
    if self.resumed is not None:
      meta = self.resumed.meta
      self.state, self.histories = self.resumed.state, meta["histories"]
      self.teacher = meta.get("teacher")
      exp.train_data.set_state(meta["data"])
      print(f"Resumed from {self.manager.directory}/{self.resumed.step}.", flush=True)
    purge = None if self.resumed is None else self.resumed.step + 1
    self.writers = []
    for folder in self.folders:
      if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        if self.resumed is not None:
          jworkdir.drop_replayed_metrics(folder, self.resumed.step)
      self.writers.append(report.MetricWriter(folder, purge))
    self._unchecked = []

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state[0].step))

  def save(self, step: int, *, block: bool = False) -> None:
    self.record_checksums()
    checkpoint.save_run(self.manager, step, self.state, {
        "format": RUN_FORMAT, "data": self.exp.train_data.get_state(),
        "histories": self.histories, "teacher": self.teacher, "fingerprint": self.fingerprint})
    self._unchecked.append(step)
    if block:
      self.record_checksums()

  def record_checksums(self) -> None:
    """Waits for the save in flight, then records the checksums of every completed step."""
    checkpoint.record_saved_checksums(self.manager, self._unchecked)
    self._unchecked = []

  def log(self, done: int, pending: list, progress: report.Progress) -> None:
    """Writes the mean of each member's metrics since the last log; stops on NaN/inf."""
    fetched = jax.device_get(pending)  # per step, a tuple of per-member metric dicts
    self.tokens_per_sec = progress.update(done, {"loss": f"{fetched[-1][0]['loss']:.3f}"})
    for i, (name, writer) in enumerate(zip(self.exp.spec.members, self.writers)):
      rows = [step[i] for step in fetched]
      if not all(np.isfinite(float(r["loss"])) for r in rows):
        self.record_checksums()
        raise TrainingDiverged(
            f"the loss of {name} became NaN or inf by step {done}; "
            f"{resume.after_divergence(self.manager)}.")
      means = {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}
      means["lr"] = float(self.exp.schedule(done - 1))
      if self.tokens_per_sec is not None:
        means["tokens_per_sec"] = self.tokens_per_sec
      writer.write(done, means, prefix="train/")

  def evaluate(self, done: int) -> None:
    for name, metrics, history, writer in zip(self.exp.spec.members,
                                              self.exp.evaluate(self.state), self.histories,
                                              self.writers):
      lm_results.record(history, metrics, done)
      writer.write(done, lm_results.scalars(metrics), prefix="eval/")
      print(f"step {done} {name}: validation perplexity {metrics['val_ppl']:.2f}, token "
            f"accuracy {metrics['val_acc']:.2f}%", flush=True)

  def evaluate_teacher(self) -> None:
    if self.exp.teacher is None or self.teacher is not None:
      return
    self.teacher = self.exp.evaluate_teacher()
    print(f"Teacher {self.teacher['model']}: validation perplexity "
          f"{self.teacher['val_ppl']:.2f}", flush=True)

  def close(self) -> None:
    self.record_checksums()
    self.manager.close()
    for w in self.writers:
      w.close()


def _train(run: _Run, interrupt: interrupts.Interrupt) -> None:
  exp, spec = run.exp, run.exp.spec
  total, start = spec.steps, run.step
  progress = report.Progress(total, start, spec.batch_size * spec.seq_len, spec.progress_bar)
  pending = []
  # XLA:CPU can deadlock when two programs with collectives are in flight on several CPU
  # devices (the next batch's gather and this step): there, one step at a time.
  serial = sharding.multi_device_cpu()
  try:
    for step in range(start, total):
      run.state, metrics = exp.train_step(run.state, exp.teacher_params, next(exp.train_data))
      if serial:
        jax.block_until_ready(run.state)
      done = step + 1
      pending.append(metrics)
      saving = _due(done, spec.checkpoint_every_steps, total) or interrupt.requested
      # A checkpoint is written only after its steps' losses are seen to be finite.
      if _due(done, spec.log_every_steps, total) or saving:
        run.log(done, pending, progress)
        pending = []
      if _due(done, spec.eval_every_steps, total):
        run.evaluate(done)
      if saving and _due(done, spec.checkpoint_every_steps, total):
        run.save(done)
      if interrupt.requested:
        break
  finally:
    progress.close()


def _info(exp: LMExperiment) -> dict[str, Any]:
  return {"versions": report.versions(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count(),
          "dataset": exp.dataset, "vocab_size": exp.vocab_size,
          "train_rows": exp.train_data.num_examples, "global_batch": exp.spec.batch_size,
          "tokens_per_step": exp.spec.batch_size * exp.spec.seq_len, "fsdp": exp.spec.fsdp,
          "python": sys.version.split()[0]}


def train_and_evaluate(config, workdir: str, *, devices=None) -> dict[str, Any]:
  """Trains (or resumes) the language-model run of `config` in `workdir`; returns its
  summary (`lm_results.member_summary`; a sweep: the members' summaries and the table, also
  `workdir/summary.json` and `summary.md`). `devices` (default: all) for tests."""
  lm_config.validate(config, device_count=len(devices) if devices else jax.device_count())
  spec = lm_config.resolve(config)
  workdir = os.path.abspath(workdir)
  jworkdir.prepare(workdir, spec.teacher_checkpoint)
  with jworkdir.WorkdirLock(workdir, active=jax.process_index() == 0):
    exp = LMExperiment(spec, devices)
    run = _Run(exp, workdir)
    try:
      if jax.process_index() == 0:
        report.write_json(os.path.join(workdir, "config.json"),
                          json.loads(config.to_json_best_effort()))
        r = run.resumed
        jworkdir.record_start(workdir, _info(exp), {
            "start_step": run.step, "resumed_from": None if r is None else r.step,
            "pid": os.getpid()})
      return _finish(run, spec, workdir)
    finally:
      run.close()


def _finish(run: _Run, spec: lm_config.LMRunSpec, workdir: str) -> dict[str, Any]:
  exp = run.exp
  run.evaluate_teacher()
  with interrupts.Interrupt() as interrupt:
    _train(run, interrupt)
  if interrupt.requested:
    step = run.step
    if run.manager.latest_step() != step:
      run.save(step, block=True)
    print(f"Interrupted: saved step {step} in {run.manager.directory} "
          f"({signal.Signals(interrupt.signum).name}); rerun with the same --workdir to "
          f"resume.", flush=True)
    raise interrupts.Interrupted(interrupt.signum)
  run.record_checksums()
  summaries = []
  for name, state, history, folder in zip(spec.members, run.state, run.histories,
                                          run.folders):
    lm_export.save(os.path.join(folder, "model"), state.params["model"], model=spec.model,
                   vocab_size=exp.vocab_size, tokenizer_path=exp.tokenizer_path,
                   dataset=exp.dataset, method=name, steps=run.step)
    s = lm_results.member_summary(
        history, mode=spec.mode, method=name, model=spec.model,
        teacher_model=spec.teacher_model, steps=run.step, tokens=run.step * spec.batch_size
        * spec.seq_len, tokens_per_sec=run.tokens_per_sec, unigram_ppl=exp.unigram_ppl,
        teacher=run.teacher, dataset=exp.dataset)
    report.write_json(os.path.join(folder, "summary.json"), s)
    summaries.append(s)
  if not spec.sweep:
    return summaries[0]
  table = lm_results.format_table(
      [lm_results.table_row(s["method"], s) for s in summaries], unigram_ppl=exp.unigram_ppl,
      teacher=run.teacher, title=f"Validation perplexity per method ({spec.steps} steps, "
      f"{jax.devices()[0].device_kind})")
  summary = {"format": lm_results.SWEEP_FORMAT, "members": summaries, "table": table,
             "teacher": run.teacher, "unigram_ppl": exp.unigram_ppl,
             "tokens_per_sec": run.tokens_per_sec, "students_per_step": len(summaries)}
  report.write_json(os.path.join(workdir, "summary.json"), summary)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(table + "\n")
  print("\n" + table, flush=True)
  return summary
