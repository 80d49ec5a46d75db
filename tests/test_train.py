"""The trainer and its command line: modes, methods, resume, devices, hosts, errors.

Most tests run on a small Fashion-MNIST-format dataset the test session writes (so they never
skip); the real-learning test and the quickstart use the real Fashion-MNIST, and CI requires
it. Tiny models and a few steps.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
from jaxkd import config as jconfig
from jaxkd import checkpoint
from jaxkd import train

from helpers import (REPO, assert_trees_equal, cli, count_compilations, load_params, quick_config,
                     read_metrics, run_cli_config, train_run)


@pytest.fixture(scope="session")
def fmnist_dir():
  """The real tfds fashion_mnist, prepared once per session."""
  return helpers.fashion_data_dir()


@pytest.fixture(scope="session")
def small_dir():
  """A small fashion_mnist-format dataset (1,000 train / 500 test images) the session wrote."""
  return helpers.small_fashion_data_dir()


@pytest.fixture(scope="module")
def teacher_dir():
  """A quick teacher trained for a few steps (its quality does not matter here), shared with
  the other modules' distillation tests."""
  return helpers.quick_teacher_dir()


@pytest.mark.parametrize("mode,method", [
    ("distill", "erdkd"), ("distill", "ipwd"), ("self_distill", "kd"), ("self_distill", "ipwd")])
def test_modes_and_methods_run(small_dir, teacher_dir, tmp_path, mode, method):
  """The quickstart smoke covers teacher and distill with ce/kd/erkd/eakd/ipwd/dkd; these are
  the rest (ER-DKD, PS-KD, PS-KD + IPW), with IPWD's head checked too."""
  c = quick_config(small_dir, mode=mode, method=method, **{"teacher.checkpoint": teacher_dir})
  if mode == "self_distill":
    c.self_distill.ipw_start_epoch = 1
  with count_compilations("train_step") as compiled:
    summary = train_run(c, str(tmp_path))
  # Six steps, one program: nothing in the loop (a Python scalar, a changed sharding or dtype
  # of the state) makes XLA compile the step again.
  assert compiled == ["jit(sweep_train_step)"], compiled
  assert summary["steps"] == 6 and summary["last"]["count"] == 500
  losses = read_metrics(str(tmp_path))
  assert len(losses) == 6 and all(np.isfinite(v) for _, v in losses)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  if method == "ipwd":
    assert any("train/weight_mean" in r for r in rows)
    assert any("train/aux_ce" in r for r in rows)
  if mode == "distill":
    assert summary["teacher"]["count"] == 500
    assert 0 < summary["teacher"]["top1"] <= 100
  last = json.load(open(tmp_path / "eval_last.json"))
  assert len(last["per_class_recall"]) == 10


def test_cifar100_mock_data_through_the_cifar_config(tmp_path):
  """A CIFAR preset on tfds mock data: the device-resident path with pad-crop-flip."""
  spec = importlib.util.spec_from_file_location(
      "cifar100_config", os.path.join(REPO, "configs", "cifar100.py"))
  cifar_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cifar_config)
  c = cifar_config.get_config("resnet8,smoke")
  c.eval_batch_size = 64
  with tfds.testing.mock_data(num_examples=128):
    summary = train_run(c, str(tmp_path))
  assert summary["steps"] == 3
  assert json.load(open(tmp_path / "run_info.json"))["device_resident_input"] is True


def test_host_pipeline_matches_device_path(small_dir, tmp_path):
  """The same run fed by the grain host pipeline and by the device-resident path: the
  batches are identical by construction, so the losses agree."""
  runs = {}
  for source in ("host", "device"):
    c = quick_config(small_dir, steps=4, **{"dataset.input": source})
    train_run(c, str(tmp_path / source))
    runs[source] = read_metrics(str(tmp_path / source))
  np.testing.assert_allclose([v for _, v in runs["host"]], [v for _, v in runs["device"]],
                             rtol=1e-5)


CLI_STEPS = 5  # the runs that compare device and process counts


