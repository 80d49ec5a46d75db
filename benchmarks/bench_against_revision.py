"""One training-step row of an earlier jaxkd revision against the working tree's, interleaved.

  git worktree add /tmp/jaxkd-before <revision>
  taskset -c 1 python benchmarks/bench_against_revision.py --before /tmp/jaxkd-before \\
      --rounds 6 --repeats 10 --tag redesign
  git worktree remove /tmp/jaxkd-before

Each round runs the train-step benchmark once per tree, each in a fresh process of its own
tree's script (`benchmarks/bench_train_step.py`, or `train_step.py` in the same folder in
revisions before that name) with its own tree first on PYTHONPATH, so that each side imports its own
jaxkd; the environment and CPU affinity are this process's for both. The order within a round
alternates, so that neither side always runs first, and the rounds interleave the two sides so
that both see the same drift of the machine's load. Before every run this process sleeps 1 s
and measures, from /proc/stat, how many cores other jobs keep busy (all cores, and the ones it
may run on). jaxkd only (no PyTorch), one pair, batch, objective and dtype.

Writes benchmarks/results/train-step-<tag>-<device>.{json,md}: each run's median step time and
spread, per side the median over rounds with the rounds' range, and the per-round ratio
after / before (the paired estimate of the change). `--previous` names an earlier result file
whose matching row is shown beside them.
"""

import argparse
import glob
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import busy_core_counts, busy_core_seconds, device_name, device_slug
from bench_common import REPO, RESULTS

SCRIPTS = ("bench_train_step.py", "train_step.py")  # in benchmarks/, newest name first


def train_step_script(tree: pathlib.Path) -> pathlib.Path:
  for name in SCRIPTS:
    if (tree / "benchmarks" / name).exists():
      return tree / "benchmarks" / name
  raise SystemExit(f"{tree / 'benchmarks'} has none of {', '.join(SCRIPTS)}")


def side_env(tree: pathlib.Path) -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(tree)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def imported_jaxkd(tree: pathlib.Path) -> str:
  """Where `import jaxkd` resolves in a process with `tree`'s environment (checked to lie in
  `tree`: an installed jaxkd must not stand in for the tree's own)."""
  out = subprocess.run([sys.executable, "-c", "import jaxkd; print(jaxkd.__file__)"],
                       env=side_env(tree), cwd=tree, capture_output=True, text=True, check=True)
  path = pathlib.Path(out.stdout.strip()).resolve()
  if tree.resolve() not in path.parents:
    raise SystemExit(f"a process with {tree} on PYTHONPATH imports jaxkd from {path}")
  return str(path)


def revision(tree: pathlib.Path) -> str:
  """The tree's commit, and whether it has uncommitted changes (for the record)."""
  git = lambda *a: subprocess.run(["git", "-C", str(tree), *a], capture_output=True,
                                  text=True).stdout.strip()
  commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
  return commit + (" + uncommitted changes" if git("status", "--porcelain", "--",
                                                     "jaxkd", "benchmarks") else "")


