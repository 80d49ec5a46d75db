"""The optimizer of the published recipes: SGD with momentum, PyTorch-style L2, step or cosine.

    tx, schedule = make_optimizer(OptimizerConfig(lr=0.05), steps_per_epoch=782, num_epochs=240)

Pure optax; nothing here knows about data, models or checkpoints. The recipes are in
docs/METHODS.md#recipes.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

__all__ = ["OptimizerConfig", "SCHEDULES", "learning_rate_schedule", "make_optimizer"]

SCHEDULES = ("step", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """SGD hyper-parameters; the defaults are the CIFAR-100 recipe (mdistiller / RepDistiller)."""
  name: str = "sgd"
  lr: float = 0.05
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  milestones: tuple[int, ...] = (150, 180, 210)
  decay: float = 0.1
  warmup_epochs: float = 0.0
  schedule: str = "step"

  def validate(self) -> None:
    if self.name != "sgd":
      raise ValueError(f"optimizer.name must be 'sgd', got {self.name!r}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule must be step or cosine, got {self.schedule!r}.")
    if not self.lr > 0:
      raise ValueError(f"optimizer.lr must be positive, got {self.lr!r}.")
    if len(set(self.milestones)) != len(self.milestones):
      raise ValueError(f"optimizer.milestones must be distinct epochs, got {self.milestones!r}.")


def learning_rate_schedule(cfg: OptimizerConfig, steps_per_epoch: int,
                           num_epochs: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step count (0 for the first step).

  "step": lr · decay^k, k = the number of milestones already passed. Epochs count from 1 and
  a milestone epoch still runs at the previous rate: with milestones (150, 180, 210) the rate
  drops at the first step of epochs 151, 181 and 211, i.e. at step m · steps_per_epoch.
  "cosine": lr · ½(1 + cos(π · step / total_steps)), for short runs such as the quickstart.

  A linear warm-up over `warmup_epochs` multiplies either schedule by min(1, (step + 1) / W),
  so that the milestones stay at their absolute epochs (0 in the published recipes).
  """
  cfg.validate()
  total_steps = num_epochs * steps_per_epoch
  if cfg.schedule == "step":
    main = optax.piecewise_constant_schedule(
        cfg.lr, {int(m) * steps_per_epoch: cfg.decay for m in cfg.milestones})
  else:
    # Written out rather than optax.cosine_decay_schedule, which rounds π·count/T differently
    # (1 ulp on a fifth of the steps) and would change the quickstart's numbers.
    main = lambda count: cfg.lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count / total_steps,
                                                                          1.0)))
  warmup_steps = cfg.warmup_epochs * steps_per_epoch
  if not warmup_steps:
    return main
  return lambda count: main(count) * jnp.minimum(1.0, (count + 1) / warmup_steps)


def make_optimizer(cfg: OptimizerConfig, steps_per_epoch: int, num_epochs: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD as `torch.optim.SGD(weight_decay=wd, momentum=m, nesterov=n)` updates.

  PyTorch adds the L2 term to the gradient of every parameter before the momentum buffer:
  d = g + wd·p; buf = m·buf + d (buf = d on the first step); p -= lr · (d + m·buf if nesterov
  else buf). optax's `add_decayed_weights` then `sgd(momentum, nesterov)` is that update.
  """
  schedule = learning_rate_schedule(cfg, steps_per_epoch, num_epochs)
  tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                   optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  return tx, schedule
