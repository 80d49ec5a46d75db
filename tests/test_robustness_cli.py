"""Runs that never lose or destroy work, through the command line in subprocesses: SIGTERM
saves and exits 143, a damaged checkpoint falls back to the previous one, a held lock and
other user errors are one `jaxkd: error:` line with exit code 2, not a traceback.

A handful of subprocesses on the tiny quickstart teacher; the refusals stop before any data
is read. docs/DESIGN.md#resume-safety describes the behaviour.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import helpers
from helpers import ONE_DEVICE, REPO, cli, run_cli_config
from jaxkd.train import workdir as jworkdir


@pytest.fixture(scope="module")
def small_dir():
  return helpers.small_fashion_data_dir()


def one_error_line(result):
  """The single `jaxkd: error:` line of a refused command (exit 2, no traceback)."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("jaxkd: error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def test_sigterm_saves_and_a_damaged_checkpoint_falls_back(small_dir, tmp_path):
  """SIGTERM (timeout, SLURM, docker stop) used to lose everything since the last checkpoint:
  now the step in flight finishes, is saved, and the process exits 143. Then that newest
  checkpoint is damaged (one byte of an array file): the rerun names the step and the file,
  resumes from the previous step and finishes."""
  workdir = str(tmp_path / "run")
  args = run_cli_config(workdir, small_dir, 400, extra=("--config.checkpoint.every_steps=4",))
  returncode, out, err = helpers.signal_cli_run(args, workdir, signal.SIGTERM, 6, ONE_DEVICE)
  assert returncode == 143, err[-3000:]
  assert "(SIGTERM)" in out, out[-2000:]
  saved = int(out.split("Interrupted: saved step ")[1].split()[0])
  ckpt = os.path.join(workdir, "teacher", "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert steps[-1] == saved and len(steps) >= 2, steps
  state = os.path.join(ckpt, str(saved), "state")
  files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs]
  victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(victim, "wb").write(bytes(data))

  rerun = cli(run_cli_config(workdir, small_dir, saved + 2), env=ONE_DEVICE, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"checkpoint step {saved} is damaged ({victim}: differs from the checksum" in (
      rerun.stdout), rerun.stdout[-2000:]
  assert f"Resumed from {ckpt}/{steps[-2]}." in rerun.stdout
  metrics = os.path.join(workdir, "teacher", "metrics.jsonl")
  logged = [json.loads(l)["step"] for l in open(metrics) if "train/loss" in l]
  assert logged == list(range(1, saved + 3))  # replayed steps are logged once


def test_a_held_lock_is_one_error_line(small_dir, tmp_path):
  """Two runs in one workdir interleaved their metrics and checkpoints; the second now stops
  at once naming the first (pid, host)."""
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "teacher"))
  with jworkdir.WorkdirLock(os.path.join(workdir, "teacher")):
    result = cli(run_cli_config(workdir, small_dir, 4), env=ONE_DEVICE, timeout=300)
  line = one_error_line(result)
  assert f"in use by process {os.getpid()} on {socket.gethostname()}" in line


@pytest.mark.parametrize("case", ["typo", "workdir_file", "teacher_parent"])
def test_user_errors_are_one_line_with_exit_2(small_dir, tmp_path, case):
  """A typo'd field (ml_collections' "did you mean"), a workdir that is a file, and a
  teacher path one folder too high all used to be tracebacks with exit 1."""
  workdir = str(tmp_path / "run")
  args = run_cli_config(workdir, small_dir, 4)
  if case == "typo":
    args.append("--config.optimzer.lr=0.1")
    expected = 'Did you mean "optimizer"'
  elif case == "workdir_file":
    open(workdir, "w").close()
    expected = "is a file, not a folder"
  else:
    teacher = tmp_path / "teacher_run"
    (teacher / "model").mkdir(parents=True)
    (teacher / "model" / "model.json").write_text("{}")
    args = ["--config", os.path.join(REPO, "configs", "quickstart.py"), "--workdir", workdir,
            f"--config.dataset.data_dir={small_dir}", "--config.suite=('students',)",
            f"--config.teacher.checkpoint={teacher}"]
    expected = f"did you mean {teacher}/model?"
  line = one_error_line(cli(args, env=ONE_DEVICE, timeout=300))
  assert expected in line, line


_FULL_DISK = """
import errno, runpy, sys
from jaxkd import checkpoint
real, calls = checkpoint.save_run, []
def save_run(manager, step, state, meta):
  calls.append(step)
  if len(calls) > 1:  # the disk fills up after the first checkpoint
    raise OSError(errno.ENOSPC, "No space left on device", str(manager.directory))
  return real(manager, step, state, meta)
checkpoint.save_run = save_run
sys.argv = ["jaxkd.main"] + sys.argv[1:]
runpy.run_module("jaxkd.main", run_name="__main__")
"""


def test_a_full_disk_is_one_error_line_naming_the_last_checkpoint(small_dir, tmp_path):
  """A simulated ENOSPC on the second save: one line saying what could not be written, the
  last complete checkpoint and what to do (it used to be dozens of tracebacks)."""
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "-c", _FULL_DISK, *run_cli_config(workdir, small_dir, 6)], cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **ONE_DEVICE}, capture_output=True,
      text=True, timeout=300)
  line = one_error_line(result)
  assert "no space left on device" in line
  assert f"the last complete checkpoint: {workdir}/teacher/checkpoints/2" in line
  assert "rerun the same command to resume" in line
