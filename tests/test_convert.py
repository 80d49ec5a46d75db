"""PyTorch weight import, model-variables checkpoints and `python -m jaxkd.convert`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import jaxkd.models as models
from jaxkd import checkpoint
from jaxkd import convert
from jaxkd.models import torch_import
import torch_models

# Tiny batches gain nothing from threads, and on a shared CPU OpenMP's barriers make every
# PyTorch op wait for a descheduled thread.
torch.set_num_threads(1)

REPO = pathlib.Path(__file__).parents[1]


def reference(name="resnet8", num_classes=100, seed=0):
  module = torch_models.build(name, num_classes)
  return torch_models.randomize_(module, seed=seed).eval()


def images_for(name, batch=2):
  return np.random.default_rng(1).standard_normal((batch, *models.input_shape(name)),
                                                  np.float32)


def torch_logits(module, images):
  with torch.no_grad():
    return module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def resnet8_file(tmp_path_factory):
  """An mdistiller-style teacher file: {"model": state_dict, "epoch": ..., "best_acc": ...}."""
  module = reference()
  path = tmp_path_factory.mktemp("teacher") / "ckpt_epoch_240.pth"
  torch.save({"model": module.state_dict(), "epoch": 240, "best_acc": 0.5}, path)
  return path, module


# ------------------------------------------------------------------------------------------
# from_state_dict.
# ------------------------------------------------------------------------------------------


def test_from_state_dict_maps_every_tensor():
  module = reference("ShuffleV1")
  state_dict = module.state_dict()
  variables = torch_import.from_state_dict("ShuffleV1", state_dict, 100)
  # Grouped 1x1 conv: [out, in/g, 1, 1] -> [1, 1, in/g, out].
  kernel = variables["params"]["layer2_1"]["conv1"]["kernel"]
  np.testing.assert_array_equal(kernel, state_dict["layer2.1.conv1.weight"].numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["params"]["linear"]["kernel"],
                                state_dict["linear.weight"].numpy().T)
  np.testing.assert_array_equal(variables["batch_stats"]["layer1_0"]["bn2"]["var"],
                                state_dict["layer1.0.bn2.running_var"].numpy())
  n_tensors = sum(1 for k in state_dict if not k.endswith("num_batches_tracked"))
  assert len(jax.tree.leaves(variables)) == n_tensors
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))


def test_data_parallel_prefix_and_half_precision_are_accepted():
  module = reference()
  state_dict = {f"module.{k}": v.half() if v.is_floating_point() else v
                for k, v in module.state_dict().items()}
  variables = torch_import.from_state_dict("resnet8", state_dict, 100)
  assert variables["params"]["fc"]["kernel"].dtype == np.float32


def test_state_dict_of_another_architecture_lists_all_problems():
  state_dict = reference("resnet8").state_dict()
  with pytest.raises(ValueError) as e:
    torch_import.from_state_dict("resnet20", state_dict, 100)
  message = str(e.value)
  assert "60 missing, 0 unexpected, 0 mis-shaped" in message
  assert "layer1.1.conv1.weight" in message and "layer3.2.bn2.running_var" in message
  with pytest.raises(ValueError) as e:
    torch_import.from_state_dict("wrn_16_1", state_dict, 100)
  message = str(e.value)
  assert "unexpected" in message and "missing" in message and "mis-shaped" in message
  assert "layer1.0.conv1.weight" in message  # unexpected
  assert "block1.layer.0.conv1.weight" in message  # missing
  assert "num_batches_tracked" not in message


def test_misshaped_tensor_and_wrong_num_classes():
  state_dict = reference().state_dict()
  state_dict["layer2.0.conv1.weight"] = torch.zeros(32, 16, 5, 5)
  with pytest.raises(ValueError, match=r"1 mis-shaped[\s\S]*layer2\.0\.conv1\.weight: "
                     r"checkpoint \(32, 16, 5, 5\), resnet8 expects \(32, 16, 3, 3\)"):
    torch_import.from_state_dict("resnet8", state_dict, 100)
  with pytest.raises(ValueError, match="pass num_classes 100"):
    torch_import.from_state_dict("resnet8", reference().state_dict(), 10)
  assert torch_import.infer_num_classes("resnet8", reference().state_dict()) == 100
  assert torch_import.infer_num_classes("MobileNetV2", reference("MobileNetV2", 7)
                                        .state_dict()) == 7


def test_state_dict_of_another_zoo_model_names_it():
  """An ImageNet ResNet18 converted as `ResNet18` (the CIFAR resnetv2 one here)."""
  state_dict = torch_models.build("resnet18_imagenet", 10).state_dict()
  assert torch_import.matching_models(state_dict) == [("resnet18_imagenet", 10)]
  with pytest.raises(ValueError, match=r"no 'linear\.weight'[\s\S]*hint: the state dict is a "
                     r"resnet18_imagenet \(num_classes=10\); use that model name"):
    torch_import.infer_num_classes("ResNet18", state_dict)
  with pytest.raises(ValueError, match=r"does not match ResNet18[\s\S]*"
                     r"hint: the state dict is a resnet18_imagenet \(num_classes=10\)"):
    torch_import.from_state_dict("ResNet18", state_dict, 10)
  # A state dict no zoo model has, and one that fits the model named: no hint.
  assert torch_import.matching_models({"fc.weight": torch.zeros(3, 64)}) == []
  assert torch_import.matching_models(reference("resnet8").state_dict()) == [("resnet8", 100)]


# ------------------------------------------------------------------------------------------
# Distillers' checkpoints: mdistiller's latest / best / epoch_N hold student and teacher.
# ------------------------------------------------------------------------------------------


def distiller_checkpoint(student, teacher, data_parallel=True):
  """What mdistiller's trainer saves as `latest`, `best` and `epoch_N`: {"epoch", "model": the
  distiller's state dict, "optimizer": SGD over the student after one step, "best_acc"}."""
  optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  student.train()(torch.zeros(2, 3, 32, 32)).square().sum().backward()
  optimizer.step()
  student.eval()
  prefix = "module." if data_parallel else ""
  model = {f"{prefix}student.{k}": v for k, v in student.state_dict().items()}
  model |= {f"{prefix}teacher.{k}": v for k, v in teacher.state_dict().items()}
  return {"epoch": 240, "model": model, "optimizer": optimizer.state_dict(), "best_acc": 71.5}


