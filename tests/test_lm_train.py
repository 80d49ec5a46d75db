"""The language-model trainer end to end on Debian's fortunes (configs/lm.py:smoke).

One smoke suite through the CLI (teacher, then the five students in one sweep) is shared by
the tests below; they add a killed-and-resumed sweep, 1 vs 8 devices, FSDP vs replicated,
the config errors, and real learning at a small scale. The corpus is prepared at vocabulary
512 and rows of 32 tokens (seconds); without the package the tests skip (CI installs it).
"""

import json
import os

import jax
import numpy as np
import pytest

from tests import helpers
from jaxkd import lm_config
from jaxkd import report_runs
from jaxkd import sharding
from jaxkd import suite as jsuite
from jaxkd.data import datasets
from jaxkd.data import text_builder
from jaxkd.train import lm_export
from jaxkd.train import lm_loop

LM_CONFIG = os.path.join(helpers.REPO, "configs", "lm.py")
METHODS = ("ce", "kd", "erkd", "eakd", "ipwd")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lm_data"))
  try:
    text_builder.ensure_fortunes(path, vocab_size=512, seq_len=32)
  except datasets.DatasetNotFoundError as e:
    if helpers.in_ci():
      pytest.fail(f"The fortunes corpus is required (CI=true): {e}", pytrace=False)
    pytest.skip(f"Debian package fortunes is not installed: {e}")
  return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory, data_dir):
  """The smoke suite through the CLI: (workdir, stdout)."""
  workdir = str(tmp_path_factory.mktemp("lm_suite"))
  out = helpers.cli(["--config", f"{LM_CONFIG}:smoke", "--workdir", workdir,
                     f"--config.data.data_dir={data_dir}"], timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stdout


def _config(arg, data_dir, **fields):
  c = helpers.config_module("lm").get_config(arg)
  c.data.data_dir = data_dir
  return helpers.set_fields(c, fields)


def _params(folder):
  meta = lm_export.read_metadata(folder)
  like = _abstract(meta)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return lm_export.restore(folder, like, jax.tree.map(lambda _: one, like))


def _abstract(meta):
  from jaxkd.models import transformer
  model = transformer.create_lm(meta["model"], meta["vocab_size"])
  return jax.eval_shape(lambda k: model.init(k, np.zeros((1, 8), np.int32))["params"],
                        jax.random.key(0))


def test_cli_smoke_suite_writes_every_result(suite):
  workdir, stdout = suite
  table = open(os.path.join(workdir, "summary.md")).read()
  for m in METHODS:
    assert f"| {m} | lm_tiny | {m} |" in table, table
  assert "| unigram |" in table and "Validation perplexity" in stdout
  teacher = lm_export.read_metadata(os.path.join(workdir, "teacher", "model"))
  assert teacher["model"] == "lm_tiny" and teacher["vocab_size"] == 512
  sweep = json.load(open(os.path.join(workdir, "students", "summary.json")))
  assert sweep["format"] == "jaxkd-lm-sweep-1"
  assert [s["method"] for s in sweep["members"]] == list(METHODS)
  for s in sweep["members"]:
    folder = os.path.join(workdir, "students", s["method"])
    assert np.isfinite(s["val_ppl"]) and s["val_ppl"] < 512 * 1.2, s  # about uniform or better
    assert s["teacher"]["val_ppl"] > 0 and s["unigram_ppl"] > 0
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    assert any("eval/val_ppl" in r for r in rows) and any("train/loss" in r for r in rows)
    bins = s["last"]["by_teacher_entropy"]
    assert len(bins) == 8 and abs(sum(b["token_share"] for b in bins) - 1) < 1e-6
    assert lm_export.read_metadata(os.path.join(folder, "model"))["method"] == s["method"]
  ipwd = [json.loads(line) for line in open(os.path.join(workdir, "students", "ipwd",
                                                          "metrics.jsonl"))]
  assert any("train/aux_ce" in r for r in ipwd)
  with pytest.raises(report_runs.ReportError, match="language-model runs"):
    report_runs.find_runs([workdir])  # the image report says where LM results are instead
  # IPWD's weights are ≥ 1 (1 + a likelihood ratio); ER-KD's are the teacher's entropy.
  by = {s["method"]: s["last"]["by_teacher_entropy"] for s in sweep["members"]}
  assert all(b["weight_mean"] is None or b["weight_mean"] >= 1 for b in by["ipwd"])
  for b in by["erkd"]:
    if b["weight_mean"] is not None:
      lo, hi = b["teacher_entropy"]
      assert lo - 1e-3 <= b["weight_mean"] <= hi + 1e-3, b  # τ′ = τ = 1: w = H_t itself


def test_sigkill_resume_is_exact(suite, data_dir, tmp_path):
  """A sweep killed after its first checkpoint resumes to bit-identical models."""
  teacher = os.path.join(suite[0], "teacher", "model")
  arg = f"distill,smoke,teacher_checkpoint={teacher}"
  overrides = {"sweep": ("kd", "ipwd"), "steps": 9, "log_every_steps": 1}
  whole = str(tmp_path / "whole")
  # One device, as the command-line runs below have (helpers.cli_env).
  lm_loop.train_and_evaluate(_config(arg, data_dir, **overrides), whole,
                             devices=jax.devices()[:1])
  killed = str(tmp_path / "killed")
  args = ["--config", f"{LM_CONFIG}:{arg}", "--workdir", killed,
          f"--config.data.data_dir={data_dir}", "--config.sweep=('kd','ipwd')",
          "--config.steps=9", "--config.log_every_steps=1"]
  assert helpers.kill_after_checkpoint(args, os.path.join(killed, "checkpoints"), 3) < 9
  out = helpers.cli(args, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from" in out.stdout
  for m in ("kd", "ipwd"):
    helpers.assert_trees_equal(_params(os.path.join(whole, m, "model")),
                               _params(os.path.join(killed, m, "model")))
    a, b = (json.load(open(os.path.join(w, m, "summary.json"))) for w in (whole, killed))
    assert a["val_ppl"] == b["val_ppl"] and a["steps"] == b["steps"] == 9


def test_one_device_eight_devices_and_fsdp_agree(data_dir, tmp_path):
  """The same teacher run on 1 device, on 8 (batch sharded) and on 8 with FSDP."""
  config = lambda **kw: _config("teacher,smoke", data_dir, **kw)
  runs = {}
  for name, devices, fsdp in (("one", jax.devices()[:1], False), ("eight", None, False),
                              ("fsdp", None, True)):
    runs[name] = lm_loop.train_and_evaluate(config(fsdp=fsdp), str(tmp_path / name),
                                            devices=devices)
    runs[name]["params"] = _params(str(tmp_path / name / "model"))
  for name in ("eight", "fsdp"):
    helpers.assert_trees_equal(runs["one"]["params"], runs[name]["params"], rtol=2e-4,
                               atol=2e-6)
    assert abs(runs[name]["val_ppl"] - runs["one"]["val_ppl"]) < 1e-3 * runs["one"]["val_ppl"]
  info = json.load(open(tmp_path / "fsdp" / "run_info.json"))
  assert info["fsdp"] is True and len(info["devices"]) == 8


def test_fsdp_shards_what_is_large():
  mesh = sharding.make_mesh()
  tree = {"embed": jax.ShapeDtypeStruct((512, 32), np.float32),
          "odd": jax.ShapeDtypeStruct((33, 31), np.float32),
          "scale": jax.ShapeDtypeStruct((32,), np.float32),
          "step": jax.ShapeDtypeStruct((), np.int32)}
  specs = {k: v.spec for k, v in sharding.fsdp_sharded(tree, mesh).items()}
  assert specs["embed"] == jax.sharding.PartitionSpec("data")
  assert specs["odd"] == specs["scale"] == specs["step"] == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("fields,message", [
    ({"method": "dkd"}, "unknown language-model method 'dkd'"),
    ({"mode": "teacher", "sweep": ("kd",)}, "config.sweep is for distillation"),
    ({"sweep": ("kd", "kd")}, "names a method twice"),
    ({"teacher.checkpoint": ""}, "teacher.checkpoint is empty"),
    ({"teacher.checkpoint": "/nonexistent"}, "is not a language-model folder"),
    ({"batch_size": 12}, "not divisible by the 8 devices"),
    ({"data.vocab_size": 100}, "too small"),
    ({"warmup_steps": 6}, "warmup_steps must be"),
    ({"model": "resnet8x4"}, "is not a language model"),
    ({"loss.divergence": "kl"}, "loss.divergence must be one of"),
    ({"data.corpus": "/nonexistent/texts"}, "data.corpus='/nonexistent/texts' is neither"),
])
def test_config_errors_name_the_field(fields, message):
  c = _config("distill,smoke,teacher_checkpoint=/nonexistent", None, **fields)
  with pytest.raises(lm_config.ConfigError, match=message):
    lm_config.validate(c, device_count=8)


@pytest.mark.parametrize("arg", ["", "smoke", "gpt2", "gpt2,fsdp=true,methods=kd+eakd",
                                 "teacher,steps=50"])
def test_every_preset_validates(arg):
  c = helpers.config_module("lm").get_config(arg)
  if c.get("suite"):
    jsuite.validate(c, device_count=8)
  else:
    lm_config.validate(c, device_count=8)


def test_a_teacher_of_another_vocabulary_is_refused(suite, data_dir, tmp_path):
  teacher = os.path.join(suite[0], "teacher", "model")
  c = _config(f"distill,smoke,teacher_checkpoint={teacher}", data_dir, **{"data.vocab_size": 600})
  with pytest.raises(lm_export.LMModelError, match="another tokenizer"):
    lm_loop.train_and_evaluate(c, str(tmp_path / "w"))


def test_real_learning_on_fortunes(data_dir, tmp_path):
  """A 2 × 128 teacher trained 60 steps on the real corpus beats the unigram baseline by
  far, and a 1 × 32 student distilled from it (KD, 60 steps) beats the same student trained
  with CE alone on the same batches. On one device: 17 s. (The CPU preset's figures, at
  vocabulary 8192 and 300 steps, are in docs/LM.md.)"""
  one = jax.devices()[:1]
  fields = {"steps": 60, "batch_size": 16, "eval_every_steps": 1000, "log_every_steps": 1000,
            "checkpoint.every_steps": 1000, "optimizer.lr": 3e-3}
  teacher = lm_loop.train_and_evaluate(
      _config("teacher,smoke", data_dir, model="lm_student_cpu", **fields),
      str(tmp_path / "teacher"), devices=one)
  assert teacher["val_ppl"] < 0.7 * teacher["unigram_ppl"], teacher  # 114.6 vs 213.6
  students = lm_loop.train_and_evaluate(
      _config(f"distill,smoke,teacher_checkpoint={tmp_path / 'teacher' / 'model'}", data_dir,
              sweep=("ce", "kd"), **{"teacher.model": "lm_student_cpu"}, **fields),
      str(tmp_path / "students"), devices=one)
  ce, kd = students["members"]
  assert kd["val_ppl"] < 0.97 * ce["val_ppl"], (kd["val_ppl"], ce["val_ppl"])  # 178.7, 190.9
  assert kd["val_kl"] < ce["val_kl"]
