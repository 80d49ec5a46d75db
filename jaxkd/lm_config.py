"""Language-model run configs: every field, its checks, and the resolved `LMRunSpec`.

A config with `task = "lm"` is a language-model run (configs/lm.py builds them; docs/LM.md
says what each field does). `validate` raises `ConfigError` naming the field and the fix,
before any data is read or anything compiled; `resolve` turns a valid config into the frozen
`LMRunSpec` the trainer (`jaxkd.train.lm_loop`) runs and fingerprints for resume.

Modes: `teacher` trains `model` with next-token CE; `distill` trains `model` from the frozen
teacher in `teacher.checkpoint` with `method`, or with several methods at once
(`sweep = ("ce", "kd", ...)`: one teacher forward per batch for all of them).
"""

from __future__ import annotations

import dataclasses
import math
import os

import ml_collections
from ml_collections import config_dict

from jaxkd.presets import ConfigError

TASK = "lm"
MODES = ("teacher", "distill")
# Method -> the per-token weighting of the KD term (jaxkd.train.lm_step.METHODS says more).
METHODS = ("ce", "kd", "erkd", "eakd", "ipwd")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DTYPES = ("float32", "bfloat16")
# Spec fields that do not change what a run computes (where the data lives, how often it is
# evaluated, logged, saved or shown): a resumed run may change them freely.
NOT_IN_FINGERPRINT = ("data_dir", "device_resident", "eval_batch_size", "eval_every_steps",
                      "log_every_steps", "progress_bar", "checkpoint_every_steps",
                      "checkpoint_keep", "allow_changes", "restore_step")


def default_lm_config() -> ml_collections.ConfigDict:
  """Every field, at the CPU preset's values (docs/LM.md#the-cpu-preset)."""
  c = ml_collections.ConfigDict()
  c.task = TASK
  c.mode = "distill"                 # teacher | distill
  c.method = "kd"                    # ce | kd | erkd | eakd | ipwd (one student)
  c.sweep = ()                       # several methods sharing one teacher forward
  c.model = "lm_student_cpu"         # the model trained (jaxkd.models.transformer)
  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "lm_teacher_cpu"
  c.teacher.checkpoint = ""          # the `model` folder a teacher run exported

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "fortunes"         # "fortunes" (Debian's package) or a folder of .txt files
  c.data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.vocab_size = 8192
  c.data.seq_len = 128
  c.data.heldout_fraction = 0.05
  c.data.device_resident = True      # the token rows on every device, batches gathered in jit

  c.batch_size = 16                  # rows of seq_len tokens per step, over all devices
  c.eval_batch_size = 32
  c.steps = 300
  c.warmup_steps = 30
  c.seed = 0
  c.dtype = "float32"                # compute dtype; parameters are float32 always
  c.fsdp = False                     # shard parameters and optimizer state over the devices

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-3
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.clip_norm = 1.0
  c.optimizer.end_ratio = 0.1

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 1.0
  c.loss.weighting_temperature = config_dict.placeholder(float)  # None: temperature
  c.loss.ce_weight = 0.5
  c.loss.kd_weight = 0.5
  c.loss.divergence = "forward_kl"
  c.loss.chunk_size = 512            # tokens per chunk of the fused loss: memory O(chunk · V)

  c.log_every_steps = 25
  c.eval_every_steps = 100
  c.progress_bar = False
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  c.checkpoint.allow_changes = ()    # fields a resumed run may change, e.g. ("optimizer.lr",)
  c.checkpoint.restore_step = 0      # 0: the newest usable step
  return c


@dataclasses.dataclass(frozen=True)
class LMRunSpec:
  """A validated language-model run (hashable parts only; see `default_lm_config`)."""
  mode: str
  members: tuple[str, ...]           # the methods trained (("ce",) for a teacher run)
  sweep: bool
  model: str
  teacher_model: str | None
  teacher_checkpoint: str | None
  corpus: str
  data_dir: str | None
  vocab_size: int
  seq_len: int
  heldout_fraction: float
  device_resident: bool
  batch_size: int
  eval_batch_size: int
  steps: int
  warmup_steps: int
  seed: int
  dtype: str
  fsdp: bool
  optimizer: dict
  loss: dict
  log_every_steps: int
  eval_every_steps: int
  progress_bar: bool
  checkpoint_every_steps: int
  checkpoint_keep: int
  allow_changes: tuple[str, ...]
  restore_step: int

  @property
  def needs_teacher(self) -> bool:
    return self.mode == "distill" and any(m != "ce" for m in self.members)


def is_lm(config) -> bool:
  """Whether `config` is a language-model run (or suite)."""
  return config.get("task", None) == TASK


def _positive(value, name, kind=int):
  ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
  if kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value) and value > 0
  if not ok:
    raise ConfigError(f"config.{name} must be a positive {kind.__name__}, got {value!r}.")


def members(config) -> tuple[str, ...]:
  """The methods a run trains, in order."""
  if config.mode == "teacher":
    return ("ce",)
  return tuple(config.sweep) if config.sweep else (config.method,)


