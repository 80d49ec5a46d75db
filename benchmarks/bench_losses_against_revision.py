"""The loss benchmark of an earlier jaxkd revision against the working tree's, interleaved.

  git worktree add /tmp/jaxkd-before <revision>
  python benchmarks/bench_losses_against_revision.py --before /tmp/jaxkd-before \\
      --sizes 1024x1000,8192x1000 --runs 3 --tag kl-dkd
  git worktree remove /tmp/jaxkd-before

Each run is `benchmarks/bench_losses.py --no-torch` of one tree in a fresh process, with that
tree first on PYTHONPATH so that it imports its own jaxkd; runs alternate before, after,
before, after, ... so both trees see the same drift of the machine's load. Per objective and
size it reports each tree's median over runs (of bench_losses' own medians over rounds) and the
per-pair ratio after / before. Writes benchmarks/results/losses-<tag>-<device>.{json,md}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import device_name, device_slug, REPO, RESULTS


def run_tree(tree, args, out):
  env = dict(os.environ, PYTHONPATH=str(tree))
  cmd = [sys.executable, os.path.join(tree, "benchmarks", "bench_losses.py"), "--no-torch",
         "--sizes", args.sizes, "--rounds", str(args.rounds), "--out", out]
  if args.objectives:
    cmd += ["--objectives", args.objectives]
  subprocess.run(cmd, cwd=os.path.join(tree, "benchmarks"), env=env, check=True,
                 stdout=subprocess.DEVNULL)
  (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".json")]
  rows = json.load(open(path))["rows"]
  return {(r["size"], r["objective"]): r["jax_ms"] for r in rows}, os.getloadavg()[0]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--before", required=True, help="a checkout of the earlier revision")
  p.add_argument("--sizes", default="1024x1000,8192x1000")
  p.add_argument("--objectives", default="", help="comma list (default: all)")
  p.add_argument("--rounds", type=int, default=3, help="bench_losses rounds per run")
  p.add_argument("--runs", type=int, default=3, help="runs per tree, alternating")
  p.add_argument("--tag", default="against-revision")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  trees = {"before": os.path.abspath(args.before), "after": str(REPO)}
  times = {"before": [], "after": []}
  loads = []
  for i in range(args.runs):
    for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
      with tempfile.TemporaryDirectory() as out:
        result, load = run_tree(trees[side], args, out)
      times[side].append(result)
      loads.append((side, round(load, 2)))
      print(f"run {i} {side}: load {load:.2f}", flush=True)
  keys = [k for k in times["after"][0] if k in times["before"][0]]
  rows = []
  for size, objective in keys:
    b = [t[(size, objective)] for t in times["before"]]
    a = [t[(size, objective)] for t in times["after"]]
    rows.append(dict(size=size, objective=objective, before_ms=statistics.median(b),
                     after_ms=statistics.median(a), before_runs=b, after_runs=a,
                     ratio_runs=[x / y for x, y in zip(a, b)]))
  device = device_name()
  meta = dict(device=device, before=trees["before"], runs=args.runs, rounds=args.rounds,
              loads=loads, timestamp=time.strftime("%Y-%m-%d %H:%M:%S"))
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"losses-{args.tag}-{device_slug(device)}")
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  lines = [f"# Loss benchmark, an earlier revision against the working tree, on {device}", "",
           f"Forward + backward w.r.t. the student logits (`bench_losses.py --no-torch`, "
           f"{args.rounds} rounds per run), {args.runs} runs per tree in fresh processes, "
           "alternating; ms are medians over runs; after / before: the per-pair ratios. "
           f"Before: `{trees['before']}`. 1-minute load average after each run: "
           + ", ".join(f"{s} {l}" for s, l in loads) + ".", "",
           "| size | objective | before ms | after ms | after / before per pair |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['size']} | {r['objective']} | {r['before_ms']:.2f} | "
                 f"{r['after_ms']:.2f} | "
                 + ", ".join(f"{x:.2f}" for x in r["ratio_runs"]) + " |")
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
