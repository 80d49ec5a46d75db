"""The benchmark scripts run end to end on tiny settings (their figures are not checked here:
timings never enter a test) and write well-formed results."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device
  result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def only_file(directory, prefix, suffix):
  files = [f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(suffix)]
  assert len(files) == 1, files
  return os.path.join(directory, files[0])


def test_train_step_benchmark_with_torch_baseline_and_seed_strategies(tmp_path):
  run_script("train_step.py", "--pairs", "resnet56-resnet20", "--batch", "4",
             "--objectives", "kd,ipwd", "--seeds", "1,2", "--seeds-per-vmap", "0,1",
             "--repeats", "2", "--warmup", "1", "--out", str(tmp_path), "--tag", "smoke")
  report = json.load(open(only_file(tmp_path, "train-cpu-", "-smoke.json")))
  rows = report["rows"]
  assert [(r["objective"], r["num_seeds"], r["seeds_per_vmap"]) for r in rows] == [
      ("KD", 1, None), ("IPWD", 1, None), ("KD", 2, 2), ("KD", 2, 1)]
  for r in rows:
    assert r["jax_finite"] and r["jax_ms"] > 0 and r["gflop_per_step"] > 0, r
  assert rows[0]["torch_finite"] and rows[0]["ratio"] > 0
  assert "jax_overhead_vs_kd" in rows[1] and "torch_overhead_vs_kd" in rows[1]
  md = open(only_file(tmp_path, "train-cpu-", "-smoke.md")).read()
  assert "| resnet56-resnet20 | 4 | IPWD |" in md and "1 (loop)" in md and "2 (vmap)" in md


def test_profile_step_attributes_time_to_ops_and_phases(tmp_path):
  out = run_script("profile_step.py", "--pair", "resnet56-resnet20", "--method", "erkd",
                   "--batch", "4", "--steps", "1", "--repeats", "1", "--warmup", "1",
                   "--out", str(tmp_path), "--trace-dir", str(tmp_path / "trace"))
  assert "| convolution |" in out and "| teacher |" in out and "| student backward |" in out
  assert "| loss |" in out and "| optimizer |" in out
  seen = int(out.split(" ops seen in the trace")[0].rsplit("(", 1)[1])
  assert seen > 100            # the trace's thunks were matched to the HLO's ops
  assert os.path.exists(only_file(tmp_path, "profile-cpu-", ".md"))


@pytest.mark.parametrize("torch_baseline", [True, False])
def test_loss_benchmark(tmp_path, torch_baseline):
  run_script("losses.py", "--sizes", "1024x100", "--repeats", "2", "--out", str(tmp_path),
             *([] if torch_baseline else ["--no-torch"]))
  rows = json.load(open(only_file(tmp_path, "losses-cpu-", ".json")))["rows"]
  assert {r["objective"] for r in rows} >= {"KD", "ER-KD", "EA-KD", "DKD"}
  assert all((r["torch_ms"] is not None) == torch_baseline for r in rows)