def validate(config, *, device_count: int, teacher_from_suite: bool = False) -> None:
  """Raises ConfigError for a config that cannot run (the message says how to fix it).

  `teacher_from_suite`: the teacher checkpoint is made by an earlier run of the same suite,
  so it need not exist yet.
  """
  from jaxkd.models import transformer  # deferred: flax
  if not is_lm(config):
    raise ConfigError(f"config.task must be {TASK!r} for a language-model run.")
  if config.mode not in MODES:
    raise ConfigError(f"config.mode must be one of {', '.join(MODES)} for a language-model "
                      f"run, got {config.mode!r}.")
  names = members(config)
  for name in names:
    if name not in METHODS:
      raise ConfigError(f"unknown language-model method {name!r} in config."
                        f"{'sweep' if config.sweep else 'method'}; known: "
                        f"{', '.join(METHODS)}.")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.sweep names a method twice: {', '.join(names)}.")
  if config.mode == "teacher" and config.sweep:
    raise ConfigError("config.sweep is for distillation; a teacher run trains one model "
                      "(set config.sweep=() or config.mode=distill).")
  known = transformer.available_lm()
  for field, name in (("model", config.model), ("teacher.model", config.teacher.model)):
    if field == "teacher.model" and not any(m != "ce" for m in names):
      continue
    if name not in known:
      raise ConfigError(f"config.{field}={name!r} is not a language model; known: "
                        f"{', '.join(known)}.")
  for name in ("batch_size", "eval_batch_size", "steps", "log_every_steps",
               "eval_every_steps"):
    _positive(config[name], name)
  for name in ("vocab_size", "seq_len"):
    _positive(config.data[name], f"data.{name}")
  if config.data.corpus != "fortunes" and not os.path.isdir(
      os.path.expanduser(config.data.corpus)):
    raise ConfigError(f"config.data.corpus={config.data.corpus!r} is neither \"fortunes\" "
                      f"nor a folder; give a folder of UTF-8 .txt files.")
  if config.data.vocab_size < 300:
    raise ConfigError(f"config.data.vocab_size={config.data.vocab_size} is too small: the "
                      f"byte-level tokenizer needs 258 ids before any merge; use ≥ 300.")
  if not 0 < config.data.heldout_fraction < 1:
    raise ConfigError(f"config.data.heldout_fraction must lie in (0, 1), got "
                      f"{config.data.heldout_fraction!r}.")
  if not isinstance(config.warmup_steps, int) or not 0 <= config.warmup_steps < config.steps:
    raise ConfigError(f"config.warmup_steps must be an int in [0, steps = {config.steps}), "
                      f"got {config.warmup_steps!r}.")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % device_count:
      raise ConfigError(f"config.{name}={config[name]} is not divisible by the "
                        f"{device_count} devices; choose a multiple of {device_count}.")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config.dtype must be one of {', '.join(DTYPES)}, got "
                      f"{config.dtype!r}.")
  for name in ("lr", "clip_norm"):
    _positive(config.optimizer[name], f"optimizer.{name}", float)
  for name in ("temperature",):
    _positive(config.loss[name], f"loss.{name}", float)
  if config.loss.weighting_temperature is not None:
    _positive(config.loss.weighting_temperature, "loss.weighting_temperature", float)
  for name in ("ce_weight", "kd_weight"):
    v = config.loss[name]
    if not isinstance(v, (int, float)) or not v >= 0:
      raise ConfigError(f"config.loss.{name} must be ≥ 0, got {v!r}.")
  if config.loss.divergence not in DIVERGENCES:
    raise ConfigError(f"config.loss.divergence must be one of {', '.join(DIVERGENCES)}, got "
                      f"{config.loss.divergence!r}.")
  _positive(config.loss.chunk_size, "loss.chunk_size")
  _positive(config.checkpoint.every_steps, "checkpoint.every_steps")
  _positive(config.checkpoint.keep, "checkpoint.keep")
  if config.mode == "distill" and any(m != "ce" for m in names):
    _check_teacher(config, teacher_from_suite)


def _check_teacher(config, teacher_from_suite: bool) -> None:
  path = config.teacher.checkpoint
  if not path:
    raise ConfigError("config.teacher.checkpoint is empty: distillation needs the `model` "
                      "folder of a teacher run (python -m jaxkd.main --config "
                      "configs/lm.py:teacher --workdir W writes W/model).")
  if teacher_from_suite:
    return
  if not os.path.isfile(os.path.join(path, "lm_model.json")):
    raise ConfigError(f"config.teacher.checkpoint={path!r} is not a language-model folder "
                      f"(no lm_model.json); train a teacher first (configs/lm.py:teacher) "
                      f"and point it at that run's `model` folder.")


def resolve(config) -> LMRunSpec:
  """The frozen spec of a valid config."""
  names = members(config)
  distill = config.mode == "distill" and any(m != "ce" for m in names)
  return LMRunSpec(
      mode=config.mode, members=names, sweep=bool(config.sweep), model=config.model,
      teacher_model=config.teacher.model if distill else None,
      teacher_checkpoint=config.teacher.checkpoint if distill else None,
      corpus=config.data.corpus, data_dir=config.data.data_dir,
      vocab_size=config.data.vocab_size, seq_len=config.data.seq_len,
      heldout_fraction=float(config.data.heldout_fraction),
      device_resident=bool(config.data.device_resident), batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, steps=config.steps,
      warmup_steps=config.warmup_steps, seed=config.seed, dtype=config.dtype,
      fsdp=bool(config.fsdp), optimizer=config.optimizer.to_dict(),
      loss=config.loss.to_dict(), log_every_steps=config.log_every_steps,
      eval_every_steps=config.eval_every_steps, progress_bar=bool(config.progress_bar),
      checkpoint_every_steps=config.checkpoint.every_steps,
      checkpoint_keep=config.checkpoint.keep,
      allow_changes=tuple(config.checkpoint.allow_changes),
      restore_step=config.checkpoint.restore_step)
