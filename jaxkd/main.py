"""The command line: `python -m jaxkd.main --config configs/FILE.py:PRESET --workdir DIR`.

    python -m jaxkd.main --config configs/cifar100.py:resnet32x4-resnet8x4,method=erkd \
        --workdir runs/r32x4_r8x4_erkd --config.optimizer.lr=0.05

The config is validated before anything heavy starts; a config that cannot run exits with
code 2 and one message that says what is wrong and what to do. Restarting with the same
--workdir resumes the run from its last checkpoint, after checking that the config is the
one that wrote it (docs/DESIGN.md#resume-safety). Ctrl-C or SIGTERM saves and exits with
130 or 143. Several processes: set
--coordinator_address, --num_processes and --process_id (or JAXKD_COORDINATOR, ...).
"""

import errno
import glob
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (FILE.py:PRESET).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's id (multi-process runs).")


def fail(message: str) -> None:
  print(f"jaxkd: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with a config override that names no field (ml_collections says
  "did you mean ...?") or a preset the config file rejects reported in one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(" ".join(str(e).split()))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    fail(f"bad --config or override: {' '.join(str(text).split())}")


def _no_space(e: BaseException) -> bool:
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
      "No space left on device" in str(e))


def _last_checkpoints(workdir: str) -> str:
  found = []
  for folder in sorted(glob.glob(os.path.join(workdir, "**", "checkpoints"), recursive=True)):
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()]
    if steps:
      found.append(f"{folder}/{max(steps)}")
  return ", ".join(found) or "none"


def _lm_diverged():
  from jaxkd.train import lm_loop
  return lm_loop.TrainingDiverged


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if FLAGS.config is None:
    fail("--config is required, e.g. --config configs/quickstart.py")
  if not FLAGS.workdir:
    fail("--workdir is required: the folder for checkpoints, metrics and results.")
  # Imported here so that `--help` and flag errors stay fast.
  import jax
  from jaxkd import config as jconfig
  from jaxkd import data as jdata
  from jaxkd import lm_config
  from jaxkd import sharding
  from jaxkd import suite
  from jaxkd import train
  from jaxkd.train import workdir as jworkdir

  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  config = FLAGS.config
  try:
    if config.get("suite"):
      suite.validate(config, device_count=jax.device_count(), workdir=FLAGS.workdir)
    elif lm_config.is_lm(config):
      lm_config.validate(config, device_count=jax.device_count())
    else:
      jconfig.validate(config, device_count=jax.device_count())
  except jconfig.ConfigError as e:
    fail(str(e))
  try:
    if config.get("suite"):
      suite.run(config, FLAGS.workdir)
    elif lm_config.is_lm(config):
      from jaxkd.train import lm_loop, lm_results
      summary = lm_loop.train_and_evaluate(config, FLAGS.workdir)
      print((f"Sweep of {len(summary['members'])} students; results in {FLAGS.workdir}/"
             f"summary.md and {FLAGS.workdir}/<method>/") if "members" in summary else
            lm_results.describe(summary) + f"; results in {FLAGS.workdir}/summary.json",
            flush=True)
    else:
      summary = train.train_and_evaluate(config, FLAGS.workdir)
      if "members" in summary:  # a sweep: its table is printed; each member has its folder
        print(f"Sweep of {len(summary['members'])} members; results in {FLAGS.workdir}/"
              f"summary.md, summary.json and {FLAGS.workdir}/<member>/", flush=True)
      else:
        print(train.describe(summary) + f"; results in {FLAGS.workdir}/summary.json", flush=True)
  except (jdata.DatasetNotFoundError, jdata.BadDataError, jconfig.ConfigError,
          jworkdir.RunError) as e:
    fail(str(e))
  except (train.TrainingDiverged, _lm_diverged()) as e:
    print(f"jaxkd: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt as e:
    sys.exit(getattr(e, "exit_code", 130))
  except Exception as e:  # pylint: disable=broad-except
    if not _no_space(e):
      raise
    fail(f"no space left on device while writing to {FLAGS.workdir} "
         f"({getattr(e, 'filename', None) or type(e).__name__}); the last complete "
         f"checkpoint: {_last_checkpoints(FLAGS.workdir)}. Free some space and rerun the same "
         f"command to resume from it.")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
