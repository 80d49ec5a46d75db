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
  assert not (tmp_path / "a").exists()
  assert convert.main(["--model", "resnet9", "--torch", str(path), "--out",
                       str(tmp_path / "b")]) == 1
  assert "unknown model" in capsys.readouterr().err
  assert convert.main(["--model", "resnet8", "--torch", str(tmp_path / "none.pth"), "--out",
                       str(tmp_path / "c")]) == 1
  assert "none.pth" in capsys.readouterr().err
