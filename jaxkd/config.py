"""Configs: defaults, method presets, validation, and the resolved run.

A config is an `ml_collections.ConfigDict`; `default_config()` lists every field with the
CIFAR-100 recipe (docs/METHODS.md#cifar-100). `validate(config)` checks it before anything
heavy starts and raises `ConfigError` with one message that says what is wrong and what to
do. `resolve(config)` turns it, once, into a frozen `RunSpec`: the only place where a mode
and a method become concrete objective settings. The trainer reads the `RunSpec`, never the
config.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxkd import objectives
from jaxkd import optim
# The presets that config files apply, and the error every check raises.
from jaxkd.presets import (REFERENCE_CIFAR_ENTROPY_UPPER_BOUND, ConfigError, apply_method,
                           apply_smoke, parse_arg, teacher_commands)


MODES = ("teacher", "distill", "self_distill")
DTYPES = ("float32", "bfloat16")
# Where each mode's soft targets come from (objectives.TARGETS).
_TARGETS = {"teacher": "labels", "distill": "teacher", "self_distill": "self"}


def default_config() -> ml_collections.ConfigDict:
  """Every field, with the CIFAR-100 KD recipe (240 epochs, batch 64, SGD 0.05)."""
  c = ml_collections.ConfigDict()
  c.mode = "distill"                          # teacher (supervised) | distill | self_distill
  c.method = "kd"
  c.model = "resnet8x4"                       # the student (the model trained in any mode)
  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "resnet32x4"
  c.teacher.checkpoint = ""                   # an orbax folder from `teacher` or jaxkd.convert

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "cifar100"
  c.dataset.data_dir = config_dict.placeholder(str)       # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.dataset.input = "auto"                    # auto | device | host
  c.dataset.num_workers = 0                   # host pipeline decode/augment processes
  c.dataset.long_tail_factor = config_dict.placeholder(float)  # e.g. 100 for CIFAR-100-LT
  c.dataset.long_tail_seed = 0

  c.batch_size = 64                           # global: never changes with the device count
  c.eval_batch_size = 256
  c.num_epochs = 240
  c.max_steps = 0                             # > 0: stop early (smoke tests)
  c.seed = 0
  c.num_seeds = 1                             # > 1: seeds seed..seed+S-1 trained in one step
  c.seeds_per_vmap = 0                        # seeds vectorised together; 0: all on GPU/TPU, 1 on CPU
  c.dtype = "float32"                         # compute dtype of teacher and student
  # A sweep: these members (method names, or names of sweep_members) train together, every
  # member × seed its own student, from one teacher forward per batch (docs/DESIGN.md#sweeps).
  c.sweep = ()
  c.sweep_members = ml_collections.ConfigDict()  # name -> {"method": M, "loss": {overrides}}

  c.optimizer = ml_collections.ConfigDict(dataclasses.asdict(optim.OptimizerConfig()))

  c.loss = ml_collections.ConfigDict(dataclasses.asdict(objectives.LossConfig()))
  for key, kind in (("entropy_upper_bound", float), ("ipw_max_weight", float),
                    ("normalize", str)):
    c.loss[key] = config_dict.placeholder(kind)

  c.self_distill = ml_collections.ConfigDict()
  c.self_distill.alpha_final = 0.8            # PS-KD's alpha_T
  c.self_distill.ipw_start_epoch = 1          # IPW weights from this epoch (counted from 1)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0                # 0: at the end of every epoch
  c.checkpoint.keep = 3                       # the newest k steps are kept (≥ 1)
  c.checkpoint.restore_step = 0               # > 0: resume from this saved step, not the newest
  c.checkpoint.allow_changes = ""             # e.g. "num_epochs,optimizer.lr": fields a resume
                                              # may change (docs/DESIGN.md#resume-safety)

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.progress_bar = True
  return c


def _objective(c: ml_collections.ConfigDict) -> objectives.Objective:
  """The objective of a config: a supervised run's loss is plain CE, whatever `c.loss` says."""
  fields = dict(c.loss)
  if c.mode == "teacher":
    fields.update(base="ce", weighting="none", ce_weight=1.0)
  obj = objectives.Objective(
      loss=objectives.loss_config(fields), targets=_TARGETS[c.mode],
      pskd_alpha_final=float(c.self_distill.alpha_final),
      ipw_start_epoch=int(c.self_distill.ipw_start_epoch))
  obj.validate()
  return obj


