"""jaxkd.config and jaxkd.suite: typed preset options, every preset of the configs, suites,
validation messages and the frozen RunSpec.

The configs are loaded from their files (as `--config configs/FILE.py:ARG` does), and the
expected recipe numbers are written here from docs/METHODS.md#recipes, not read from the
configs.
"""

import dataclasses
import os

import pytest

import helpers
from jaxkd import config as jconfig
from jaxkd import objectives
from jaxkd import suite
from jaxkd.config import ConfigError


# docs/METHODS.md#cifar-100: (teacher, student): (lr, DKD β of mdistiller, β of the ER-KD fork).
# Written out from the docs on purpose, not imported from configs/cifar100.py: an independent
# oracle for the presets.
CIFAR_PAIRS = {
    ("resnet56", "resnet20"): (0.05, 2.0, None),
    ("resnet110", "resnet32"): (0.05, 2.0, None),
    ("resnet32x4", "resnet8x4"): (0.05, 8.0, 3.0),
    ("resnet32x4", "ShuffleV1"): (0.01, 8.0, None),
    ("resnet32x4", "ShuffleV2"): (0.01, 8.0, 3.0),
    ("ResNet50", "MobileNetV2"): (0.01, 8.0, 3.0),
    ("vgg13", "MobileNetV2"): (0.01, 6.0, 2.0),
    ("vgg13", "vgg8"): (0.05, 6.0, 2.0),
    ("wrn_40_2", "ShuffleV1"): (0.01, 8.0, None),
    ("wrn_40_2", "wrn_16_2"): (0.05, 6.0, 2.0),
    ("wrn_40_2", "wrn_40_1"): (0.05, 6.0, 2.0),
}
CIFAR_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13")
DISTILL_METHODS = ("kd", "erkd", "eakd", "ipwd", "dkd", "erdkd", "eadkd")
IMAGENET_PAIRS = {"r34-r18": ("resnet34_imagenet", "resnet18_imagenet", 0.5),
                  "r50-mv1": ("resnet50_imagenet", "mobilenetv1_imagenet", 2.0)}


load = helpers.config_module


def get(name, arg=None):
  return load(name).get_config(arg)


# --------------------------------------------------------------------------------------------
# parse_arg


def test_parse_arg_typed():
  positional, named = jconfig.parse_arg(
      " a-b, method=kd ,lt=100,smoke,epochs=3,flag=yes,off=0,path=x=y",
      method=str, lt=float, epochs=int, flag=bool, off=bool, path=str)
  assert positional == ["a-b", "smoke"]
  assert named == {"method": "kd", "lt": 100.0, "epochs": 3, "flag": True, "off": False,
                   "path": "x=y"}
  assert type(named["lt"]) is float and type(named["epochs"]) is int


@pytest.mark.parametrize("arg", [None, "", " , "])
def test_parse_arg_empty(arg):
  assert jconfig.parse_arg(arg, method=str) == ([], {})


def test_parse_arg_unknown_option_names_the_accepted_ones():
  with pytest.raises(ConfigError, match=r"unknown config option 'beta'.*takes lt, method\."):
    jconfig.parse_arg("a,beta=2", method=str, lt=float)
  with pytest.raises(ConfigError, match="takes no options"):
    jconfig.parse_arg("a,beta=2")


@pytest.mark.parametrize("arg,kind", [("lt=abc", "a number"), ("epochs=2.5", "an integer"),
                                      ("flag=maybe", "true or false")])
def test_parse_arg_wrong_type(arg, kind):
  with pytest.raises(ConfigError, match=rf"{arg.split('=')[0]}=.* must be {kind}"):
    jconfig.parse_arg(arg, lt=float, epochs=int, flag=bool)


@pytest.mark.parametrize("name,arg,accepted", [
    ("cifar100", "resnet32x4,bogus=1", "beta, epochs, lt, method, methods, teacher_checkpoint"),
    ("imagenet", "r34-r18,lt=100", "beta, method, methods, teacher_checkpoint"),
    ("quickstart", "method=kd", "epochs, lt")])
def test_config_files_reject_unknown_options(name, arg, accepted):
  with pytest.raises(ConfigError, match=f"takes {accepted}"):
    get(name, arg)


