"""Checkpoints of a training run: orbax CheckpointManager over the train state + JSON meta.

Each saved step holds two items: "state" (the whole TrainState: parameters, BatchNorm
statistics, optimizer state, step, RNG, and in self-distillation the per-example prediction
table) and "meta" (JSON: the data iterator's state and the run's evaluation summary).
Saving is asynchronous; orbax writes each step to a temporary folder and renames it when
complete, so an interrupted save is never picked up as the latest step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def run_manager(directory: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager for `directory` (made absolute: orbax fails on relative paths in its thread)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def save_run(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Starts saving `state` and `meta` as `step` (returns before the write completes)."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)))


def restore_run(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores step `step` into the structure, dtypes and shardings of the pytree `like`."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta

