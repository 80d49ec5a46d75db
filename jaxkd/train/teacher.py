"""The frozen teacher of a distillation run: its checkpoint checked, then restored.

The check runs before anything heavy starts (data, compilation), so that a wrong path, a
different architecture or another dataset's teacher stops the run with what to do.
"""

from __future__ import annotations

import os
from typing import Any

from jaxkd import checkpoint
from jaxkd import models
from jaxkd import sharding
from jaxkd.train import workdir as jworkdir

__all__ = ["check", "restore"]

RunError = jworkdir.RunError


def check(spec: Any, num_classes: int) -> dict[str, Any]:
  """The teacher's model.json, checked against the config and the dataset before anything is
  built; raises RunError with what to do."""
  path = spec.teacher_checkpoint
  try:
    meta = checkpoint.read_metadata(path)
  except (FileNotFoundError, ValueError) as e:
    nested = os.path.join(path, "model")
    hint = (f"; did you mean {nested}?" if os.path.isfile(
        os.path.join(nested, checkpoint.METADATA_FILE)) else "")
    raise RunError(f"config.teacher.checkpoint: {e}{hint}") from None
  name = meta.get("model", spec.teacher_model)
  if spec.teacher_model and models.spec(name).name != models.spec(spec.teacher_model).name:
    raise RunError(f"the teacher checkpoint {path} holds a {name}, but config.teacher.model is "
                   f"{spec.teacher_model}; set --config.teacher.model={name} or point "
                   f"config.teacher.checkpoint at a {spec.teacher_model}.")
  if meta.get("num_classes") != num_classes:
    raise RunError(f"the teacher checkpoint {path} has {meta.get('num_classes')} classes, but "
                   f"{spec.data.name} has {num_classes}; use a teacher trained on this "
                   f"dataset.")
  return meta


def restore(spec: Any, num_classes: int, mesh) -> tuple[Any, str]:
  """The teacher's variables, replicated on `mesh`, and its model name."""
  name = check(spec, num_classes)["model"]
  try:
    variables, _ = checkpoint.restore_model_variables(spec.teacher_checkpoint)
  except Exception as e:  # orbax and tensorstore raise many kinds for a damaged folder
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise RunError(f"the teacher checkpoint {spec.teacher_checkpoint} could not be read "
                   f"({type(e).__name__}: {first}); convert or train the teacher again "
                   f"(see `python -m jaxkd.convert --help`).") from None
  return sharding.put_replicated(variables, mesh), name