def validate(c: ml_collections.ConfigDict, *, device_count: int | None = None,
             teacher_from_suite: bool = False) -> None:
  """Raises ConfigError if `c` cannot run; checks are cheap (no data, no compilation).

  `teacher_from_suite`: the teacher checkpoint is made by an earlier run of the same suite,
  so it need not exist yet.
  """
  from jaxkd import data as jdata  # deferred: keeps `import jaxkd.config` light
  from jaxkd import models

  if c.mode not in MODES:
    raise ConfigError(f"config.mode must be one of {MODES}, got {c.mode!r}.")
  if c.method not in objectives.METHODS:
    raise ConfigError(f"unknown method {c.method!r}; known: {', '.join(objectives.METHODS)}.")
  if c.mode == "self_distill" and c.method not in ("kd", "ipwd"):
    raise ConfigError(f"self_distill runs PS-KD ('kd') or PS-KD with IPW ('ipwd'), got method "
                      f"{c.method!r}.")
  try:
    ds = jdata.spec(c.dataset.name)
  except ValueError as e:
    raise ConfigError(f"unknown dataset: {e}") from None
  if c.dataset.input not in ("auto", "device", "host"):
    raise ConfigError(f"config.dataset.input must be auto, device or host, got {c.dataset.input!r}.")
  if c.dataset.input == "device" and not ds.fits_on_device:
    raise ConfigError(f"{ds.name} does not fit the device-resident path; use "
                      f"--config.dataset.input=host.")
  names = [("model", c.model)] + ([("teacher.model", c.teacher.model)]
                                  if c.mode == "distill" else [])
  for field, name in names:
    try:
      spec = models.spec(name)
    except ValueError as e:
      raise ConfigError(f"config.{field}: {e}") from None
    if spec.input_shape[-1] != ds.image_shape[-1]:
      raise ConfigError(f"config.{field}={name} takes {spec.input_shape[-1]}-channel images but "
                        f"{ds.name} has {ds.image_shape[-1]}; pick a {spec.dataset_family} "
                        f"dataset or another model.")
  if sweep_names(c):
    _validate_sweep(c)
  elif c.mode != "teacher" and objectives.METHODS[c.method] != (c.loss.base, c.loss.weighting):
    # A method only names a loss: set alone (--config.method=erkd) it would change the label
    # of the run and not what it trains.
    base, weighting = objectives.METHODS[c.method]
    actual = next((m for m, bw in objectives.METHODS.items()
                   if bw == (c.loss.base, c.loss.weighting)), None)
    raise ConfigError(
        f"config.method={c.method!r} trains loss.base={base!r} with loss.weighting="
        f"{weighting!r}, but this config's loss is base={c.loss.base!r}, weighting="
        f"{c.loss.weighting!r}" + (f" (method {actual!r})" if actual else "") + "; setting "
        f"config.method alone would only relabel the run. Choose the method where the config "
        f"file takes it (e.g. configs/cifar100.py:resnet32x4-resnet8x4,method={c.method}), or "
        f"also set --config.loss.base={base} --config.loss.weighting={weighting}.")
  if not sweep_names(c):
    if c.mode == "distill" and c.loss.base == "ce":
      raise ConfigError("mode 'distill' needs a distillation loss (loss.base kd or dkd); use "
                        "mode 'teacher' for plain CE training.")
    try:
      _objective(c)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if c.dtype not in DTYPES:
    raise ConfigError(f"config.dtype must be one of {DTYPES}, got {c.dtype!r}.")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  for field in ("batch_size", "eval_batch_size", "num_epochs", "num_seeds"):
    if not (is_int(c[field]) and c[field] > 0):
      raise ConfigError(f"config.{field} must be a positive integer, got {c[field]!r}.")
  for field, low, why in (
      ("eval_every_epochs", 1, ""), ("log_every_steps", 0, ""),
      ("checkpoint.every_steps", 0, " (0: at the end of every epoch)"),
      ("checkpoint.keep", 1, ": the newest steps kept; with none the run could never resume"),
      ("checkpoint.restore_step", 0, " (0: the newest step)")):
    value = c[field] if "." not in field else c.checkpoint.get(field.split(".")[1], low)
    if not (is_int(value) and value >= low):
      raise ConfigError(f"config.{field} must be an integer ≥ {low}{why}, got {value!r}.")
  allow = c.checkpoint.get("allow_changes", "")
  if not isinstance(allow, str):
    raise ConfigError(f"config.checkpoint.allow_changes must be a comma-separated string of "
                      f"config fields, got {allow!r}.")
  for name in allow_changes(c):
    try:
      node = c
      for part in name.split("."):
        node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"config.checkpoint.allow_changes names {name!r}, which is not a "
                        f"config field (e.g. num_epochs, optimizer.lr, loss).") from None
  spv = c.get("seeds_per_vmap", 0)
  if not (isinstance(spv, int) and 0 <= spv <= c.num_seeds):
    raise ConfigError(f"config.seeds_per_vmap must be an integer from 0 (automatic) to "
                      f"config.num_seeds={c.num_seeds}, got {spv!r}.")
  try:
    _optimizer(c)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  if device_count is not None:
    for field in ("batch_size", "eval_batch_size"):
      if c[field] % device_count:
        raise ConfigError(
            f"config.{field}={c[field]} is not divisible by the {device_count} devices; the "
            f"global batch is part of the recipe, so choose a multiple of {device_count} "
            f"(e.g. --config.{field}={(c[field] // device_count + 1) * device_count}) or run "
            f"on a number of devices that divides it.")
  if c.mode == "distill" and not teacher_from_suite:
    path = c.teacher.checkpoint
    if not path or not os.path.isdir(path):
      raise ConfigError(
          f"the teacher checkpoint {path or '(config.teacher.checkpoint is empty)'} does not "
          f"exist; " + teacher_commands(c))