def test_cifar_config_wrong_option_type():
  with pytest.raises(ConfigError, match="epochs=.*must be an integer"):
    get("cifar100", "resnet32x4,epochs=many")


@pytest.mark.parametrize("arg", ["smoke", "resnet32x4,resnet8x4", None])
def test_cifar_config_needs_one_preset(arg):
  with pytest.raises(ValueError, match="needs one preset"):
    get("cifar100", arg)


# --------------------------------------------------------------------------------------------
# CIFAR-100 presets


def test_cifar_pairs_are_the_documented_ones():
  assert set(load("cifar100").PAIRS) == set(CIFAR_PAIRS)
  assert set(load("cifar100").TEACHERS) == set(CIFAR_TEACHERS)


def _check_cifar_recipe(spec):
  assert spec.data.name == "cifar100" and spec.data.device_resident
  assert (spec.batch_size, spec.num_epochs, spec.max_steps, spec.seeds) == (64, 240, 0, (0,))
  opt = spec.optimizer
  assert (opt.momentum, opt.nesterov, opt.weight_decay, opt.milestones, opt.decay,
          opt.schedule) == (0.9, False, 5e-4, (150, 180, 210), 0.1, "step")


@pytest.mark.parametrize("pair", list(CIFAR_PAIRS), ids="-".join)
def test_every_cifar_pair_and_method_resolves(pair):
  """Each pair × method validates and resolves with the documented numbers: lr per pair,
  DKD β (the ER-KD fork's for ER-DKD where it has one), τ 4, 0.1 / 0.9 for KD-based,
  1 / 1 and warm-up 20 for DKD-based, H_ub = 100 for EA-KD / EA-DKD."""
  teacher, student = pair
  lr, beta, fork_beta = CIFAR_PAIRS[pair]
  for method in DISTILL_METHODS:
    c = get("cifar100", f"{teacher}-{student},method={method}")
    jconfig.validate(c, device_count=8, teacher_from_suite=True)
    spec = jconfig.resolve(c)
    _check_cifar_recipe(spec)
    loss = spec.objective.loss
    assert (spec.mode, spec.method, spec.model, spec.teacher_model) == (
        "distill", method, student, teacher)
    assert spec.teacher_checkpoint == os.path.abspath(f"teachers/{teacher}")
    assert spec.objective.targets == "teacher"
    assert (loss.base, loss.weighting) == objectives.METHODS[method]
    assert spec.optimizer.lr == lr and loss.temperature == 4.0
    if loss.base == "kd":
      assert (loss.ce_weight, loss.kd_weight) == (0.1, 0.9)
    else:
      expected_beta = fork_beta if method == "erdkd" and fork_beta else beta
      assert (loss.ce_weight, loss.kd_weight, loss.dkd_alpha, loss.dkd_beta,
              loss.dkd_warmup_epochs, loss.dkd_warmup_per_step) == (
                  1.0, 1.0, 1.0, expected_beta, 20.0, False)
    if loss.weighting == "entropy":
      assert (loss.entropy_temperature, loss.entropy_mode) == (4.0, "per_example")
    if loss.weighting == "adaptive_entropy":
      assert (loss.adaptive_temperature, loss.entropy_upper_bound) == (3.0, 100.0)
    assert loss.needs_aux_head == (method == "ipwd")


def test_cifar_paper_flag_and_options():
  """`paper`: H_ub = ln C (unset); beta=, epochs=, teacher_checkpoint=, lt= as given."""
  for method in ("eakd", "eadkd"):
    loss = jconfig.resolve(get("cifar100", f"resnet32x4-resnet8x4,method={method},paper")
                           ).objective.loss
    assert loss.entropy_upper_bound is None and loss.adaptive_temperature == 3.0
  spec = jconfig.resolve(get(
      "cifar100", "resnet32x4-resnet8x4,method=dkd,beta=5,epochs=30,teacher_checkpoint=/t/x"))
  assert spec.objective.loss.dkd_beta == 5.0 and spec.num_epochs == 30
  assert spec.teacher_checkpoint == "/t/x"


