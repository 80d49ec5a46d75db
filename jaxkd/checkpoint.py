"""Checkpoints: the model variables of teachers and students, and the runs that train them.

A model-variables checkpoint is a directory:

  DIR/variables/      orbax (StandardCheckpointer) tree {"params", "batch_stats"}, float32
  DIR/model.json      {"format", "model", "num_classes", "source", ...}

`python -m jaxkd.convert` writes one from a PyTorch file; a distillation run restores its
teacher with `restore_model_variables` and never saves it again. orbax rejects relative paths
when it finishes a save ("Checkpoint path should be absolute"), so every path is made absolute
here. How a run resumes from its checkpoints: docs/DESIGN.md#checkpoints-and-resume.

A run checkpoint (`run_manager`, `save_run`, `restore_run`) is an orbax CheckpointManager
step with two items: "state" (the whole TrainState: parameters, BatchNorm statistics,
optimizer state, step, and in self-distillation the per-example prediction table) and
"meta" (JSON: the data iterator's state and the run's evaluation summary). orbax writes each
step to a temporary folder and renames it when complete, so an interrupted save is never
picked up as the latest step.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import jaxkd.models as models

METADATA_FILE = "model.json"
VARIABLES_DIR = "variables"
FORMAT = "jaxkd.model_variables.v1"


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def save_model_variables(directory: str | os.PathLike, variables: dict, *, model: str,
                         num_classes: int, source: str | None = None,
                         overwrite: bool = False) -> dict:
  """Saves `variables` of model `model` to `directory` (created; must not exist).

  Args:
    directory: target directory (made absolute).
    variables: {"params": ..., "batch_stats": ...} of `jaxkd.models.create(model, num_classes)`.
    model: a `jaxkd.models` name (stored canonical).
    num_classes: classes of the model.
    source: where the weights came from (e.g. the PyTorch file), for the record.
    overwrite: replace an existing `directory` instead of raising.

  Returns:
    The metadata written to `model.json`.

  Raises:
    ValueError: unknown model, or variables that do not fit it, or an existing directory.
  """
  directory = os.path.abspath(os.fspath(directory))
  spec = models.spec(model)
  expected = models.abstract_variables(spec.name, num_classes)
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                     flax.core.unfreeze(variables))
  if jax.tree.structure(got) != jax.tree.structure(expected) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))):
    raise ValueError(f"variables do not fit {spec.name} with num_classes={num_classes}")
  if os.path.exists(directory) and not overwrite:
    raise ValueError(f"{directory} already exists (pass overwrite=True to replace it)")
  # Several processes save together (orbax needs every one of them); only the first touches
  # the folder itself, and the others wait for it.
  if jax.process_index() == 0:
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
  _sync("jaxkd_model_variables_dir")

  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), flax.core.unfreeze(variables))
  with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the write
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables)

  metadata = {
      "format": FORMAT,
      "model": spec.name,
      "num_classes": int(num_classes),
      "dataset_family": spec.dataset_family,
      "input_shape": list(spec.input_shape),
      "feature_dim": spec.feature_dim,
      "num_params": _count(variables["params"]),
      "source": source,
  }
  if jax.process_index() == 0:
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=2)
      f.write("\n")
  _sync("jaxkd_model_variables_done")
  return metadata


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def read_metadata(directory: str | os.PathLike) -> dict:
  """The `model.json` of a model-variables checkpoint."""
  path = os.path.join(os.path.abspath(os.fspath(directory)), METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {directory} is not a jaxkd model checkpoint "
                            f"(write one with `python -m jaxkd.convert`)")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown format {metadata.get('format')!r}, expected {FORMAT!r}")
  return metadata


def restore_model_variables(directory: str | os.PathLike, *,
                            sharding: jax.sharding.Sharding | None = None
                            ) -> tuple[dict, dict]:
  """Restores a model-variables checkpoint.

  Args:
    directory: written by `save_model_variables` (or `python -m jaxkd.convert`).
    sharding: put every array there (e.g. replicated over a mesh); default one device.

  Returns:
    (variables {"params", "batch_stats"} as float32 jax arrays, metadata dict). Build the
    module with `jaxkd.models.create(metadata["model"], metadata["num_classes"])`.
  """
  directory = os.path.abspath(os.fspath(directory))
  metadata = read_metadata(directory)
  target = models.abstract_variables(metadata["model"], metadata["num_classes"])
  if sharding is not None:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          target)
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR), target)
  return variables, metadata


# ---------------------------------------------------------------------------------------------
# Run checkpoints: the trainer's state and metadata, every N steps.


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