_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Folders of a sweep's workdir that a member's folder must not shadow.
_RESERVED_NAMES = ("checkpoints", "report", "tb")


def sweep_names(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The member names of a sweep config, () for a single run."""
  names = c.get("sweep", ()) or ()
  return (names,) if isinstance(names, str) else tuple(names)


def member_config(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The single-run config of sweep member `name`: its method's preset (`apply_method`),
  then `sweep_members[name].loss`; the vanilla student ("ce") trains on the labels."""
  over = dict(c.get("sweep_members", {}) or {}).get(name) or {}
  unknown = sorted(set(over) - {"method", "loss"})
  if unknown:
    raise ConfigError(f"config.sweep_members.{name} takes 'method' and 'loss', not {unknown}.")
  method = over.get("method", name)
  if method not in objectives.METHODS:
    raise ConfigError(f"sweep member {name!r}: unknown method {method!r}; name a method "
                      f"({', '.join(objectives.METHODS)}) or set config.sweep_members.{name}"
                      f".method.")
  m = ml_collections.ConfigDict(c.to_dict())
  m.sweep, m.sweep_members = (), ml_collections.ConfigDict()
  apply_method(m, method)
  try:
    m.loss.update(dict(over.get("loss", {}) or {}))
  except (KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f"config.sweep_members.{name}.loss: {e}") from None
  m.mode = "teacher" if method == "ce" else c.mode
  return m


def _validate_sweep(c: ml_collections.ConfigDict) -> None:
  names = sweep_names(c)
  if c.mode not in ("distill", "teacher"):
    raise ConfigError(f"a sweep trains students from a teacher (mode 'distill') or on labels "
                      f"(mode 'teacher'), not mode {c.mode!r}; run self-distillation singly.")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.sweep names a member twice: {list(names)}.")
  for name in names:
    if not isinstance(name, str) or not _MEMBER_NAME.match(name) or name in _RESERVED_NAMES \
        or name.startswith("model"):
      raise ConfigError(f"sweep member name {name!r} is also its folder in the workdir: use "
                        f"letters, digits, '_', '-', '.' (not {', '.join(_RESERVED_NAMES)} or "
                        f"model*).")
  # Settings for a method left out of the sweep are kept for when it is swept again (the
  # quickstart's DKD warm-up); any other name is a typo.
  extra = sorted(set(dict(c.get("sweep_members", {}) or {})) - set(names)
                 - set(objectives.METHODS))
  if extra:
    raise ConfigError(f"config.sweep_members has {extra}, which config.sweep does not name "
                      f"({list(names)}); add them to the sweep or remove them.")
  for name in names:
    m = member_config(c, name)
    if m.mode == "teacher" and c.mode == "teacher" and m.method != "ce":
      raise ConfigError(f"sweep member {name!r} ({m.method}) distils: set config.mode to "
                        f"'distill' and name the teacher.")
    try:
      _objective(m)
    except ValueError as e:
      raise ConfigError(f"sweep member {name!r}: {e}") from None


def allow_changes(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config fields a resume may change, from `checkpoint.allow_changes` ("a,b.c")."""
  text = c.checkpoint.get("allow_changes", "") or ""
  return tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


def _optimizer(c: ml_collections.ConfigDict) -> optim.OptimizerConfig:
  fields = dict(c.optimizer)
  known = {f.name for f in dataclasses.fields(optim.OptimizerConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"optimizer has unknown option(s) {unknown}; known: {sorted(known)}.")
  fields["milestones"] = tuple(int(m) for m in fields.get("milestones", ()))
  opt = optim.OptimizerConfig(**fields)
  opt.validate()
  return opt


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which data a run reads, and through which pipeline."""
  name: str
  data_dir: str | None
  device_resident: bool
  num_workers: int
  long_tail_factor: float | None
  long_tail_seed: int
  spec_overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Member:
  """One objective of a run: a single run has one, a sweep one per `config.sweep` name."""
  name: str
  method: str
  objective: objectives.Objective


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run is, resolved once from a validated config.

  `teacher_model` and `teacher_checkpoint` are None unless the objective's targets are
  "teacher". `seeds` holds one seed per student trained in the same program.
  """
  mode: str
  method: str
  model: str
  teacher_model: str | None
  teacher_checkpoint: str | None
  objective: objectives.Objective
  optimizer: optim.OptimizerConfig
  data: DataSpec
  batch_size: int
  eval_batch_size: int
  num_epochs: int
  max_steps: int
  seeds: tuple[int, ...]
  seeds_per_vmap: int            # 0: the platform's default
  dtype: str
  checkpoint_every_steps: int    # 0: every epoch
  checkpoint_keep: int
  restore_step: int              # 0: the newest step
  allow_changes: tuple[str, ...]  # config fields a resume may change
  log_every_steps: int
  eval_every_epochs: int
  progress_bar: bool
  sweep: tuple[Member, ...] = ()  # () for a single run

  @property
  def members(self) -> tuple[Member, ...]:
    """The objectives trained together: the sweep's, or the run's own."""
    return self.sweep or (Member(self.method, self.method, self.objective),)

  @property
  def needs_teacher(self) -> bool:
    return any(m.objective.targets == "teacher" for m in self.members)


def resolve(c: ml_collections.ConfigDict) -> RunSpec:
  """The `RunSpec` of a config (validate it first for the user-facing messages)."""
  from jaxkd import data as jdata  # deferred, as in `validate`

  ds = c.dataset
  ds_spec = jdata.spec(ds.name, **dict(ds.get("spec_overrides", {})))
  distill = c.mode == "distill"
  sweep = tuple(Member(n, member_config(c, n).method, _objective(member_config(c, n)))
                for n in sweep_names(c))
  return RunSpec(
      mode=c.mode, method="sweep" if sweep else c.get("method", "kd"), model=c.model,
      teacher_model=(c.teacher.model or None) if distill else None,
      teacher_checkpoint=os.path.abspath(c.teacher.checkpoint) if distill else None,
      objective=sweep[0].objective if sweep else _objective(c), optimizer=_optimizer(c),
      data=DataSpec(
          name=ds.name, data_dir=ds.data_dir,
          device_resident=ds.input == "device" or (ds.input == "auto" and ds_spec.fits_on_device),
          num_workers=int(ds.num_workers), long_tail_factor=ds.get("long_tail_factor"),
          long_tail_seed=int(ds.get("long_tail_seed", 0)),
          spec_overrides=tuple(sorted(dict(ds.get("spec_overrides", {})).items()))),
      batch_size=c.batch_size, eval_batch_size=c.eval_batch_size, num_epochs=c.num_epochs,
      max_steps=int(c.get("max_steps", 0)),
      seeds=tuple(c.seed + i for i in range(int(c.get("num_seeds", 1)))),
      seeds_per_vmap=int(c.get("seeds_per_vmap", 0)), dtype=c.dtype,
      checkpoint_every_steps=int(c.checkpoint.every_steps),
      checkpoint_keep=int(c.checkpoint.keep),
      restore_step=int(c.checkpoint.get("restore_step", 0)), allow_changes=allow_changes(c),
      log_every_steps=max(1, int(c.log_every_steps)),
      eval_every_epochs=int(c.eval_every_epochs), progress_bar=bool(c.progress_bar),
      sweep=sweep)
