"""Runs that never lose or destroy work, in process: config fingerprints on resume, the
teacher's own workdir, guarded model replacement, the workdir lock, validation, the finite
guard over the whole state, checksums with fallback, restore_step, run files across resumes.

One 6-step run (checkpoints at 3 and 6) is trained once per module; each test works on a copy
of its workdir. Most refusals happen before any data is read, so they cost milliseconds.
docs/DESIGN.md#resume-safety describes the behaviour.
"""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import assert_trees_equal, load_params, quick_config, train_run
from jaxkd import checkpoint
from jaxkd import config as jconfig
from jaxkd import optim
from jaxkd.train import step as jstep
from jaxkd.train import workdir as jworkdir


@pytest.fixture(scope="module")
def small_dir():
  return helpers.small_fashion_data_dir()


@pytest.fixture(scope="module")
def base(small_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints 3 and 6, both with checksums) and its summary."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  summary = train_run(quick_config(small_dir, steps=6), workdir)
  return workdir, summary


def copy_of(base, tmp_path, name="run"):
  target = str(tmp_path / name)
  shutil.copytree(base[0], target)
  return target


def rows(workdir, name="metrics.jsonl"):
  path = os.path.join(workdir, name)
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def steps_logged(workdir):
  return [r["step"] for r in rows(workdir) if "train/loss" in r]


# --- 1: the config must be the one that wrote the checkpoint ---------------------------------


def test_a_changed_config_is_refused_listing_every_field(base, small_dir, tmp_path):
  """A changed learning rate or loss used to continue silently. Now: every changed field with
  old → new, the flag that would allow it, and no file of the run rewritten (bug 7)."""
  workdir = copy_of(base, tmp_path)
  before = {f: open(os.path.join(workdir, f)).read() for f in ("config.json", "run_info.json")}
  c = quick_config(small_dir, steps=9, **{"optimizer.lr": 0.5, "optimizer.nesterov": False})
  with pytest.raises(jworkdir.ConfigChangedError) as info:
    train_run(c, workdir)
  message = str(info.value)
  assert "optimizer.lr: 0.05 → 0.5" in message and "optimizer.nesterov: True → False" in message
  assert "--config.checkpoint.allow_changes=optimizer.lr,optimizer.nesterov" in message
  assert {f: open(os.path.join(workdir, f)).read() for f in before} == before
  # A changed model is the same one-line refusal, not an orbax tree diff.
  with pytest.raises(jworkdir.ConfigChangedError, match="model: 'quick_student' → 'quick_teacher'"):
    train_run(quick_config(small_dir, model="quick_teacher", steps=9), workdir)
  # CE → KD from a teacher: the mode, the loss and the teacher all differ.
  kd = quick_config(small_dir, mode="distill", method="kd",
                    **{"teacher.checkpoint": os.path.join(base[0], "model"),
                       "teacher.model": "quick_student"})
  with pytest.raises(jworkdir.ConfigChangedError, match=r"mode: 'teacher' → 'distill'.*loss\.base"):
    train_run(kd, workdir)


def test_an_allowed_change_resumes_and_is_recorded(base, small_dir, tmp_path):
  """allow_changes names what may differ; the change is printed and kept in run_info.json's
  history of starts, and the steps replayed after the checkpoint are logged once."""
  workdir = copy_of(base, tmp_path)
  c = quick_config(small_dir, steps=9, **{"optimizer.lr": 0.02,
                                          "checkpoint.allow_changes": "optimizer.lr"})
  summary = train_run(c, workdir)
  assert summary["steps"] == 9
  info = json.load(open(os.path.join(workdir, "run_info.json")))
  assert [s["resumed_from"] for s in info["starts"]] == [None, 6]
  assert info["starts"][1]["allowed_changes"] == [
      {"field": "optimizer.lr", "old": 0.05, "new": 0.02}]
  assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["lr"] == 0.02
  assert steps_logged(workdir) == list(range(1, 10))


