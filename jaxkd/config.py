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
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxkd import objectives
from jaxkd import optim


class ConfigError(ValueError):
  """A config that cannot run; the message says how to fix it."""


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


# EA-KD's H_ub in the reference code's CIFAR KD and DKD losses: the literal 100, not ln C
# (docs/METHODS.md#reference-code-and-paper).
REFERENCE_CIFAR_ENTROPY_UPPER_BOUND = 100.0


def apply_method(c: ml_collections.ConfigDict, method: str, *, imagenet: bool = False,
                 dkd_beta: float | None = None,
                 entropy_upper_bound: float | None = None) -> ml_collections.ConfigDict:
  """Sets the loss of a named method with its published defaults (docs/METHODS.md#recipes).

  kd: w_CE 0.1, w_KD 0.9, τ 4 (ImageNet: 0.5/0.5, τ 1); erkd: kd × teacher entropy at τ′ 4;
  eakd: kd × ½H_t(1 + H_s/H_ub) at t 3 (ImageNet KD: t 2; EA-DKD: t 3 everywhere, as the
  reference code runs it); ipwd: kd × inverse propensity with the auxiliary head; dkd /
  erdkd / eadkd: w_CE 1, α 1, β per pair, τ 4, warm-up 20 (ImageNet τ 1, warm-up 1);
  ce: the vanilla student. `entropy_upper_bound`: EA-KD's H_ub (None: ln C).

  Only `c.method` and `c.loss` change: the mode stays the caller's choice.
  """
  if method not in objectives.METHODS:
    raise ConfigError(f"unknown method {method!r}; known: {', '.join(objectives.METHODS)}.")
  base, weighting = objectives.METHODS[method]
  c.method = method
  c.loss.base, c.loss.weighting = base, weighting
  if base == "ce":
    c.loss.ce_weight, c.loss.kd_weight = 1.0, 0.0
  elif base == "kd":
    c.loss.ce_weight, c.loss.kd_weight = (0.5, 0.5) if imagenet else (0.1, 0.9)
    c.loss.temperature = 1.0 if imagenet else 4.0
  else:
    c.loss.ce_weight, c.loss.kd_weight = 1.0, 1.0
    c.loss.temperature = 1.0 if imagenet else 4.0
    c.loss.dkd_warmup_epochs = 1.0 if imagenet else 20.0
    if dkd_beta is not None:
      c.loss.dkd_beta = dkd_beta
  c.loss.adaptive_temperature = 2.0 if imagenet and base == "kd" else 3.0
  if weighting == "adaptive_entropy":
    c.loss.entropy_upper_bound = entropy_upper_bound
  return c


def apply_smoke(c: ml_collections.ConfigDict, *, batch_size: int = 16, eval_batch_size: int = 64,
                max_steps: int = 3, checkpoint_every_steps: int = 2) -> ml_collections.ConfigDict:
  """The `smoke` preset shared by the configs: a few steps at a small batch, for tests."""
  c.batch_size, c.eval_batch_size, c.max_steps = batch_size, eval_batch_size, max_steps
  c.log_every_steps = 1
  c.checkpoint.every_steps = checkpoint_every_steps
  c.progress_bar = False
  return c


def _parse_bool(value: str) -> bool:
  if value.lower() in ("1", "true", "yes"):
    return True
  if value.lower() in ("0", "false", "no"):
    return False
  raise ValueError(f"not a boolean: {value!r}")


def parse_arg(arg: str | None, **types: type) -> tuple[list[str], dict[str, Any]]:
  """'a-b,method=kd,lt=100,smoke' -> (['a-b', 'smoke'], {'method': 'kd', 'lt': 100.0}).

  A config's presets, as big_vision's: positional words and typed `key=value` options.
  `types` names every option the config accepts with its type (str, int, float, bool); an
  unknown option or a value of the wrong type raises ConfigError listing what is accepted.
  """
  positional, named = [], {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" not in part:
      positional.append(part)
      continue
    key, value = (s.strip() for s in part.split("=", 1))
    if key not in types:
      raise ConfigError(f"unknown config option {key!r} in {arg!r}; this config takes "
                        f"{', '.join(sorted(types)) or 'no options'}.")
    kind = types[key]
    try:
      named[key] = _parse_bool(value) if kind is bool else kind(value)
    except ValueError:
      kind_name = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")
      raise ConfigError(f"config option {key}={value!r} must be {kind_name}.") from None
  return positional, named


def teacher_commands(c: ml_collections.ConfigDict) -> str:
  """How to obtain the teacher checkpoint of config `c`: commands for its dataset."""
  if c.dataset.name == "fashion_mnist":
    return ("train the quickstart's teacher with\n  python -m jaxkd.main --config "
            "configs/quickstart.py --config.suite=\"('teacher',)\" --workdir runs/quickstart\n"
            "(then use --config.teacher.checkpoint=runs/quickstart/teacher/model)")
  path = c.teacher.checkpoint or "DIR"
  model = c.teacher.model
  family = "imagenet" if c.dataset.name == "imagenet2012" else "cifar100"
  return (f"train it with\n  python -m jaxkd.main --config configs/{family}.py:{model} "
          f"--workdir runs/teachers/{model}\n(then use --config.teacher.checkpoint="
          f"runs/teachers/{model}/model), or convert a PyTorch teacher with\n"
          f"  python -m jaxkd.convert --model {model} --torch ckpt_epoch_240.pth --out {path}")


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
  if c.mode != "teacher" and objectives.METHODS[c.method] != (c.loss.base, c.loss.weighting):
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


def resolve(c: ml_collections.ConfigDict) -> RunSpec:
  """The `RunSpec` of a config (validate it first for the user-facing messages)."""
  from jaxkd import data as jdata  # deferred, as in `validate`

  ds = c.dataset
  ds_spec = jdata.spec(ds.name, **dict(ds.get("spec_overrides", {})))
  distill = c.mode == "distill"
  return RunSpec(
      mode=c.mode, method=c.get("method", "kd"), model=c.model,
      teacher_model=(c.teacher.model or None) if distill else None,
      teacher_checkpoint=os.path.abspath(c.teacher.checkpoint) if distill else None,
      objective=_objective(c), optimizer=_optimizer(c),
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
      eval_every_epochs=int(c.eval_every_epochs), progress_bar=bool(c.progress_bar))