@pytest.mark.parametrize("model", CIFAR_TEACHERS + ("resnet8x4", "ShuffleV2", "MobileNetV2"))
def test_cifar_teacher_presets_train_plain_ce(model):
  """MODEL alone trains it with CE at weight 1 from labels; no teacher."""
  c = get("cifar100", model)
  jconfig.validate(c, device_count=8)
  spec = jconfig.resolve(c)
  _check_cifar_recipe(spec)
  loss = spec.objective.loss
  assert (spec.mode, spec.method, spec.model) == ("teacher", "ce", model)
  assert spec.teacher_model is None and spec.teacher_checkpoint is None
  assert spec.objective.targets == "labels"
  assert (loss.base, loss.weighting, loss.ce_weight) == ("ce", "none", 1.0)
  assert spec.optimizer.lr == (0.01 if model in ("ShuffleV2", "MobileNetV2") else 0.05)


def test_teacher_mode_of_a_distillation_config_is_plain_ce():
  """mode=teacher over a KD-family loss resolves to CE at weight 1 from labels, and leaves
  the config itself as it was."""
  c = get("cifar100", "resnet32x4-resnet8x4,method=erkd")
  c.mode = "teacher"
  before = c.to_dict()
  jconfig.validate(c, device_count=8)
  spec = jconfig.resolve(c)
  loss = spec.objective.loss
  assert (loss.base, loss.weighting, loss.ce_weight) == ("ce", "none", 1.0)
  assert spec.objective.targets == "labels" and spec.teacher_model is None
  assert c.to_dict() == before


def test_cifar_long_tail():
  spec = jconfig.resolve(get("cifar100", "resnet32x4-resnet8x4,method=kd,lt=100"))
  assert spec.data.long_tail_factor == 100.0 and spec.data.name == "cifar100"
  assert jconfig.resolve(get("cifar100", "resnet32x4")).data.long_tail_factor is None
  assert jconfig.resolve(get("cifar100", "resnet32x4,lt=10")).data.long_tail_factor == 10.0


@pytest.mark.parametrize("method,weighting", [("kd", "none"), ("ipwd", "inverse_propensity")])
def test_cifar_self_distill(method, weighting):
  """MODEL,self_distill: PS-KD from the model's own predictions (targets "self"), α_T 0.8,
  IPW from epoch 1 for method=ipwd; no teacher."""
  c = get("cifar100", f"resnet8x4,self_distill,method={method}")
  jconfig.validate(c, device_count=8)
  spec = jconfig.resolve(c)
  assert (spec.mode, spec.method, spec.model, spec.teacher_model) == (
      "self_distill", method, "resnet8x4", None)
  obj = spec.objective
  assert (obj.targets, obj.loss.weighting, obj.pskd_alpha_final, obj.ipw_start_epoch) == (
      "self", weighting, 0.8, 1)
  assert obj.loss.needs_aux_head == (method == "ipwd")


def test_cifar_self_distill_rejects_other_methods():
  c = get("cifar100", "resnet8x4,self_distill,method=dkd")
  with pytest.raises(ConfigError, match="self_distill runs PS-KD"):
    jconfig.validate(c, device_count=8)


def test_cifar_smoke_preset():
  c = get("cifar100", "resnet32x4-resnet8x4,method=dkd,smoke")
  jconfig.validate(c, device_count=8, teacher_from_suite=True)
  spec = jconfig.resolve(c)
  assert (spec.batch_size, spec.eval_batch_size, spec.max_steps, spec.checkpoint_every_steps,
          spec.log_every_steps, spec.progress_bar) == (16, 64, 3, 2, 1, False)
  assert spec.num_epochs == 240 and spec.objective.loss.dkd_beta == 8.0


# --------------------------------------------------------------------------------------------
# ImageNet presets


