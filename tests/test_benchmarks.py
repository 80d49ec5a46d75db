"""The benchmark scripts run end to end on tiny settings (their figures are not checked here:
timings never enter a test) and write well-formed results; none of them is named like a
jaxkd module."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The smallest pair (bench_train_step.SMOKE_PAIRS): the scripts' mechanics, not the figures,
# at a fraction of the compile time of the recipes' pairs.
PAIR = "resnet14-resnet8"


def run_script(name, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device
  result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def only_file(directory, prefix, suffix):
  files = [f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(suffix)]
  assert len(files) == 1, files
  return os.path.join(directory, files[0])


def test_no_benchmark_module_is_named_like_a_jaxkd_module():
  # The scripts run with benchmarks/ first on sys.path: a `losses.py` there would stand in
  # for every top-level `import losses`, and beside jaxkd.losses for a reader.
  jaxkd_names = {p.stem for p in pathlib.Path(REPO, "jaxkd").rglob("*.py")}
  jaxkd_names |= {p.name for p in pathlib.Path(REPO, "jaxkd").rglob("*") if p.is_dir()}
  jaxkd_names.add("jaxkd")
  scripts = sorted(p.stem for p in pathlib.Path(REPO, "benchmarks").glob("*.py"))
  assert scripts and all(name.startswith("bench_") for name in scripts), scripts
  assert not jaxkd_names & set(scripts)
  assert not pathlib.Path(REPO, "benchmarks", "__init__.py").exists()


def test_train_step_benchmark_with_torch_baseline_and_seed_strategies(tmp_path):
  run_script("bench_train_step.py", "--pairs", PAIR, "--batch", "4",
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
  assert f"| {PAIR} | 4 | IPWD |" in md and "1 (loop)" in md and "2 (vmap)" in md


def test_profile_step_attributes_time_to_ops_and_phases(tmp_path):
  # KD S=1 at this pair and batch: the program the train-step benchmark above compiled, so
  # the session's compilation cache (tests/conftest.py) serves it.
  out = run_script("bench_profile_step.py", "--pair", PAIR, "--method", "kd",
                   "--batch", "4", "--steps", "1", "--repeats", "1", "--warmup", "1",
                   "--out", str(tmp_path), "--trace-dir", str(tmp_path / "trace"))
  assert "| convolution |" in out and "| teacher |" in out and "| student backward |" in out
  assert "| loss |" in out and "| optimizer |" in out
  seen = int(out.split(" ops seen in the trace")[0].rsplit("(", 1)[1])
  assert seen > 100            # the trace's thunks were matched to the HLO's ops
  assert os.path.exists(only_file(tmp_path, "profile-cpu-", ".md"))


@pytest.mark.parametrize("torch_baseline", [True, False])
def test_loss_benchmark(tmp_path, torch_baseline):
  run_script("bench_losses.py", "--sizes", "1024x100", "--repeats", "2", "--out", str(tmp_path),
             *([] if torch_baseline else ["--no-torch"]))
  rows = json.load(open(only_file(tmp_path, "losses-cpu-", ".json")))["rows"]
  assert {r["objective"] for r in rows} >= {"KD", "ER-KD", "EA-KD", "DKD"}
  assert all((r["torch_ms"] is not None) == torch_baseline for r in rows)


def test_losses_against_revision_alternates_the_trees(tmp_path):
  # The working tree against itself: each side's bench_losses runs and the pairs are written.
  out = run_script("bench_losses_against_revision.py", "--before", REPO, "--sizes", "1024x100",
                   "--objectives", "KD", "--rounds", "1", "--runs", "2", "--tag", "smoke",
                   "--out", str(tmp_path))
  order = [out.index(f"run {i} {side}") for i, side in
           ((0, "before"), (0, "after"), (1, "after"), (1, "before"))]
  assert order == sorted(order)
  (row,) = json.load(open(only_file(tmp_path, "losses-smoke-cpu-", ".json")))["rows"]
  assert row["objective"] == "KD" and len(row["ratio_runs"]) == 2 and row["after_ms"] > 0
  assert "| 1024x100 | KD |" in open(only_file(tmp_path, "losses-smoke-cpu-", ".md")).read()


def test_against_revision_runs_both_trees_interleaved(tmp_path):
  # The working tree against itself: the mechanics (each side imports its own tree's jaxkd,
  # rounds alternate, results written), not the figures.
  run_script("bench_against_revision.py", "--before", REPO, "--pair", PAIR, "--batch", "4",
             "--rounds", "2",
             "--repeats", "1", "--warmup", "1", "--tag", "smoke", "--out", str(tmp_path),
             "--previous", "")
  report = json.load(open(only_file(tmp_path, "train-step-smoke-cpu-", ".json")))
  assert [r["order"] for r in report["rounds"]] == [["before", "after"], ["after", "before"]]
  for r in report["rounds"]:
    assert r["before"]["finite"] and r["after"]["finite"] and r["after"]["ms"] > 0
  assert report["meta"]["before_jaxkd"] == report["meta"]["after_jaxkd"] == os.path.join(
      "jaxkd", "__init__.py")
  assert len(report["ratio_after_over_before"]["per_round"]) == 2
  md = open(only_file(tmp_path, "train-step-smoke-cpu-", ".md")).read()
  assert "| 2 | after |" in md and "busy during" in md
  assert "after / before, paired within each round" in md


def test_sweep_benchmark_against_separate_runs(tmp_path):
  run_script("bench_sweep.py", "--pairs", "quick_teacher-quick_student", "--quick-batch", "8",
             "--methods", "ce,kd,ipwd", "--seeds", "1,2", "--repeats", "2", "--warmup", "1",
             "--out", str(tmp_path), "--tag", "smoke")
  rows = json.load(open(only_file(tmp_path, "sweep-cpu-", "-smoke.json")))["rows"]
  assert [(r["members"], r["seeds"], r["students"]) for r in rows] == [(3, 1, 3), (3, 2, 6)]
  for r in rows:
    assert set(r["single_ms"]) == {"ce", "kd", "ipwd"} and r["sweep_ms"] > 0, r
    # The bound counts the two teacher forwards a sweep of three saves per batch.
    singles = sum(r["single_ms"].values())
    assert abs(r["bound"] - singles / (singles - 2 * r["teacher_ms"])) < 1e-9 * r["bound"]
    assert r["fraction_of_bound"] == r["speedup"] / r["bound"]
  md = open(only_file(tmp_path, "sweep-cpu-", "-smoke.md")).read()
  assert "| quick_teacher-quick_student | 8 | 3 × 2 |" in md


def test_lm_train_benchmark_fused_against_materialised(tmp_path):
  # Tiny shapes (--quick): the mechanics of both steps, their pairing and the memory fields.
  run_script("bench_lm_train.py", "--quick", "--methods", "erkd", "eakd", "--out",
             str(tmp_path), "--tag", "smoke")
  report = json.load(open(only_file(tmp_path, "lm-train-cpu-", "-smoke.json")))
  rows = report["rows"]
  assert [(r["method"], r["impl"]) for r in rows] == [
      ("erkd", "fused"), ("erkd", "materialised"), ("eakd", "fused"), ("eakd", "materialised")]
  for r in rows:
    assert r["params_finite"] and r["tokens_per_s"] > 0 and r["temp_bytes"] > 0, r
    assert r["total_bytes"] >= r["temp_bytes"] and len(r["seconds_all"]) == r["rounds"]
    # Same parameters and batch: the fused loss is the materialised one.
    assert r["loss_step0_diff"] < 1e-4 * abs(r["loss_step0"]), r
  assert {"load_before", "load_after", "gpu", "device"} <= set(report["meta"])
  md = open(only_file(tmp_path, "lm-train-cpu-", "-smoke.md")).read()
  assert "| erkd | fused |" in md and "| eakd | materialised |" in md and "GPU:" in md
