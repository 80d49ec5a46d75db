"""A run's workdir: checks before anything heavy starts, the lock, the config fingerprint.

Nothing here touches arrays or checkpoints' contents: these are the guards that keep two
runs, or a changed config, from mixing their work in one folder
(docs/DESIGN.md#resume-safety).

- `prepare(workdir, teacher_checkpoint)`: the workdir exists (or is created), is a folder,
  is writable, and neither is nor contains the run's own teacher.
- `WorkdirLock`: an exclusive `flock` on `WORKDIR/.jaxkd.lock`, taken by process 0 for the
  whole run. The kernel drops it when its process dies, so a dead run's lock is taken over.
- `fingerprint(spec)`: the fields that define the run's training trajectory; stored with every
  checkpoint and compared on resume (`changes`, `check_changes`).
- `record_start`: `run_info.json` keeps every start and resume of the run.
- `drop_replayed_metrics`: rows of `metrics.jsonl` past the checkpoint a run resumes from move
  to `metrics.replayed.jsonl`, so every step is logged once.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

LOCK_FILE = ".jaxkd.lock"


class RunError(ValueError):
  """A run that cannot start or continue as asked; the message says what to do (exit 2)."""


class WorkdirBusyError(RunError):
  """Another process holds the workdir's lock."""


class ConfigChangedError(RunError):
  """The config differs from the one that wrote the checkpoint, in fields not allowed to."""


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def prepare(workdir: str, teacher_checkpoint: str | None = None) -> None:
  """Creates `workdir` and checks it can hold this run, in milliseconds (before any data).

  Raises:
    RunError: the workdir is a file or not writable, or it is (or contains, or lies inside)
      the run's teacher checkpoint, which the run would then resume or overwrite.
  """
  if teacher_checkpoint and (_inside(teacher_checkpoint, workdir)
                             or _inside(workdir, teacher_checkpoint)):
    raise RunError(
        f"the workdir {workdir} holds this run's own teacher ({teacher_checkpoint}); training "
        f"there would resume the teacher's run and replace its model. Use a new --workdir for "
        f"the student.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"--workdir {workdir} is a file, not a folder; name a folder (it is created "
                   f"if missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".jaxkd-write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunError(f"cannot write to --workdir {workdir} ({e.strerror or e}); choose a folder "
                   f"you can write to.") from None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run (a context manager).

  `active=False` (every process but 0 of a multi-process run) makes it a no-op. On entry,
  a lock held by another live process raises WorkdirBusyError naming that process (pid,
  host, start time); the lock of a process that died is released by the kernel and taken
  over, with a note.
  """

  def __init__(self, workdir: str, *, active: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self.active = active
    self._fd = None

  def _holder(self) -> dict[str, Any]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def __enter__(self) -> WorkdirLock:
    if not self.active:
      return self
    previous = self._holder()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      holder = self._holder()
      who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (started "
             f"{holder.get('started', '?')})") if holder else "another process"
      raise WorkdirBusyError(
          f"the workdir {self.workdir} is in use by {who}; two runs in one workdir would "
          f"interleave their checkpoints and metrics. Wait for it to finish or stop it, or use "
          f"another --workdir.") from None
    self._fd = fd
    host = socket.gethostname()
    if (previous.get("pid") not in (None, os.getpid()) and previous.get("host") == host
        and not _alive(int(previous["pid"]))):
      print(f"Took over the lock of process {previous['pid']} on {host}, which is no longer "
            f"running.", flush=True)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": host,
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
    os.fsync(fd)
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      # The file stays: deleting it could race with a process about to lock it.
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


# ---------------------------------------------------------------------------------------------
# Fingerprints: what a run is, compared on resume.

# RunSpec fields that do not change what the run computes: where things are read from, how
# the input is fed, how often the run logs, evaluates or saves, and where it stops early.
_NOT_IN_FINGERPRINT = ("data.data_dir", "data.device_resident", "data.num_workers",
                       "eval_batch_size", "max_steps", "seeds_per_vmap", "checkpoint_every_steps",
                       "checkpoint_keep", "log_every_steps", "eval_every_epochs", "progress_bar",
                       "restore_step", "allow_changes")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def fingerprint(spec: Any) -> dict[str, Any]:
  """{dotted field: JSON value} of the RunSpec fields that define a run: mode, method, loss,
  model, teacher, optimizer and schedule, batch, dataset and its options, seeds, epochs,
  dtype. `spec` is a `jaxkd.config.RunSpec` (any frozen dataclass of that shape)."""
  flat = _flatten(json.loads(json.dumps(dataclasses.asdict(spec), default=list)))
  return {k: v for k, v in sorted(flat.items()) if not any(
      k == skip or k.startswith(skip + ".") for skip in _NOT_IN_FINGERPRINT)}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(field, old value, new value)] of every field that differs (missing: None)."""
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)]