@pytest.fixture(scope="module")
def distiller_file(tmp_path_factory):
  student, teacher = reference("resnet8", seed=1), reference("resnet14", seed=2)
  path = tmp_path_factory.mktemp("mdistiller") / "latest"  # mdistiller's names have no suffix
  torch.save(distiller_checkpoint(student, teacher), path)
  return path, student, teacher


@pytest.mark.parametrize("part, name", [("student", "resnet8"), ("teacher", "resnet14")])
def test_convert_a_part_of_a_distiller_checkpoint(distiller_file, tmp_path, capsys, part, name):
  path, student, teacher = distiller_file
  module = {"student": student, "teacher": teacher}[part]
  out = tmp_path / part
  assert convert.main(["--model", name, "--torch", str(path), "--part", part,
                       "--out", str(out)]) == 0, capsys.readouterr().err
  variables, metadata = checkpoint.restore_model_variables(out)
  assert metadata["model"] == name and metadata["num_classes"] == 100
  images = images_for(name)
  logits = models.create(name, 100).apply(variables, images)
  np.testing.assert_allclose(logits, torch_logits(module, images), rtol=1e-4, atol=1e-4)
  # The library's path to the same weights.
  loaded = torch_import.load(name, path, part=part)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_distiller_checkpoint_without_part_says_which_flag(distiller_file, tmp_path, capsys):
  path, _, _ = distiller_file
  assert convert.main(["--model", "resnet8", "--torch", str(path), "--out",
                       str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert str(path) in err and "distiller checkpoint" in err
  assert "module.student.* and module.teacher.*" in err
  assert "pass --part student or --part teacher" in err and "student_best" in err
  assert "cannot infer num_classes" not in err
  assert not (tmp_path / "a").exists()
  with pytest.raises(ValueError, match=r"latest: the state dict is a distiller's .*"
                     r"part='student' or part='teacher'"):
    torch_import.load("resnet8", path)


def test_part_of_a_plain_state_dict_is_an_error(resnet8_file, tmp_path, capsys):
  path, _ = resnet8_file
  assert convert.main(["--model", "resnet8", "--torch", str(path), "--part", "student",
                       "--out", str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert str(path) in err and "has no student" in err and "without a part" in err


def test_select_part_with_and_without_data_parallel():
  student, teacher = reference("resnet8"), reference("wrn_16_1")
  for data_parallel in (True, False):
    state_dict = distiller_checkpoint(student, teacher, data_parallel)["model"]
    state_dict["module.conv_reg.weight" if data_parallel else "conv_reg.weight"] = (
        torch.zeros(1))  # a method's own module (FitNet's regressor) is left out
    assert torch_import.distiller_parts(state_dict) == ("student", "teacher")
    assert torch_import.select_part(state_dict, "student").keys() == student.state_dict().keys()
    assert torch_import.select_part(state_dict, "teacher").keys() == teacher.state_dict().keys()
    with pytest.raises(ValueError, match="distiller's"):
      torch_import.select_part(state_dict)
    with pytest.raises(ValueError, match=r"hint: this is a distiller's state dict "
                       r"\(student and teacher\)"):
      torch_import.from_state_dict("resnet8", state_dict, 100)
  only_student = {f"student.{k}": v for k, v in student.state_dict().items()}
  with pytest.raises(ValueError, match="has no teacher .*holds student only"):
    torch_import.select_part(only_student, "teacher")
  with pytest.raises(ValueError, match="part must be one of"):
    torch_import.select_part(only_student, "teachers")
  plain = {f"module.{k}": v for k, v in student.state_dict().items()}
  assert torch_import.distiller_parts(plain) == ()
  assert torch_import.select_part(plain).keys() == student.state_dict().keys()


# ------------------------------------------------------------------------------------------
# Reading .pth files.
# ------------------------------------------------------------------------------------------


def test_load_teacher_file_and_bare_state_dict(resnet8_file, tmp_path):
  path, module = resnet8_file
  images = images_for("resnet8")
  variables = torch_import.load("resnet8", path)  # num_classes read off the file
  logits = models.create("resnet8", 100).apply(variables, images)
  np.testing.assert_allclose(logits, torch_logits(module, images), rtol=1e-4, atol=1e-4)
  bare = tmp_path / "bare.pth"
  torch.save(module.state_dict(), bare)
  assert set(torch_import.load_torch_file(bare)) == set(module.state_dict())


def test_truncated_file_is_a_clear_error(resnet8_file, tmp_path):
  path, _ = resnet8_file
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(path.read_bytes()[:2000])
  with pytest.raises(ValueError, match=r"could not read PyTorch checkpoint .*truncated\.pth"):
    torch_import.load_torch_file(truncated)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint at all")
  with pytest.raises(ValueError, match="garbage.pth"):
    torch_import.load_torch_file(garbage)
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    torch_import.load_torch_file(tmp_path / "missing.pth")


class _RunsCode:
  """Unpickling this would create a file: a checkpoint must never run code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_cannot_run_code(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "payload": _RunsCode(str(marker))}, path)
  with pytest.raises(ValueError, match="evil.pth"):
    torch_import.load_torch_file(path)
  assert not marker.exists()


def test_file_without_state_dict(tmp_path):
  path = tmp_path / "numbers.pth"
  torch.save({"epoch": 3, "best_acc": 0.7}, path)
  with pytest.raises(ValueError, match="holds no state dict"):
    torch_import.load_torch_file(path)


# ------------------------------------------------------------------------------------------
# Checkpoints and the command line.
# ------------------------------------------------------------------------------------------


def test_save_and_restore_model_variables(tmp_path):
  module = reference("wrn_16_1")
  variables = torch_import.from_state_dict("wrn_16_1", module.state_dict(), 100)
  out = tmp_path / "teacher"
  written = checkpoint.save_model_variables(out, variables, model="WRN_16_1", num_classes=100,
                                            source="memory")
  restored, metadata = checkpoint.restore_model_variables(out)
  assert metadata == written
  assert metadata["model"] == "wrn_16_1" and metadata["num_classes"] == 100
  assert metadata["num_params"] == 180_916 and metadata["feature_dim"] == 64
  assert json.loads((out / "model.json").read_text()) == metadata
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save_model_variables(out, variables, model="wrn_16_1", num_classes=100)
  with pytest.raises(ValueError, match="do not fit"):
    checkpoint.save_model_variables(tmp_path / "x", variables, model="wrn_16_2",
                                    num_classes=100)
  with pytest.raises(FileNotFoundError, match="not a jaxkd model checkpoint"):
    checkpoint.restore_model_variables(tmp_path)
  # Restored straight into a sharding, e.g. replicated over the mesh.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  restored, _ = checkpoint.restore_model_variables(out, sharding=replicated)
  assert all(x.sharding == replicated for x in jax.tree.leaves(restored))


def test_convert_command_round_trip(resnet8_file, tmp_path):
  path, module = resnet8_file
  out = tmp_path / "teacher"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "jaxkd.convert", "--model", "resnet8", "--torch", str(path),
       "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"wrote {out}" in result.stdout and "83,892 parameters" in result.stdout
  variables, metadata = checkpoint.restore_model_variables(out)
  assert metadata["model"] == "resnet8" and metadata["source"] == str(path)
  images = images_for("resnet8")
  logits = models.create("resnet8", metadata["num_classes"]).apply(variables, images)
  np.testing.assert_allclose(logits, torch_logits(module, images), rtol=1e-4, atol=1e-4)


def test_convert_errors_exit_nonzero(resnet8_file, tmp_path, capsys):
  path, _ = resnet8_file
  assert convert.main(["--model", "resnet20", "--torch", str(path), "--out",
                       str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert str(path) in err and "60 missing" in err
  assert "hint: the state dict is a resnet8 (num_classes=100); use that model name" in err
  assert not (tmp_path / "a").exists()
  assert convert.main(["--model", "resnet9", "--torch", str(path), "--out",
                       str(tmp_path / "b")]) == 1
  assert "unknown model" in capsys.readouterr().err
  assert convert.main(["--model", "resnet8", "--torch", str(tmp_path / "none.pth"), "--out",
                       str(tmp_path / "c")]) == 1
  assert "none.pth" in capsys.readouterr().err
