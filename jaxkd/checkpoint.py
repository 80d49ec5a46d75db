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

import contextlib
import hashlib
import json
import os
import re
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


class ModelExistsError(ValueError):
  """The target of `save_model_variables` exists and may not (or cannot safely) be replaced."""


def _is_model_folder(directory: str) -> bool:
  """An empty folder, or one holding exactly a jaxkd model checkpoint (what may be replaced)."""
  entries = set(os.listdir(directory))
  if not entries:
    return True
  if not entries <= {METADATA_FILE, VARIABLES_DIR}:
    return False
  try:
    with open(os.path.join(directory, METADATA_FILE)) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def check_replaceable(directory: str | os.PathLike, *, overwrite: bool) -> None:
  """Raises ModelExistsError unless a model may be written to `directory`: it does not exist,
  or `overwrite` is set and it is an empty folder or a jaxkd model folder. Anything else (a
  file, a folder with other files) is never deleted."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.lexists(directory):
    return
  if not overwrite:
    raise ModelExistsError(f"{directory} already exists (replace it with overwrite=True)")
  if not os.path.isdir(directory) or os.path.islink(directory):
    raise ModelExistsError(f"{directory} is not a folder; refusing to replace it")
  if not _is_model_folder(directory):
    found = sorted(os.listdir(directory))
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise ModelExistsError(
        f"{directory} is not a jaxkd model folder (it holds {shown}); only an empty folder or "
        f"one written by jaxkd (model.json + variables/) is ever replaced. Choose another "
        f"target or move it away yourself")


def save_model_variables(directory: str | os.PathLike, variables: dict, *, model: str,
                         num_classes: int, source: str | None = None,
                         overwrite: bool = False) -> dict:
  """Saves `variables` of model `model` to `directory` (created; must not exist).

  The checkpoint is written to a temporary sibling folder and renamed into place when it is
  complete, so an interrupted save never leaves a half-written model where a good one was.

  Args:
    directory: target directory (made absolute).
    variables: {"params": ..., "batch_stats": ...} of `jaxkd.models.create(model, num_classes)`.
    model: a `jaxkd.models` name (stored canonical).
    num_classes: classes of the model.
    source: where the weights came from (e.g. the PyTorch file), for the record.
    overwrite: replace an existing `directory` if it is empty or a jaxkd model folder.

  Returns:
    The metadata written to `model.json`.

  Raises:
    ValueError: unknown model, or variables that do not fit it.
    ModelExistsError: `directory` exists and may not be replaced (`check_replaceable`).
  """
  directory = os.path.abspath(os.fspath(directory))
  spec = models.spec(model)
  expected = models.abstract_variables(spec.name, num_classes)
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                     flax.core.unfreeze(variables))
  if jax.tree.structure(got) != jax.tree.structure(expected) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))):
    raise ValueError(f"variables do not fit {spec.name} with num_classes={num_classes}")
  check_replaceable(directory, overwrite=overwrite)
  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), flax.core.unfreeze(variables))
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
  with replacing_folder(directory, "jaxkd_model_variables") as tmp:
    with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the write
      checkpointer.save(os.path.join(tmp, VARIABLES_DIR), variables)
    if jax.process_index() == 0:
      with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
  return metadata


@contextlib.contextmanager
def replacing_folder(directory: str, name: str):
  """Yields an empty temporary sibling of `directory` to write a folder into; once the block
  ends without error it replaces `directory` (an earlier folder there is removed), so an
  interrupted write never leaves a half-written folder where a good one was. Every process
  enters it together (orbax needs all of them); only process 0 touches the folders, and the
  others wait for it (`name` names the two barriers)."""
  parent, base = os.path.split(os.path.abspath(directory))
  tmp, old = (os.path.join(parent, f".{base}.jaxkd-{kind}") for kind in ("tmp", "old"))
  if jax.process_index() == 0:
    os.makedirs(parent, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write: never complete
    os.makedirs(tmp)
  _sync(f"{name}_dir")
  yield tmp
  if jax.process_index() == 0:
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(directory):
      os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  _sync(f"{name}_done")


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
  # Always an explicit placement: left to itself orbax restores onto the devices that saved
  # the arrays, which a process with fewer devices (a teacher trained on 8, distilled on 1)
  # does not have.
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
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



def restore_run_state(manager: ocp.CheckpointManager, step: int, like: Any) -> Any:
  """The "state" item of step `step` in the structure, dtypes and shardings of `like`.

  Raises CheckpointDamagedError (naming the file when orbax's message does) for anything
  that stops the read: truncated or corrupt files, or arrays that do not fit `like`.
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  except Exception as e:  # orbax and tensorstore raise ValueError, OSError, XlaRuntimeError...
    where = os.path.join(step_directory(manager, step), "state")
    text = str(e)
    named = re.search(re.escape(where) + r"[^\s'\"]*", text)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    raise CheckpointDamagedError(named.group(0) if named else where,
                                 f"{type(e).__name__}: {first[:300]}") from None
  return restored.state


def read_run_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The "meta" item of step `step`, read without touching the state (JSON on disk)."""
  path = os.path.join(step_directory(manager, step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointDamagedError(path, f"unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Checksums of run checkpoints: recorded once a save is complete, verified before a restore.

CHECKSUM_FILE = "jaxkd_checksums.json"


class CheckpointDamagedError(ValueError):
  """A file of a checkpoint is missing, unreadable or differs from its recorded checksum."""

  def __init__(self, path: str, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path, self.problem = path, problem


def step_directory(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
  return sorted(f for f in out if f != CHECKSUM_FILE)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def record_checksums(step_dir: str) -> None:
  """Writes `step_dir/jaxkd_checksums.json`: {relative file: sha256} of a complete step."""
  sums = {f: _sha256(os.path.join(step_dir, f)) for f in _files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f, indent=0)
  os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))


def record_saved_checksums(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Waits for the save in flight, then records the checksums of every step of `steps` still
  on disk (not removed by keep=k); process 0 writes them."""
  manager.wait_until_finished()
  if jax.process_index() == 0:
    for step in steps:
      where = step_directory(manager, step)
      if os.path.isdir(where):
        record_checksums(where)


def has_checksums(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, CHECKSUM_FILE))


def verify_checksums(step_dir: str) -> bool:
  """True if the step's files match the checksums recorded at save; False if none were
  recorded (a step saved just before a crash). Raises CheckpointDamagedError naming the first
  file that is missing or differs."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      sums = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointDamagedError(path, f"unreadable ({type(e).__name__})") from None
  for name, expected in sorted(sums.items()):
    file = os.path.join(step_dir, name)
    if not os.path.exists(file):
      raise CheckpointDamagedError(file, "missing")
    if _sha256(file) != expected:
      raise CheckpointDamagedError(file, "differs from the checksum recorded when it was saved")
  return True
