"""Config defaults, method presets and validation (used by configs/*.py and the CLI).

A config is an `ml_collections.ConfigDict`; `default_config()` lists every field with the
CIFAR-100 recipe (METHODS Part I §7). `validate(config)` checks it before anything heavy
starts and raises `ConfigError` with one message that says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from jaxkd import objectives


class ConfigError(ValueError):
  """A config that cannot run; the message says how to fix it."""


MODES = ("teacher", "distill", "self_distill")
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every field, with the CIFAR-100 KD recipe (240 epochs, batch 64, SGD 0.05)."""
  c = ml_collections.ConfigDict()
  c.mode = "distill"
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

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.milestones = (150, 180, 210)
  c.optimizer.decay = 0.1
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.schedule = "step"               # step (the recipes) | cosine

  loss = dataclasses.asdict(objectives.LossConfig())
  c.loss = ml_collections.ConfigDict(loss)
  for key, kind in (("entropy_upper_bound", float), ("ipw_max_weight", float),
                    ("normalize", str)):
    c.loss[key] = config_dict.placeholder(kind)

  c.self_distill = ml_collections.ConfigDict()
  c.self_distill.alpha_final = 0.8            # PS-KD's alpha_T
  c.self_distill.ipw_start_epoch = 1          # IPW weights from this epoch (counted from 1)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0                # 0: at the end of every epoch
  c.checkpoint.keep = 3

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.progress_bar = True
  return c


def apply_method(c: ml_collections.ConfigDict, method: str, *, imagenet: bool = False,
                 dkd_beta: float | None = None) -> ml_collections.ConfigDict:
  """Sets the objective of a named method with its published defaults (METHODS Part I).

  kd: w_CE 0.1, w_KD 0.9, τ 4 (ImageNet: 0.5/0.5, τ 1); erkd: kd × teacher entropy at τ′ 4;
  eakd: kd × ½H_t(1 + H_s/ln C) at t 3 (ImageNet t 2); ipwd: kd × inverse propensity with the
  auxiliary head; dkd / erdkd: w_CE 1, α 1, β per pair, τ 4, warm-up 20 (ImageNet τ 1,
  warm-up 1); ce: the vanilla student.
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
  c.loss.adaptive_temperature = 2.0 if imagenet else 3.0
  if base == "ce":
    c.mode = "teacher"
  return c


def parse_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """'a-b,method=kd,smoke' -> (['a-b', 'smoke'], {'method': 'kd'}), as big_vision's presets."""
  positional, named = [], {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      named[k.strip()] = v.strip()
    else:
      positional.append(part)
  return positional, named


def teacher_commands(c: ml_collections.ConfigDict) -> str:
  """How to obtain the teacher checkpoint of config `c`."""
  family = "imagenet" if c.dataset.name == "imagenet2012" else "cifar100"
  path = c.teacher.checkpoint or "DIR"
  model = c.teacher.model
  return (f"train it with\n  python -m jaxkd.main --config configs/{family}.py:{model} "
          f"--workdir runs/teachers/{model}\n(then use --config.teacher.checkpoint="
          f"runs/teachers/{model}/model), or convert a PyTorch teacher with\n"
          f"  python -m jaxkd.convert --model {model} --torch ckpt_epoch_240.pth --out {path}")


def validate(c: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
  """Raises ConfigError if `c` cannot run; checks are cheap (no data, no compilation)."""
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
  fields = dict(c.loss)
  if c.mode == "teacher":
    fields.update(base="ce", weighting="none")
  try:
    loss = objectives.loss_config(fields)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if c.mode == "distill" and not loss.needs_teacher:
    raise ConfigError("mode 'distill' needs a distillation loss (loss.base kd or dkd); use "
                      "mode 'teacher' for plain CE training.")
  if c.dtype not in DTYPES:
    raise ConfigError(f"config.dtype must be one of {DTYPES}, got {c.dtype!r}.")
  for field in ("batch_size", "eval_batch_size", "num_epochs", "num_seeds"):
    if not (isinstance(c[field], int) and c[field] > 0):
      raise ConfigError(f"config.{field} must be a positive integer, got {c[field]!r}.")
  spv = c.get("seeds_per_vmap", 0)
  if not (isinstance(spv, int) and 0 <= spv <= c.num_seeds):
    raise ConfigError(f"config.seeds_per_vmap must be an integer from 0 (automatic) to "
                      f"config.num_seeds={c.num_seeds}, got {spv!r}.")
  if c.optimizer.schedule not in ("step", "cosine"):
    raise ConfigError(f"config.optimizer.schedule must be step or cosine, got "
                      f"{c.optimizer.schedule!r}.")
  if c.optimizer.lr <= 0:
    raise ConfigError(f"config.optimizer.lr must be positive, got {c.optimizer.lr!r}.")
  if device_count is not None:
    for field in ("batch_size", "eval_batch_size"):
      if c[field] % device_count:
        raise ConfigError(
            f"config.{field}={c[field]} is not divisible by the {device_count} devices; the "
            f"global batch is part of the recipe, so choose a multiple of {device_count} "
            f"(e.g. --config.{field}={(c[field] // device_count + 1) * device_count}) or run "
            f"on a number of devices that divides it.")
  if c.mode == "distill":
    path = c.teacher.checkpoint
    if not path or not os.path.isdir(path):
      raise ConfigError(
          f"the teacher checkpoint {path or '(config.teacher.checkpoint is empty)'} does not "
          f"exist; " + teacher_commands(c))