@pytest.fixture(scope="module")
def eight_device_run(small_dir, tmp_path_factory):
  """The teacher folder of one CLI run of CLI_STEPS steps in a fresh process with 8 virtual
  devices: the reference of both the 1-device run and the two-process run below.

  XLA:CPU now and then aborts an 8-device run ("Termination timeout",
  docs/NOTES.md#xlacpu-collective-hangs): such a run is retried."""
  root = tmp_path_factory.mktemp("dev8")
  for attempt in range(3):
    workdir = str(root / f"run{attempt}")
    result = cli(run_cli_config(workdir, small_dir, CLI_STEPS),
                 env=helpers.EIGHT_DEVICES, timeout=600)
    if "Termination timeout" not in result.stderr:
      break
  assert result.returncode == 0, result.stderr[-3000:]
  return os.path.join(workdir, "teacher")


def test_one_device_and_eight_devices_agree(small_dir, eight_device_run, tmp_path):
  """The same run (fresh processes) on 1 and on 8 virtual devices: the same losses and
  parameters within float tolerance."""
  runs = {8: eight_device_run}
  workdir = str(tmp_path / "dev1")
  result = cli(run_cli_config(workdir, small_dir, CLI_STEPS),
               env=helpers.ONE_DEVICE, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  runs[1] = os.path.join(workdir, "teacher")
  one, eight = read_metrics(runs[1]), read_metrics(runs[8])
  assert len(one) == len(eight) == 5
  np.testing.assert_allclose([v for _, v in one], [v for _, v in eight], rtol=1e-4)
  assert_trees_equal(load_params(runs[1]), load_params(runs[8]), rtol=1e-3, atol=1e-5)


def test_real_learning_quick_teacher_one_epoch(fmnist_dir, tmp_path):
  """One epoch of the quick teacher on real Fashion-MNIST reaches at least 85% test top-1."""
  c = quick_config(fmnist_dir, model="quick_teacher", steps=0, batch=128)
  c.log_every_steps = 100
  c.checkpoint.every_steps = 0
  summary = train_run(c, str(tmp_path))
  assert summary["steps"] == 60_000 // 128
  assert summary["last_top1"] >= 85.0, summary["last_top1"]


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(small_dir, tmp_path):
  """Three good steps leave a checkpoint; resumed with an absurd learning rate the run
  diverges, stops naming the step and the last good checkpoint, and that checkpoint (and
  every later one it wrote) holds only finite numbers."""
  train_run(quick_config(small_dir, steps=3), str(tmp_path))
  c = quick_config(small_dir, steps=12, **{"optimizer.lr": 1e12,
                                           "checkpoint.allow_changes": "optimizer.lr"})
  c.checkpoint.every_steps = 1
  with pytest.raises(train.TrainingDiverged, match=r"NaN or inf at step \d+") as info:
    train_run(c, str(tmp_path))
  mngr = checkpoint.run_manager(str(tmp_path / "checkpoints"))
  last = mngr.latest_step()
  assert last is not None and last >= 3
  assert f"checkpoints/{last}" in str(info.value)
  state = train.Experiment(jconfig.resolve(c), jax.devices()[:2]).init_state()
  restored, _ = checkpoint.restore_run(mngr, last, state)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored[0].params))


# --- subprocesses: the CLI, resume after SIGKILL, two hosts ---------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["--config.model=resnet9000"], "unknown model 'resnet9000'"),
    (["--config.method=superkd"], "unknown method 'superkd'"),
    (["--config.dataset.name=mnist3d"], "unknown dataset"),
    (["--config.batch_size=12"], "not divisible by the 8 devices"),
    (["--config.loss.temperature=0.0"], "temperature must be positive"),
    (["--config.teacher.checkpoint=/nonexistent/teacher"],
     "python -m jaxkd.convert --model resnet56"),
])
def test_cli_rejects_bad_configs_with_exit_code_2(tmp_path, overrides, message):
  """Validation runs before any data or compilation: no CIFAR data is needed to fail."""
  cfg = os.path.join(REPO, "configs", "cifar100.py") + ":resnet56-resnet20,method=erkd"
  base = ["--config", cfg, "--workdir", str(tmp_path / "never-created")]
  if "teacher.checkpoint" not in overrides[0]:
    base.append(f"--config.teacher.checkpoint={tmp_path}")  # exists; never read
  result = cli(base + overrides,
               env=helpers.EIGHT_DEVICES, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "never-created")


