"""benchmarks/bench_lm_loss.py runs end to end on tiny sizes and writes its result files."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lm_loss_benchmark_writes_every_row(tmp_path):
  script = os.path.join(REPO, "benchmarks", "bench_lm_loss.py")
  subprocess.run([sys.executable, script, "--sizes", "64x300x16", "--rounds", "1",
                  "--chunk-size", "16", "--weightings", "none", "adaptive_entropy",
                  "--memory-sizes", "256x300x16", "--memory-chunks", "32", "--out",
                  str(tmp_path)], check=True, cwd=REPO, timeout=600)
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 2 and files[0].startswith("lm-loss-"), files
  result = json.load(open(tmp_path / files[0]))
  rows = {(r["impl"], r["weighting"]) for r in result["rows"]}
  assert rows == {(i, w) for i in ("dense", "fused", "torch")
                  for w in ("none", "adaptive_entropy")}
  assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in result["rows"])
  assert [r["chunk"] for r in result["memory_by_chunk"]] == [32, 32]
  assert "| 64x300x16 | adaptive_entropy | fused |" in open(tmp_path / files[1]).read()