def run_side(tree: pathlib.Path, args) -> dict:
  """One run of `tree`'s train-step benchmark: its row, the machine's load just before, and
  the wall time of the process."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  every, mine = busy_core_counts(1.0, None, cores)
  load = dict(busy_cores_all=every, busy_cores_mine=mine)
  with tempfile.TemporaryDirectory(prefix="jaxkd-bench-") as out:
    cmd = [sys.executable, str(train_step_script(tree)), "--pairs", args.pair,
           "--batch", str(args.batch), "--imagenet-batch", str(args.batch),
           "--objectives", args.objective, "--seeds", "1", "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--no-torch",
           "--out", out, "--tag", "run"]
    own0, busy0 = _children_cpu_s(), busy_core_seconds()
    start = time.perf_counter()
    result = subprocess.run(cmd, env=side_env(tree), cwd=tree, capture_output=True, text=True,
                            timeout=args.timeout)
    wall = time.perf_counter() - start
    own, busy1 = _children_cpu_s() - own0, busy_core_seconds()
    # Other jobs during the run: the machine's busy core-seconds less the run's own CPU time.
    load["busy_cores_during"] = (None if busy0 is None or busy1 is None else
                                 round(max(busy1 - busy0 - own, 0.0) / wall, 2))
    load["own_cores_during"] = round(own / wall, 2)
    if result.returncode != 0:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    row = json.load(open(glob.glob(os.path.join(out, "train-*-run.json"))[0]))["rows"][0]
  if "jax_ms" not in row:
    raise SystemExit(f"{tree}: {row.get('jax_error')}")
  return dict(ms=row["jax_ms"], spread=row["jax_spread"], compile_s=row["jax_compile_s"],
              finite=row["jax_finite"], process_s=round(wall, 1), **load)


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def summary(runs: list[dict]) -> dict:
  ms = [r["ms"] for r in runs]
  return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
              median_within_run_spread=statistics.median(r["spread"] for r in runs))


def previous_row(path: str, args) -> dict | None:
  """The matching jaxkd row of an earlier result file (bench_train_step.py's JSON)."""
  if not path:
    return None
  report = json.load(open(path))
  for r in report["rows"]:
    if (r.get("pair"), r.get("batch"), r.get("method"), r.get("dtype"), r.get("num_seeds")) == (
        args.pair, args.batch, args.objective, args.dtype, 1) and "jax_ms" in r:
      return dict(file=os.path.relpath(path, REPO), ms=r["jax_ms"], spread=r["jax_spread"],
                  date=report["meta"].get("date"), device=report["meta"].get("device"),
                  busy_cores_before=report["meta"].get("busy_cores_before"),
                  load_average_before=report["meta"].get("load_before"),
                  repeats=report["meta"].get("repeats"))
  return None


def markdown(report: dict) -> str:
  m, before, after = report["meta"], report["before"], report["after"]
  ratio = report["ratio_after_over_before"]
  lines = [
      f"# Training step, {m['before_label']} against {m['after_label']}, on {m['device']}", "",
      f"{m['date']}; {m['pair']}, {m['objective']}, batch {m['batch']}, {m['dtype']}, jaxkd "
      "only. Written by benchmarks/bench_against_revision.py.", "",
      f"{m['rounds']} interleaved rounds; in each, one fresh process per tree runs that tree's "
      f"own train-step benchmark ({m['warmup']} warm-up steps, then the median of "
      f"{m['repeats']} synchronised steps, compile excluded), the order alternating from round "
      "to round. Both sides: the same Python, environment (XLA_FLAGS "
      f"`{m['xla_flags'] or '(none)'}`) and CPU affinity (cores {m['cpu_affinity']}).", "",
      f"- before = {m['before_label']} ({m['before_revision']}), jaxkd imported from the "
      f"tree's `{m['before_jaxkd']}`",
      f"- after = {m['after_label']} ({m['after_revision']}), jaxkd imported from the tree's "
      f"`{m['after_jaxkd']}`", "",
      "Load: *busy before* = cores of the whole machine that other jobs kept busy in the second "
      "before the run (/proc/stat, this process asleep), and on the cores the runs may use "
      "(*mine*); *busy during* = cores other jobs kept busy on average while the run's process "
      "lived (the machine's busy core-seconds less the process's own CPU time, over its wall "
      "time, which includes start-up and compilation); *own* = the cores the run itself used "
      f"on average. The machine has {m['cpu_count']} cores.", "",
      "| round | side | ms/step | spread in the run | busy before (all / mine) | busy during | "
      "own | compile s | process s |",
      "|---|---|---|---|---|---|---|---|---|"]
  for i, pair in enumerate(report["rounds"], 1):
    for side in pair["order"]:
      r = pair[side]
      lines.append(f"| {i} | {side} | {r['ms']:.1f} | {r['spread']:.1%} | "
                   f"{r['busy_cores_all']} / {r['busy_cores_mine']} | "
                   f"{r.get('busy_cores_during')} | {r.get('own_cores_during')} | "
                   f"{r['compile_s']:.1f} | {r['process_s']} |")
  lines += [
      "", "*spread in the run* = interquartile range / median of that run's steps.", "",
      "| side | median over rounds, ms/step | range over rounds | median spread in a run |",
      "|---|---|---|---|"]
  for name, s in (("before", before), ("after", after)):
    lines.append(f"| {name} | {s['median_ms']:.1f} | {s['min_ms']:.1f}–{s['max_ms']:.1f} | "
                 f"{s['median_within_run_spread']:.1%} |")
  prev = report.get("previous")
  if prev:
    busy, average = prev["busy_cores_before"], prev.get("load_average_before")
    load = (f"other jobs {busy} cores busy" if busy is not None else
            f"1-minute load average {average}" if average is not None else "load not recorded")
    lines.append(f"| earlier figure ({prev['file']}, {prev['date']}, {prev['device']}, "
                 f"{load}) | {prev['ms']:.1f} | - | {prev['spread']:.1%} |")
    if prev["device"] != m["device"]:
      lines += ["", f"The earlier figure was taken on another CPU ({prev['device']}), so only "
                "the interleaved rounds above compare the two revisions."]
  lines += [
      "", f"after / before, paired within each round: median {ratio['median']:.3f} "
      f"(range {ratio['min']:.3f}–{ratio['max']:.3f} over the rounds), i.e. "
      f"{ratio['median'] - 1:+.1%}; the rounds' own range on either side is "
      f"{report['noise']:.1%} of its median.", ""]
  if m.get("notes"):
    lines += ["Notes:", ""] + [f"- {n}" for n in m["notes"]] + [""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--before", required=True, help="a checkout of the earlier revision")
  p.add_argument("--after", default=str(REPO), help="default: this working tree")
  p.add_argument("--before-label", default="before")
  p.add_argument("--after-label", default="after")
  p.add_argument("--pair", default="resnet56-resnet20")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--objective", default="kd")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--repeats", type=int, default=10, help="timed steps per run")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout", type=int, default=900, help="seconds per run")
  p.add_argument("--previous", default=str(RESULTS / "train-cpu-2core.json"),
                 help="an earlier bench_train_step.py result to show beside ('' for none)")
  p.add_argument("--note", action="append", default=[], help="a line for the .md's notes")
  p.add_argument("--tag", default="revision")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  trees = {"before": pathlib.Path(args.before).resolve(),
           "after": pathlib.Path(args.after).resolve()}
  jaxkd_files = {side: imported_jaxkd(tree) for side, tree in trees.items()}
  revisions = {side: revision(tree) for side, tree in trees.items()}
  device = device_name()
  rounds = []
  for i in range(args.rounds):
    order = ("before", "after") if i % 2 == 0 else ("after", "before")
    pair = {"order": list(order)}
    for side in order:
      pair[side] = run_side(trees[side], args)
      r = pair[side]
      print(f"round {i + 1} {side:>6}: {r['ms']:.1f} ms/step (spread {r['spread']:.1%}; "
            f"other jobs' busy cores {r['busy_cores_all']} before, {r['busy_cores_during']} "
            f"during; own {r['own_cores_during']})", flush=True)
    rounds.append(pair)
  sides = {side: summary([r[side] for r in rounds]) for side in trees}
  ratios = [r["after"]["ms"] / r["before"]["ms"] for r in rounds]
  noise = max((s["max_ms"] - s["min_ms"]) / s["median_ms"] for s in sides.values())
  previous = (args.previous if os.path.exists(args.previous) else "") if args.previous else ""
  report = dict(
      meta=dict(device=device, date=time.strftime("%Y-%m-%d %H:%M:%S"), pair=args.pair,
                objective=args.objective, batch=args.batch, dtype=args.dtype,
                rounds=args.rounds, repeats=args.repeats, warmup=args.warmup,
                cpu_count=os.cpu_count(),
                cpu_affinity=sorted(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity") else None,
                xla_flags=os.environ.get("XLA_FLAGS", ""), python=sys.version.split()[0],
                before_label=args.before_label, after_label=args.after_label,
                before_revision=revisions["before"], after_revision=revisions["after"],
                before_jaxkd=os.path.relpath(jaxkd_files["before"], trees["before"]),
                after_jaxkd=os.path.relpath(jaxkd_files["after"], trees["after"]),
                argv=sys.argv[1:] if argv is None else list(argv), notes=list(args.note)),
      rounds=rounds, before=sides["before"], after=sides["after"],
      ratio_after_over_before=dict(median=statistics.median(ratios), min=min(ratios),
                                   max=max(ratios), per_round=ratios),
      noise=noise, previous=previous_row(previous, args))
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"train-step-{args.tag}-{device_slug(device)}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(report))
  print(markdown(report))
  print("wrote", stem + ".json", stem + ".md")


if __name__ == "__main__":
  main()