@pytest.mark.parametrize("pair", list(IMAGENET_PAIRS))
def test_every_imagenet_pair_and_method_resolves(pair):
  """100 epochs, batch 512, lr 0.2 ×0.1 at 30/60/90, wd 1e-4, bfloat16, host pipeline; KD τ 1,
  0.5 / 0.5; EA-KD t 2, 1.0 / 0.5; DKD τ 1, warm-up 1, β per pair; EA-DKD t 3; ER-KD τ′ 4;
  H_ub = ln C (unset)."""
  teacher, student, beta = IMAGENET_PAIRS[pair]
  for method in DISTILL_METHODS:
    c = get("imagenet", f"{pair},method={method}")
    jconfig.validate(c, device_count=8, teacher_from_suite=True)
    spec = jconfig.resolve(c)
    loss, opt = spec.objective.loss, spec.optimizer
    assert (spec.model, spec.teacher_model, spec.mode) == (student, teacher, "distill")
    assert (spec.batch_size, spec.eval_batch_size, spec.num_epochs, spec.dtype) == (
        512, 512, 100, "bfloat16")
    assert (spec.data.name, spec.data.device_resident, spec.data.num_workers) == (
        "imagenet2012", False, 8)
    assert (opt.lr, opt.milestones, opt.weight_decay, opt.momentum) == (0.2, (30, 60, 90),
                                                                       1e-4, 0.9)
    assert (loss.base, loss.weighting) == objectives.METHODS[method]
    assert loss.temperature == 1.0
    if method == "eakd":
      assert (loss.ce_weight, loss.kd_weight, loss.adaptive_temperature) == (1.0, 0.5, 2.0)
    elif loss.base == "kd":
      assert (loss.ce_weight, loss.kd_weight) == (0.5, 0.5)
    else:
      assert (loss.ce_weight, loss.kd_weight, loss.dkd_beta, loss.dkd_warmup_epochs) == (
          1.0, 1.0, beta, 1.0)
    if method == "eadkd":
      assert loss.adaptive_temperature == 3.0
    if loss.weighting == "adaptive_entropy":
      assert loss.entropy_upper_bound is None
    if loss.weighting == "entropy":
      assert loss.entropy_temperature == 4.0


def test_imagenet_paper_flag_runs_eadkd_at_t2():
  loss = jconfig.resolve(get("imagenet", "r34-r18,method=eadkd,paper")).objective.loss
  assert loss.adaptive_temperature == 2.0 and loss.base == "dkd"
  # The paper flag changes nothing else.
  assert jconfig.resolve(get("imagenet", "r34-r18,method=eakd,paper")).objective.loss == (
      jconfig.resolve(get("imagenet", "r34-r18,method=eakd")).objective.loss)


def test_imagenet_teacher_and_smoke_presets():
  c = get("imagenet", "resnet18_imagenet,smoke")
  jconfig.validate(c, device_count=8)
  spec = jconfig.resolve(c)
  assert (spec.mode, spec.objective.targets, spec.objective.loss.base,
          spec.objective.loss.ce_weight) == ("teacher", "labels", "ce", 1.0)
  assert (spec.batch_size, spec.eval_batch_size, spec.max_steps, spec.dtype,
          spec.data.num_workers, spec.checkpoint_every_steps) == (16, 16, 2, "float32", 0, 2000)


# --------------------------------------------------------------------------------------------
# Suites


