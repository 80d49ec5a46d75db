"""Which run checkpoint a run resumes from, verified before and after it is restored.

A step is used only if (1) its files match the checksums recorded when it was saved (a step
saved just before a crash has none yet, and is used unverified), (2) its JSON and arrays
read back, (3) it was written by this layout of jaxkd, (4) the config that wrote it matches
this one (`workdir.check_changes`), and (5) every floating value of the restored state is
finite. A step failing (1), (2) or (5) is reported in one line and the previous step is
tried; its folder is moved to `WORKDIR/damaged_checkpoints/` so that nothing rewrites or
picks it up again. (3) and (4) stop the run: an older step of the same workdir would fail
them too. `restore_step` resumes from an older step on purpose; the newer steps are moved to
`WORKDIR/superseded_checkpoints/` (never deleted). docs/DESIGN.md#resume-safety.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import checkpoint
from jaxkd.train import workdir as jworkdir


class IncompatibleCheckpointError(jworkdir.RunError):
  """The workdir holds a run checkpoint this version of jaxkd cannot continue."""


class NoUsableCheckpointError(jworkdir.RunError):
  """Every checkpoint of the workdir is damaged, or the step asked for is not there."""


@dataclasses.dataclass
class Resumed:
  step: int
  state: Any
  meta: dict[str, Any]
  changes: list
  skipped: list[str]   # one line per step that was passed over


def nonfinite_leaves(state: Any) -> list[str]:
  """The paths of the floating leaves of `state` holding NaN or inf (one device reduction)."""
  leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return []
  finite = jax.device_get(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])(
      [x for _, x in leaves]))
  return [p for (p, _), ok in zip(leaves, finite) if not bool(np.asarray(ok))]


def _move_aside(step_dir: str, folder: str) -> str:
  os.makedirs(folder, exist_ok=True)
  target = os.path.join(folder, f"{os.path.basename(step_dir)}-{time.strftime('%Y%m%d-%H%M%S')}")
  shutil.move(step_dir, target)
  return target


def restore(manager, like: Any, *, workdir: str, fmt: str, fingerprint: dict[str, Any],
            allowed: tuple[str, ...], restore_step: int = 0) -> Resumed | None:
  """The newest usable step of `manager` restored into the shapes and shardings of `like`,
  or None when the workdir holds no checkpoint (a fresh start).

  Raises:
    IncompatibleCheckpointError: another checkpoint layout, or arrays that do not fit.
    workdir.ConfigChangedError: the config differs in fields `allowed` does not name.
    NoUsableCheckpointError: `restore_step` is not a saved step, or no step is usable.
  """
  steps = sorted(manager.all_steps())
  if not steps:
    if restore_step:
      raise NoUsableCheckpointError(
          f"config.checkpoint.restore_step={restore_step}, but {manager.directory} holds no "
          f"checkpoint; leave restore_step at 0 to start afresh.")
    return None
  if restore_step and restore_step not in steps:
    raise NoUsableCheckpointError(
        f"config.checkpoint.restore_step={restore_step} is not a saved step; "
        f"{manager.directory} holds steps {', '.join(map(str, steps))}.")
  candidates = [restore_step] if restore_step else steps[::-1]
  skipped, damaged = [], []
  for step in candidates:
    where = checkpoint.step_directory(manager, step)
    try:
      verified = checkpoint.verify_checksums(where)
      meta = checkpoint.read_run_meta(manager, step)
    except checkpoint.CheckpointDamagedError as e:
      skipped.append(f"checkpoint step {step} is damaged ({e})")
      damaged.append(where)
      continue
    if meta.get("format") != fmt:
      raise IncompatibleCheckpointError(
          f"the checkpoint {where} was written by another version of jaxkd (format "
          f"{meta.get('format', 'unversioned')!r}, this one reads {fmt!r}); use a new "
          f"--workdir.")
    found = jworkdir.check_changes(meta.get("fingerprint"), fingerprint, allowed, where)
    try:
      state = checkpoint.restore_run_state(manager, step, like)
    except checkpoint.CheckpointDamagedError as e:
      if verified:  # files as saved, yet they do not fit: the arrays are another run's
        raise IncompatibleCheckpointError(
            f"the checkpoint {where} does not fit this run ({e.problem}); it was written by "
            f"another version of jaxkd or another config. Use a new --workdir, or the config "
            f"that wrote it.") from None
      skipped.append(f"checkpoint step {step} is unreadable ({e})")
      damaged.append(where)
      continue
    bad = nonfinite_leaves(state)
    if bad:
      skipped.append(f"checkpoint step {step} holds NaN or inf in {', '.join(bad[:3])}"
                     + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
      damaged.append(where)
      continue
    break
  else:
    raise NoUsableCheckpointError(
        f"no usable checkpoint in {manager.directory}: " + "; ".join(skipped) + ". Resume "
        f"from another step with --config.checkpoint.restore_step=N, or move "
        f"{manager.directory} away to start afresh.")
  for line in skipped:
    print(f"Warning: {line}; falling back to an older step.", flush=True)
  aside = [(d, "damaged_checkpoints") for d in damaged]
  if restore_step:
    aside += [(checkpoint.step_directory(manager, s), "superseded_checkpoints")
              for s in steps if s > restore_step]
  if aside:
    if jax.process_index() == 0:  # one process moves; the others wait for it
      moved = [_move_aside(d, os.path.join(workdir, folder)) for d, folder in aside]
      print(f"Moved aside (not deleted): {', '.join(moved)}.", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jaxkd_checkpoints_moved_aside")
    manager.reload()
  return Resumed(step=step, state=state, meta=meta, changes=found, skipped=skipped)


def precheck(directory: str, *, fmt: str, fingerprint: dict[str, Any], allowed: tuple[str, ...],
             restore_step: int = 0) -> None:
  """`workdir.check_changes` against the newest step (or `restore_step`) whose metadata reads,
  from the JSON alone: cheap enough to run before any data or compilation. `restore` checks
  again, and reports damaged steps."""
  steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True) if (
      os.path.isdir(directory)) else []
  if restore_step and restore_step not in steps:
    raise NoUsableCheckpointError(
        f"config.checkpoint.restore_step={restore_step} is not a saved step; {directory} "
        + (f"holds steps {', '.join(map(str, sorted(steps)))}." if steps else
           "holds no checkpoint; leave restore_step at 0 to start afresh."))
  for step in steps if not restore_step else [s for s in steps if s == restore_step]:
    where = os.path.join(directory, str(step))
    try:
      with open(os.path.join(where, "meta", "metadata")) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if meta.get("format") == fmt and meta.get("fingerprint") is not None:
      jworkdir.check_changes(meta["fingerprint"], fingerprint, allowed, where, quiet=True)
    return


def after_divergence(manager) -> str:
  """Where a diverged run can resume from, and how: its newest checkpoint (and older ones)."""
  steps = sorted(manager.all_steps())
  if not steps:
    return "no checkpoint had been written yet"
  # The step's guard checks every floating value of the state (parameters, BatchNorm
  # statistics, optimizer state) before it is kept, and no step is saved after it fired.
  return (f"the newest checkpoint, {manager.directory}/{steps[-1]}, holds only finite values; "
          f"rerun with the same --workdir to resume from it after fixing the cause (e.g. a "
          f"lower learning rate, with --config.checkpoint.allow_changes=optimizer.lr)"
          + (f", or from an older step with --config.checkpoint.restore_step=N (saved: "
             f"{', '.join(map(str, steps))})" if len(steps) > 1 else ""))
