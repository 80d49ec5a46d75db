"""Method presets and the helpers config files build on (configs/*.py).

`apply_method` gives a method its published loss settings, `apply_smoke` the few-step preset
of the tests, `parse_arg` reads a preset string ("a-b,method=kd,smoke") as big_vision's
configs do. `ConfigError` is the error of every config check (`jaxkd.config.validate`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxkd import objectives


class ConfigError(ValueError):
  """A config that cannot run; the message says how to fix it."""


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
