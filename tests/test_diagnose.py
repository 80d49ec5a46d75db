"""The trainer's diagnostics.json (jaxkd/train/diagnose.py) from two tiny real runs.

A CE run of `quick_student` (its own class mass and calibration; it is also the vanilla
student of the report), then IPWD distilling a `quick_student` from it (the teacher's class
mass, calibration, sample weights), both on a long-tailed subset of the train split (so the
class-mass pass must read that subset). They share one module fixture; the numbers are checked
against NumPy float64 recomputations from the saved models and the logged metrics, and
`jaxkd.report` over the two draws every figure that needs diagnostics.json.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxkd import checkpoint
from jaxkd import diagnostics as dg
from jaxkd import models
from jaxkd import report as jreport
from jaxkd.data import augment
from jaxkd.data import arrays as jarrays
from jaxkd.data import datasets

from helpers import quick_config, read_metrics, small_fashion_data_dir, train_run

STEPS, BATCH, N_TEST, LT = 6, 32, 500, {"dataset.long_tail_factor": 2.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("diagnose"))
  data_dir = small_fashion_data_dir()
  teacher = os.path.join(root, "teacher")
  train_run(quick_config(data_dir, model="quick_student", steps=STEPS, batch=BATCH, **LT),
            teacher)
  student = os.path.join(root, "ipwd")
  train_run(quick_config(data_dir, mode="distill", method="ipwd", steps=STEPS, batch=BATCH,
                         **LT, **{"teacher.model": "quick_student",
                            "teacher.checkpoint": os.path.join(teacher, "model")}), student)
  read = lambda run: json.load(open(os.path.join(root, run, "diagnostics.json")))
  return {"root": root, "data_dir": data_dir, "teacher": read("teacher"),
          "ipwd": read("ipwd")}


def _logits(run_dir, data_dir, split):
  """The saved model's logits [N, C] over a split (the train split's long-tailed subset), in
  order, without augmentation."""
  variables, meta = checkpoint.restore_model_variables(os.path.join(run_dir, "model"))
  model = models.create(meta["model"], 10)
  arrays = jarrays.load_arrays("fashion_mnist", split, data_dir,
                                long_tail_factor=LT["dataset.long_tail_factor"])
  spec = datasets.spec("fashion_mnist")
  images = augment.augment_batch(arrays["image"], spec, train=False)
  logits = jax.jit(lambda x: model.apply(variables, x, train=False))(images)
  return np.asarray(logits, np.float64), arrays["label"]


def _check_mass(record, logits):
  assert record["split"] == "train" and record["augmentation"] is False
  assert record["num_examples"] == len(logits) < 1000  # the subset of the 1,000
  assert record["temperatures"] == list(dg.TEMPERATURES)
  np.testing.assert_allclose(record["mass"], dg.class_mass(logits), rtol=2e-4, atol=1e-3)


def test_teacher_run_writes_its_own_class_mass_and_calibration(runs):
  d = runs["teacher"]
  assert d["format"] == dg.DIAGNOSTICS_FORMAT and d["num_classes"] == 10
  assert d["step"] == STEPS and d["epoch"] == 1 and "teacher_class_mass" not in d
  (seed,) = d["seeds"]
  assert seed["seed"] == 0 and "weights" not in seed
  teacher_dir = os.path.join(runs["root"], "teacher")
  _check_mass(seed["self_class_mass"], _logits(teacher_dir, runs["data_dir"], "train")[0])
  logits, labels = _logits(teacher_dir, runs["data_dir"], "test")
  want, got = dg.calibration(logits, labels), seed["calibration"]
  assert got["num_examples"] == N_TEST and got["bins"]["count"] == want["bins"]["count"]
  for key in ("top1", "nll", "ece", "aurc", "e_aurc"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
  last = json.load(open(os.path.join(teacher_dir, "eval_last.json")))
  assert got["top1"] == pytest.approx(last["top1"]) and got["nll"] == pytest.approx(last["ce"])


def test_distill_run_writes_teacher_mass_calibration_and_weights(runs):
  d = runs["ipwd"]
  assert d["step"] == STEPS and d["num_classes"] == 10
  # The teacher is the first run's model over the same training examples.
  np.testing.assert_allclose(d["teacher_class_mass"]["mass"],
                             runs["teacher"]["seeds"][0]["self_class_mass"]["mass"], rtol=1e-5)
  (seed,) = d["seeds"]
  assert "self_class_mass" not in seed
  student_dir = os.path.join(runs["root"], "ipwd")
  logits, labels = _logits(student_dir, runs["data_dir"], "test")
  np.testing.assert_allclose(seed["calibration"]["ece"], dg.calibration(logits, labels)["ece"],
                             rtol=1e-4, atol=1e-5)
  w = seed["weights"]
  (epoch,) = w["per_epoch"]  # six steps of a longer epoch: the run's one partial epoch
  final = w["final"]
  assert epoch["epoch"] == 1 and final["count"] == STEPS * BATCH
  assert epoch["mean"] == pytest.approx(final["mean"]) and len(final["class_mean"]) == 10
  # Every step's batch mean was logged; equal batches make their mean the epoch's mean.
  logged = [v for _, v in read_metrics(student_dir, "train/weight_mean")]
  assert len(logged) == STEPS
  np.testing.assert_allclose(final["mean"], np.mean(logged), rtol=1e-5)
  assert sum(final["histogram"]["counts"]) == STEPS * BATCH
  assert final["min"] <= final["percentiles"]["50"] <= final["max"]


def test_report_draws_the_figures_that_need_diagnostics(runs):
  out = os.path.join(runs["root"], "report")
  result = jreport.write_report([runs["root"]], out)
  assert result["baseline"] == "teacher"
  names = {os.path.basename(p) for p in result["figures"]}
  assert {"reliability.png", "class_mass.png", "recall_gain.png", "weight_histograms.png",
          "weight_vs_mass.png", "weights_over_training.png"} <= names, names
  md = open(result["markdown"]).read()
  ece = runs["ipwd"]["seeds"][0]["calibration"]["ece"]
  assert f"{100 * ece:.2f}" in md and "No diagnostics.json" not in md


def test_quickstart_long_tail_preset(tmp_path):
  """`configs/quickstart.py:lt=100`: every run of the suite, the teacher too, trains on the
  CIFAR-100-LT profile of Fashion-MNIST, for 4 student epochs (8 for the teacher)."""
  from jaxkd import config as jconfig
  from jaxkd import suite
  from jaxkd.data import long_tail
  from helpers import config_module
  c = config_module("quickstart").get_config("lt=100")
  runs = dict(suite.expand(c, str(tmp_path)))
  assert set(runs) == {"teacher", "students"}
  for name, run in runs.items():
    spec = jconfig.resolve(run)
    assert spec.data.long_tail_factor == 100.0 and spec.data.long_tail_seed == 0, name
    assert spec.num_epochs == (8 if name == "teacher" else 4), name
  dkd = {m.name: m for m in jconfig.resolve(runs["students"]).members}["dkd"]
  assert dkd.objective.loss.dkd_warmup_epochs == 4.0
  counts = long_tail.long_tail_counts(6000, 10, 100.0)  # the docstring's numbers
  assert (counts[0], counts[-1], counts.sum()) == (6000, 60, 14886)
  plain = config_module("quickstart").get_config("lt=10,epochs=2,smoke")
  assert plain.dataset.long_tail_factor == 10.0 and plain.num_epochs == 2
  assert config_module("quickstart").get_config(None).dataset.get("long_tail_factor") is None


def test_a_resumed_run_keeps_its_diagnostics(runs):
  """Rerun on its finished workdir, the IPWD run resumes at its last step and trains
  nothing: the diagnostics it writes again come from the checkpoint's metadata."""
  student = os.path.join(runs["root"], "ipwd")
  os.remove(os.path.join(student, "diagnostics.json"))
  train_run(quick_config(runs["data_dir"], mode="distill", method="ipwd", steps=STEPS,
                         batch=BATCH, **LT, **{"teacher.model": "quick_student",
                                               "teacher.checkpoint": os.path.join(
                                                   runs["root"], "teacher", "model")}), student)
  again = json.load(open(os.path.join(student, "diagnostics.json")))
  assert again == runs["ipwd"]