def _walk_strings(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _walk_strings(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _walk_strings(v)
  elif isinstance(tree, str):
    yield tree


def test_quickstart_suite_expansion(tmp_path):
  """A teacher, then one sweep of a student per method, naming the teacher by {workdir}."""
  c = get("quickstart")
  before = c.to_dict()
  runs = suite.expand(c, str(tmp_path / "w"))
  workdir = os.path.abspath(tmp_path / "w")
  assert [n for n, _ in runs] == ["teacher", "students"]
  assert c.to_dict() == before   # expansion copies
  for name, run in runs:
    assert "suite" not in run and "runs" not in run
    assert not any("{workdir}" in s for s in _walk_strings(run.to_dict())), name
    assert run.dataset.name == "fashion_mnist" and run.batch_size == 128
    assert run.teacher.checkpoint == os.path.join(workdir, "teacher", "model")
  runs = dict(runs)
  assert (runs["teacher"].mode, runs["teacher"].model, runs["teacher"].num_epochs) == (
      "teacher", "quick_teacher", 2)
  students = runs["students"]
  assert jconfig.sweep_names(students) == ("ce", "kd", "erkd", "eakd", "ipwd", "dkd")
  jconfig.validate(students, teacher_from_suite=True)
  spec = jconfig.resolve(students)
  members = {m.name: m for m in spec.members}
  assert (members["ce"].method, members["ce"].objective.targets) == ("ce", "labels")
  for method in ("kd", "erkd", "eakd", "ipwd", "dkd"):
    m = members[method]
    assert (m.method, m.objective.targets) == (method, "teacher")
    assert (m.objective.loss.base, m.objective.loss.weighting) == objectives.METHODS[method]
  assert (spec.mode, spec.model, spec.num_epochs, spec.seeds) == (
      "distill", "quick_student", 1, (0,))
  assert members["eakd"].objective.loss.entropy_upper_bound is None
  dkd = members["dkd"].objective.loss
  assert dkd.dkd_warmup_per_step and dkd.dkd_warmup_epochs == 1.0
  assert spec.optimizer.nesterov and spec.optimizer.schedule == "cosine"
  assert jconfig.resolve(dict(suite.expand(get("quickstart", "seeds=3"), "w"))[
      "students"]).seeds == (0, 1, 2)


def test_suite_substitutes_workdir_in_nested_overrides(tmp_path):
  c = get("quickstart", "smoke")
  c.suite = ("teacher", "custom")
  c.runs["custom"] = {"mode": "distill", "method": "kd",
                      "teacher": {"checkpoint": "{workdir}/teacher/model",
                                  "model": "quick_teacher"},
                      "dataset": {"data_dir": "{workdir}/data/{workdir}"}}
  runs = dict(suite.expand(c, str(tmp_path)))
  root = os.path.abspath(tmp_path)
  assert runs["custom"].teacher.checkpoint == f"{root}/teacher/model"
  assert runs["custom"].dataset.data_dir == f"{root}/data/{root}"
  assert runs["custom"].dataset.name == "fashion_mnist"   # the shared fields stay
  assert runs["custom"].max_steps == 6


def test_suite_validate_accepts_a_teacher_from_an_earlier_run():
  """The students' teacher is made by the suite's first run; validating does not change
  the suite or what it expands to."""
  c = get("quickstart", "smoke")
  before = c.to_dict()
  expanded = [(n, r.to_dict()) for n, r in suite.expand(c, "/some/workdir")]
  suite.validate(c, device_count=8)
  assert c.to_dict() == before
  assert [(n, r.to_dict()) for n, r in suite.expand(c, "/some/workdir")] == expanded
  teacher = jconfig.resolve(dict(suite.expand(c, "/w"))["teacher"]).objective
  assert (teacher.targets, teacher.loss.base, teacher.loss.ce_weight) == ("labels", "ce", 1.0)


def test_suite_validate_needs_the_teacher_run_first():
  c = get("quickstart", "smoke")
  c.suite = ("students", "teacher")
  with pytest.raises(ConfigError, match="teacher checkpoint .* does not exist"):
    suite.validate(c, device_count=8)


def test_suite_naming_a_missing_run_fails(tmp_path):
  c = get("quickstart", "smoke")
  c.suite = ("teacher", "students", "missing")
  with pytest.raises(ConfigError, match="suite names run 'missing'"):
    suite.expand(c, str(tmp_path))
  with pytest.raises(ConfigError, match="suite names run 'missing'"):
    suite.validate(c, device_count=8)


def test_suite_validate_checks_every_run():
  c = get("quickstart", "smoke")
  c.runs["students"]["sweep_members"]["ipwd"] = {"loss": {"temperature": 0.0}}
  with pytest.raises(ConfigError, match="sweep member 'ipwd': loss.temperature must be positive"):
    suite.validate(c, device_count=8)
  c = get("quickstart", "smoke")
  with pytest.raises(ConfigError, match="not divisible by the 3 devices"):
    suite.validate(c, device_count=3)


# --------------------------------------------------------------------------------------------
# resolve and validate


def test_resolve_returns_a_frozen_run_spec():
  spec = jconfig.resolve(get("cifar100", "resnet32x4-resnet8x4,method=ipwd"))
  assert isinstance(spec, jconfig.RunSpec)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.batch_size = 128
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.objective.loss.temperature = 1.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.optimizer.lr = 1.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.data.name = "mnist"
  hash(spec.objective)   # hashable: it is a static argument of the jitted step


def test_resolve_seeds():
  c = get("cifar100", "resnet32x4")
  assert jconfig.resolve(c).seeds == (0,)
  c.seed, c.num_seeds = 5, 3
  jconfig.validate(c, device_count=8)
  assert jconfig.resolve(c).seeds == (5, 6, 7)


def _distill_config(tmp_path):
  c = get("cifar100", f"resnet32x4-resnet8x4,method=kd,teacher_checkpoint={tmp_path}")
  jconfig.validate(c, device_count=8)   # the valid starting point
  return c


@pytest.mark.parametrize("field,value,message", [
    ("mode", "bogus", r"config.mode must be one of \('teacher', 'distill', 'self_distill'\), "
                      r"got 'bogus'"),
    ("method", "foo", "unknown method 'foo'; known: ce, kd, erkd"),
    ("dtype", "float16", r"config.dtype must be one of \('float32', 'bfloat16'\), got 'float16'"),
    ("optimizer.schedule", "linear", "config.optimizer.schedule must be step or cosine"),
    ("optimizer.lr", 0.0, "config.optimizer.lr must be positive, got 0.0"),
    ("optimizer.lr", -0.1, "config.optimizer.lr must be positive, got -0.1"),
    ("batch_size", 0, "config.batch_size must be a positive integer, got 0"),
    ("num_seeds", 0, "config.num_seeds must be a positive integer"),
    ("seeds_per_vmap", 2, "config.seeds_per_vmap must be an integer from 0"),
    ("loss.temperature", 0.0, "loss.temperature must be positive"),
    ("loss.normalize", "sum", "loss.normalize must be one of"),
    ("dataset.name", "mnist3d", "unknown dataset"),
    ("dataset.input", "disk", "config.dataset.input must be auto, device or host"),
    ("model", "quick_student", "takes 1-channel images but cifar100 has 3"),
    ("teacher.model", "resnet999", "config.teacher.model"),
    ("eval_every_epochs", 0, "config.eval_every_epochs must be an integer ≥ 1, got 0"),
    ("checkpoint.every_steps", -1, "config.checkpoint.every_steps must be an integer ≥ 0"),
    ("optimizer.milestones", (150, 150), "optimizer.milestones must be distinct epochs"),
])
def test_validate_messages(tmp_path, field, value, message):
  c = _distill_config(tmp_path)
  node, *path = field.split(".")
  if path:
    c[node][path[0]] = value
  else:
    c[node] = value
  with pytest.raises(ConfigError, match=message):
    jconfig.validate(c, device_count=8)


@pytest.mark.parametrize("field,batch,devices,suggestion", [
    ("batch_size", 64, 6, "66"), ("eval_batch_size", 256, 3, "258")])
def test_validate_batch_not_divisible_by_devices(tmp_path, field, batch, devices, suggestion):
  c = _distill_config(tmp_path)
  c.batch_size = 63 if field == "eval_batch_size" else batch
  c[field] = batch
  with pytest.raises(ConfigError, match=rf"config.{field}={batch} is not divisible by the "
                                        rf"{devices} devices.*--config.{field}={suggestion}"):
    jconfig.validate(c, device_count=devices)


def test_validate_distill_needs_a_distillation_loss(tmp_path):
  c = _distill_config(tmp_path)
  jconfig.apply_method(c, "ce")
  with pytest.raises(ConfigError, match="mode 'distill' needs a distillation loss"):
    jconfig.validate(c, device_count=8)


def test_validate_missing_teacher_says_how_to_get_one():
  c = get("cifar100", "resnet32x4-resnet8x4,method=kd,teacher_checkpoint=/nonexistent/t")
  with pytest.raises(ConfigError, match=r"(?s)/nonexistent/t does not exist.*"
                                        r"configs/cifar100.py:resnet32x4.*python -m jaxkd.convert"):
    jconfig.validate(c, device_count=8)
  jconfig.validate(c, device_count=8, teacher_from_suite=True)


def test_apply_method_rejects_unknown_method():
  with pytest.raises(ConfigError, match="unknown method 'xkd'"):
    jconfig.apply_method(jconfig.default_config(), "xkd")


def test_validate_rejects_an_unknown_optimizer_option(tmp_path):
  c = _distill_config(tmp_path)
  c.optimizer.betas = 0.9
  with pytest.raises(ConfigError, match=r"optimizer has unknown option\(s\) \['betas'\]"):
    jconfig.validate(c, device_count=8)