def test_a_student_in_its_teachers_workdir_is_refused(base, small_dir, tmp_path):
  """A distill run whose workdir is its teacher's resumed the teacher's run and replaced
  the teacher's model with the student. Now refused before anything is touched."""
  workdir = copy_of(base, tmp_path)
  model_json = open(os.path.join(workdir, "model", "model.json")).read()
  c = quick_config(small_dir, mode="distill", method="kd",
                   **{"teacher.checkpoint": os.path.join(workdir, "model"),
                      "teacher.model": "quick_student"})
  with pytest.raises(jworkdir.RunError, match="holds this run's own teacher"):
    train_run(c, workdir)
  assert open(os.path.join(workdir, "model", "model.json")).read() == model_json


@pytest.mark.parametrize("edit,message", [
    ({"num_classes": 100}, "has 100 classes, but fashion_mnist has 10"),
    ({"model": "quick_teacher"}, "holds a quick_teacher, but config.teacher.model is "
     "quick_student; set --config.teacher.model=quick_teacher"),
])
def test_a_mismatched_teacher_is_refused_before_anything_is_built(base, small_dir, tmp_path,
                                                                  edit, message):
  teacher = tmp_path / "teacher"
  shutil.copytree(os.path.join(base[0], "model"), teacher)
  meta = json.loads((teacher / "model.json").read_text())
  (teacher / "model.json").write_text(json.dumps({**meta, **edit}))
  c = quick_config(small_dir, mode="distill", method="kd",
                   **{"teacher.checkpoint": str(teacher), "teacher.model": "quick_student"})
  with pytest.raises(jworkdir.RunError, match=message):
    train_run(c, str(tmp_path / "student"))
  assert not os.path.exists(tmp_path / "student" / "checkpoints")


def test_a_missing_fashion_teacher_suggests_a_command_that_works(small_dir, tmp_path):
  """It suggested configs/cifar100.py:quick_teacher, which fails on Fashion-MNIST."""
  c = quick_config(small_dir, mode="distill", method="kd",
                   **{"teacher.checkpoint": str(tmp_path / "none")})
  with pytest.raises(jconfig.ConfigError) as info:
    jconfig.validate(c)
  assert "configs/quickstart.py --config.suite=\"('teacher',)\"" in str(info.value)
  assert "cifar100" not in str(info.value)


# --- 2: nothing but a jaxkd model folder is ever replaced ------------------------------------


def test_the_trainers_export_never_replaces_a_foreign_folder(small_dir, tmp_path):
  workdir = tmp_path / "run"
  (workdir / "model").mkdir(parents=True)
  (workdir / "model" / "notes.txt").write_text("mine")
  with pytest.raises(jworkdir.RunError, match=r"not a jaxkd model folder \(it holds notes.txt\)"):
    train_run(quick_config(small_dir, steps=3), str(workdir))
  assert (workdir / "model" / "notes.txt").read_text() == "mine"


def test_save_model_variables_replaces_only_model_folders(base, tmp_path):
  variables, meta = checkpoint.restore_model_variables(os.path.join(base[0], "model"))
  save = functools.partial(checkpoint.save_model_variables, variables=variables,
                           model=meta["model"], num_classes=10)
  target = tmp_path / "out"
  target.mkdir()
  (target / "data.csv").write_text("1,2")
  with pytest.raises(checkpoint.ModelExistsError, match="already exists"):
    save(target)
  with pytest.raises(checkpoint.ModelExistsError, match="not a jaxkd model folder"):
    save(target, overwrite=True)
  assert (target / "data.csv").read_text() == "1,2"
  empty = tmp_path / "empty"
  empty.mkdir()
  save(empty, overwrite=True)
  save(empty, overwrite=True)  # a jaxkd model folder: replaced
  assert sorted(os.listdir(empty)) == ["model.json", "variables"]
  assert sorted(os.listdir(tmp_path)) == ["empty", "out"]  # no temporary sibling left