def _allowed(field: str, allowed: tuple[str, ...]) -> bool:
  return any(field == a or field.startswith(a + ".") for a in allowed)


_CONFIG_NAMES = (("objective.loss.", "loss."), ("objective.targets", "mode"),
                 ("objective.pskd_alpha_final", "self_distill.alpha_final"),
                 ("objective.ipw_start_epoch", "self_distill.ipw_start_epoch"),
                 ("data.", "dataset."), ("teacher_model", "teacher.model"),
                 ("teacher_checkpoint", "teacher.checkpoint"), ("seeds", "seed"))


def _config_name(field: str) -> str:
  """A fingerprint field as the config names it (what to pass to allow_changes)."""
  for spec_name, config_name in _CONFIG_NAMES:
    if field.startswith(spec_name):
      return config_name + field[len(spec_name):]
  return field


def check_changes(old: dict[str, Any] | None, new: dict[str, Any], allowed: tuple[str, ...],
                  where: str, *, quiet: bool = False) -> list[tuple[str, Any, Any]]:
  """The allowed changes between a checkpoint's fingerprint and this run's (printed).

  Raises:
    ConfigChangedError: a field differs that `allowed` does not name; the message lists
      every changed field with old → new and the allow_changes value that would accept it.
  """
  if old is None:
    if quiet:
      return []
    print(f"Note: {where} records no config fingerprint (written by an older jaxkd); the "
          f"config could not be compared with the one that wrote it.", flush=True)
    return []
  found = changes(old, new)
  refused = [c for c in found if not _allowed(c[0], allowed) and
             not _allowed(_config_name(c[0]), allowed)]
  if refused:
    lines = "; ".join(f"{_config_name(k)}: {a!r} → {b!r}" for k, a, b in refused)
    names = ",".join(dict.fromkeys(_config_name(k) for k, _, _ in refused))
    raise ConfigChangedError(
        f"this config differs from the one that wrote {where}: {lines}. Resuming would "
        f"continue that run under another recipe. Use a new --workdir, or the config that "
        f"wrote it; to continue it on purpose, pass --config.checkpoint.allow_changes={names}.")
  for k, a, b in found if not quiet else ():
    print(f"Resuming with a changed config (allowed): {_config_name(k)}: {a!r} → {b!r}.",
          flush=True)
  return found


# ---------------------------------------------------------------------------------------------
# Run files kept across resumes.


def record_start(workdir: str, info: dict[str, Any], start: dict[str, Any]) -> None:
  """Writes `run_info.json`: `info` (this start's machine and versions) and `starts`, the list
  of every start and resume so far with `start` appended (a rejected resume never gets here).
  """
  path = os.path.join(workdir, "run_info.json")
  starts = []
  try:
    with open(path) as f:
      starts = list(json.load(f).get("starts", []))
  except (OSError, ValueError):
    pass
  starts.append({"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **start})
  _write_json(path, {**info, "starts": starts})


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def drop_replayed_metrics(workdir: str, step: int) -> int:
  """Moves rows of `metrics.jsonl` with a step after `step` (those a resumed run logs again)
  to `metrics.replayed.jsonl`; returns how many moved."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  keep, replayed = [], []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row_step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):
        row_step = None  # a line cut short by a crash
      (replayed if row_step is None or row_step > step else keep).append(line.rstrip("\n"))
  if replayed:
    with open(os.path.join(workdir, "metrics.replayed.jsonl"), "a") as f:
      f.write("".join(line + "\n" for line in replayed))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
  return len(replayed)