def test_resume_after_sigkill_and_ctrl_c_matches_an_uninterrupted_run(small_dir, tmp_path):
  """SIGKILL after a checkpoint, then the rerun resumes; that rerun is stopped with Ctrl-C
  (SIGINT): the step in flight finishes, a checkpoint of it is saved, exit code 130; the
  second rerun resumes from that step. The run ends bit-equal to an uninterrupted one, with
  the same losses at every step after the kill: a fault in either resume would show."""
  steps = 40
  env = helpers.ONE_DEVICE
  full = cli(run_cli_config(str(tmp_path / "full"), small_dir, steps), env=env, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir = str(tmp_path / "killed")
  args = run_cli_config(workdir, small_dir, steps)
  ckpt = os.path.join(workdir, "teacher", "checkpoints")
  killed_at = helpers.kill_after_checkpoint(args, ckpt, 6, env)
  assert killed_at < steps, "the run had finished before the kill"
  assert not os.path.exists(os.path.join(workdir, "teacher", "model"))

  # The rerun after the kill, interrupted once it has logged 3 rows past what the killed
  # run left in metrics.jsonl (so after it resumed and trained on).
  logged = sum(1 for _ in open(os.path.join(workdir, "teacher", "metrics.jsonl")))
  returncode, out, err = helpers.signal_cli_run(args, workdir, signal.SIGINT, logged + 3, env)
  assert returncode == 130, err[-3000:]
  assert f"Resumed from {ckpt}/{killed_at}" in out, out[-2000:]
  assert "Interrupted: saved step" in out, out[-2000:]
  saved = int(out.split("Interrupted: saved step ")[1].split()[0])
  assert killed_at < saved < steps
  assert saved in [int(d) for d in os.listdir(ckpt) if d.isdigit()]

  resumed = cli(args, env=env, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {ckpt}/{saved}" in resumed.stdout
  assert_trees_equal(load_params(str(tmp_path / "full" / "teacher")),
                     load_params(os.path.join(workdir, "teacher")))
  full_losses = dict(read_metrics(str(tmp_path / "full" / "teacher")))
  resumed_losses = dict(read_metrics(os.path.join(workdir, "teacher")))
  for step in range(killed_at + 1, steps + 1):
    assert resumed_losses[step] == full_losses[step]


def test_a_checkpoint_of_another_run_is_refused_clearly(small_dir, tmp_path):
  """Resuming a workdir whose checkpoint holds another model's state stops with a message
  that names the checkpoint, the changed field and what to do (exit 2 from the CLI), not an
  orbax traceback. The config fingerprint stored with the checkpoint catches it first."""
  train_run(quick_config(small_dir, steps=3), str(tmp_path))
  with pytest.raises(train.RunError,
                     match=r"checkpoints/3: model: 'quick_student' → 'quick_teacher'.*"
                     r"Use a new --workdir"):
    train_run(quick_config(small_dir, model="quick_teacher", steps=6), str(tmp_path))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FixedLogits:
  """A stand-in model whose "images" are its logits."""

  def apply(self, variables, images, train):
    return images


def test_eval_step_counts_match_numpy_and_stay_sharded():
  """Top-1/top-5 in lax.top_k's order (ties to the lower class), CE, per-class counts, padding
  rows nowhere; computed without gathering the logits of a batch sharded over 8 devices."""
  rng = np.random.default_rng(0)
  logits = rng.integers(-2, 3, (64, 7)).astype(np.float32)  # small integers: many ties
  labels = rng.integers(0, 7, 64).astype(np.int32)
  mask = rng.random(64) < 0.8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch = jax.device_put({"image": logits, "label": labels, "mask": mask},
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  step = jax.jit(lambda batch: train.eval_step(FixedLogits(), 7, None, batch))
  out = jax.device_get(step(batch))
  order = np.argsort(-logits, axis=1, kind="stable")  # top_k's order
  rank = np.argmax(order == labels[:, None], axis=1)
  z = logits.astype(np.float64)
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  ce = -logp[np.arange(64), labels]
  assert out["top1"] == np.sum((rank == 0) & mask)
  assert out["top5"] == np.sum((rank < 5) & mask)
  assert out["count"] == mask.sum()
  np.testing.assert_allclose(out["ce"], ce[mask].sum(), rtol=1e-5)
  np.testing.assert_array_equal(out["class_hits"],
                                np.bincount(labels[(rank == 0) & mask], minlength=7))
  np.testing.assert_array_equal(out["class_count"], np.bincount(labels[mask], minlength=7))
  assert "all-gather" not in step.lower(batch).compile().as_text()


def run_two_processes(workdir, data_dir, steps, timeout):
  """Two jaxkd.main processes on localhost with one CPU device each: [(returncode, stderr)],
  or None when they did not finish within `timeout` s (then killed)."""
  port = free_port()
  procs = []
  try:
    for pid in range(2):
      args = run_cli_config(workdir, data_dir, steps, extra=(
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"))
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "jaxkd.main", *args], cwd=REPO,
          env=helpers.cli_env(),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]
  except subprocess.TimeoutExpired:
    return None
  finally:  # a failed or timed-out run leaves no process behind
    for p in procs:
      p.kill()


def test_two_processes_agree_with_one(small_dir, eight_device_run, tmp_path):
  """Two processes on localhost (one CPU device each, Gloo between them) train a few steps
  like one process with 8 devices (the module's `eight_device_run`): the same global
  batches, the same losses.

  XLA:CPU now and then aborts ("Termination timeout") or hangs in a collective of an
  evaluation program, more often with several CPU devices per process
  (docs/NOTES.md#xlacpu-collective-hangs). So: one device per process, and a run that XLA
  aborts or that hangs is retried; nothing of jaxkd's runs in those threads."""
  steps = CLI_STEPS
  for attempt in range(3):  # a run takes ~35 s on 2 cores
    workdir = str(tmp_path / f"multi{attempt}")
    results = run_two_processes(workdir, small_dir, steps, timeout=180)
    if results is not None and not any("Termination timeout" in err for _, err in results):
      break
  assert results is not None, "two processes hung three times"
  for returncode, err in results:
    assert returncode == 0, err[-3000:]
  one = read_metrics(eight_device_run)
  two = read_metrics(os.path.join(workdir, "teacher"))
  assert len(one) == len(two) == steps
  np.testing.assert_allclose([v for _, v in one], [v for _, v in two], rtol=1e-4)


def test_quickstart_smoke_end_to_end(fmnist_dir, tmp_path):
  """The README's main job with the :smoke preset: teacher, then six students, one table."""
  result = cli(["--config", os.path.join(REPO, "configs", "quickstart.py") + ":smoke",
                "--workdir", str(tmp_path), f"--config.dataset.data_dir={fmnist_dir}",
                "--config.progress_bar=False"], timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.load(open(tmp_path / "summary.json"))
  assert [r["run"] for r in rows] == ["teacher", "ce", "kd", "erkd", "eakd", "ipwd", "dkd"]
  assert "| teacher | quick_teacher | ce |" in result.stdout
  top1 = [r["best_top1"] if r["run"] == "teacher" else r["best_top1"]["mean"] for r in rows]
  assert all(0 <= t <= 100 for t in top1), rows
  # The students trained as one sweep: each member a run folder of its own.
  sweep = json.load(open(tmp_path / "students" / "summary.json"))
  assert [m["name"] for m in sweep["members"]] == ["ce", "kd", "erkd", "eakd", "ipwd", "dkd"]
  assert set(sweep["paired"]) == {"kd", "ce"}
  for name in ("ce", "ipwd"):
    member = json.load(open(tmp_path / "students" / name / "summary.json"))
    assert member["method"] == name and member["steps"] == 6
    assert os.path.isdir(tmp_path / "students" / name / "model")
  teacher = json.load(open(tmp_path / "teacher" / "eval_last.json"))
  assert teacher["count"] == 10_000 and len(teacher["per_class_recall"]) == 10
