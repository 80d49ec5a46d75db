"""Stopping a run cleanly: Ctrl-C and SIGTERM finish the step in flight, save, and exit.

SIGTERM is what `timeout`, SLURM preemption and `docker stop` send; a run treats it like a
first Ctrl-C, and the command line exits with 128 + the signal's number (130 for SIGINT,
143 for SIGTERM), as a shell reports a process killed by it.
"""

from __future__ import annotations

import signal

import jax


class Interrupted(KeyboardInterrupt):
  """Ctrl-C or SIGTERM: the run saved its last step and stopped (`signum`: which signal)."""

  def __init__(self, signum: int = signal.SIGINT):
    super().__init__(signum)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + int(self.signum)


class Interrupt:
  """Ctrl-C or SIGTERM (what `timeout`, SLURM preemption and `docker stop` send) finishes the
  step in flight, saves and exits; a second signal aborts at once.

  Installed in single-process runs only: several processes must stop at the same step.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested = False
    self.signum = signal.SIGINT
    self._active = jax.process_count() == 1
    self._previous = {}

  def __enter__(self):
    if self._active:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.getsignal(sig)
        signal.signal(sig, self._handle)
    return self

  def _restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested:
      self._restore_handlers()
      raise Interrupted(signum)
    self.requested, self.signum = True, signum

  def __exit__(self, exc_type, exc, tb):
    if self._active:
      self._restore_handlers()
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
      self.requested = True
      self.signum = getattr(exc, "signum", signal.SIGINT)
      return True
    return False