def test_convert_refuses_to_delete_its_source_or_foreign_files(tmp_path, capsys):
  from jaxkd import convert
  out = tmp_path / "out"
  out.mkdir()
  source = out / "teacher.pth"
  source.write_bytes(b"weights")
  (out / "other.txt").write_text("keep")
  args = ["--model", "resnet8", "--torch", str(source), "--out", str(out), "--overwrite"]
  assert convert.main(args) == 1
  assert "lies inside --out" in capsys.readouterr().err
  moved = tmp_path / "teacher.pth"
  shutil.move(source, moved)
  assert convert.main(["--model", "resnet8", "--torch", str(moved), "--out", str(out)]) == 1
  assert "pass --overwrite" in capsys.readouterr().err
  assert convert.main(args[:3] + [str(moved)] + args[4:]) == 1
  assert "not a jaxkd model folder" in capsys.readouterr().err
  assert (out / "other.txt").read_text() == "keep" and moved.read_bytes() == b"weights"


def test_convert_says_why_a_pickle_is_refused(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from jaxkd import convert
  path = tmp_path / "pickled.pth"
  torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "extra": socket.AddressFamily.AF_INET},
             path)
  assert convert.main(["--model", "resnet8", "--torch", str(path), "--out",
                       str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert "never run code" in err and "weights_only=False" not in err


# --- 3: the workdir lock -----------------------------------------------------------------------


def test_a_locked_workdir_is_refused_naming_the_holder(base, small_dir, tmp_path):
  workdir = copy_of(base, tmp_path)
  with jworkdir.WorkdirLock(workdir):
    with pytest.raises(jworkdir.WorkdirBusyError,
                       match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
      train_run(quick_config(small_dir, steps=6), workdir)


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  (tmp_path / jworkdir.LOCK_FILE).write_text(json.dumps(
      {"pid": int(dead), "host": socket.gethostname(), "started": "earlier"}))
  with jworkdir.WorkdirLock(str(tmp_path)):
    pass
  assert f"Took over the lock of process {dead}" in capsys.readouterr().out


# --- 8, 9: validation --------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("eval_every_epochs", 0, "eval_every_epochs must be an integer ≥ 1"),
    ("eval_every_epochs", True, "eval_every_epochs must be an integer ≥ 1"),
    ("checkpoint.keep", 0, "with none the run could never resume"),
    ("checkpoint.keep", -1, "checkpoint.keep must be an integer ≥ 1"),
    ("checkpoint.restore_step", -2, "restore_step must be an integer ≥ 0"),
    ("checkpoint.allow_changes", "optimizer.lrr", "'optimizer.lrr', which is not a config"),
])
def test_the_trainer_validates_its_config(small_dir, tmp_path, field, value, message):
  """train_and_evaluate validates too (it used to run keep=0 keeping nothing, and crash on
  eval_every_epochs=0 at the first epoch end)."""
  with pytest.raises(jconfig.ConfigError, match=message):
    train_run(quick_config(small_dir, steps=3, **{field: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_a_method_override_alone_is_refused(tmp_path):
  """--config.method=erkd over a KD config only relabelled the run (it trained KD)."""
  c = helpers.config_module("cifar100").get_config(
      f"resnet32x4-resnet8x4,method=kd,teacher_checkpoint={tmp_path}")
  c.method = "erkd"
  with pytest.raises(jconfig.ConfigError, match=r"method='erkd'.*weighting='entropy'.*"
                     r"\(method 'kd'\).*only relabel"):
    jconfig.validate(c)
  c.loss.weighting = "entropy"
  jconfig.validate(c)


# --- 4: the finite guard covers every floating leaf -------------------------------------------


def test_the_guard_catches_inf_in_batchnorm_statistics():
  """Huge inputs overflow a BatchNorm variance while the loss and the updated parameters stay
  finite; the old guard (loss and parameters only) kept that state."""
  c = jconfig.default_config()
  jconfig.apply_method(c, "ce")
  c.mode = "teacher"
  cfg = jstep.make_step_config(model="quick_student", num_classes=10,
                               objective=jconfig.resolve(c).objective,
                               optimizer=optim.OptimizerConfig(), steps_per_epoch=10,
                               num_epochs=1)
  state = jstep.init_train_state(cfg, jax.random.key(0), image_shape=(28, 28, 1),
                                 feature_dim=0)
  images = jnp.full((8, 28, 28, 1), 1e20, jnp.float32).at[0].set(-1e20)
  batch = {"image": images, "label": jnp.arange(8) % 10, "index": jnp.arange(8)}
  _, updates = cfg.model.apply({"params": state.params["model"],
                                "batch_stats": state.batch_stats}, images, train=True,
                               mutable=["batch_stats"])
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(updates))  # the case itself
  new, metrics = jax.jit(functools.partial(jstep.train_step, cfg))(state, batch, None)
  assert np.isfinite(metrics["loss"])
  assert int(new.nonfinite_step) == 0
  assert_trees_equal(new.batch_stats, state.batch_stats)
  assert_trees_equal(new.opt_state, state.opt_state)


# --- 5, 6, 4: damaged checkpoints fall back; restore_step ------------------------------------


def flip_a_byte(step_dir):
  """The largest array file of the state, one byte inverted in its middle."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  return path


def truncate_meta(step_dir):
  path = os.path.join(step_dir, "meta", "metadata")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  return path


@pytest.mark.parametrize("damage", [flip_a_byte, truncate_meta])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(base, small_dir, tmp_path,
                                                                    capsys, damage):
  """A bit flip used to restore silently and a truncated file stopped the run with a
  traceback. Now: one line naming the step and the file, the previous step is used, the
  damaged one is moved aside, and the retrained steps equal the original run's bit for bit."""
  workdir = copy_of(base, tmp_path)
  path = damage(os.path.join(workdir, "checkpoints", "6"))
  summary = train_run(quick_config(small_dir, steps=6), workdir)
  out = capsys.readouterr().out
  assert f"checkpoint step 6 is damaged ({path}" in out, out
  assert "checkpoints/3." in out  # "Resumed from .../checkpoints/3."
  assert summary["steps"] == 6
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith("6-")
  assert_trees_equal(load_params(workdir), load_params(base[0]))
  assert steps_logged(workdir) == list(range(1, 7))
  assert [r["step"] for r in rows(workdir, "metrics.replayed.jsonl") if "train/loss" in r] == [
      4, 5, 6]


def test_restore_step_resumes_from_an_older_step(base, small_dir, tmp_path, capsys):
  workdir = copy_of(base, tmp_path)
  c = quick_config(small_dir, steps=6, **{"checkpoint.restore_step": 3})
  train_run(c, workdir)
  assert "Resumed from" in capsys.readouterr().out
  assert os.listdir(os.path.join(workdir, "superseded_checkpoints"))[0].startswith("6-")
  assert_trees_equal(load_params(workdir), load_params(base[0]))
  with pytest.raises(jworkdir.RunError, match=r"restore_step=5 is not a saved step.*holds steps 3, 6"):
    train_run(quick_config(small_dir, steps=6, **{"checkpoint.restore_step": 5}), workdir)


def test_a_checkpoint_holding_inf_is_passed_over(base, small_dir, tmp_path, capsys):
  """A restored state is checked too: a step with inf in a BatchNorm variance (written by an
  older jaxkd, or damaged) is not resumed from."""
  import orbax.checkpoint as ocp
  workdir = copy_of(base, tmp_path)
  c = quick_config(small_dir, steps=6)
  manager = checkpoint.run_manager(os.path.join(workdir, "checkpoints"))
  # Restored without a target: the same tree as plain dicts, saved back the same way.
  state = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  meta = checkpoint.read_run_meta(manager, 6)
  state[0]["batch_stats"] = jax.tree.map(lambda x: x + jnp.inf, state[0]["batch_stats"])
  manager.delete(6)
  checkpoint.save_run(manager, 6, state, meta)
  manager.wait_until_finished()
  manager.close()
  train_run(c, workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 6 holds NaN or inf in " in out and "batch_stats" in out
  assert_trees_equal(load_params(workdir), load_params(base[0]))
