"""A sequence of runs in one command (the quickstart): a teacher, then students that use it.

A suite config is a normal config plus `suite` (the run names, in order) and `runs` (each
run's overrides of the shared fields). Each run trains in `workdir/<name>`; a string
"{workdir}" in any override is replaced by the suite's workdir, so a student names its
teacher as "{workdir}/teacher/model". Every run resumes independently, so an interrupted
suite continues where it stopped. At the end one table of test top-1 per run is printed and
written to `workdir/summary.md` and `summary.json`, and `python -m jaxkd.report`'s report of
all its runs to `workdir/report/`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import ml_collections

from jaxkd import config as jconfig
from jaxkd import lm_config
from jaxkd.train import compare


def _update(base: dict, overrides: dict) -> dict:
  for k, v in overrides.items():
    if isinstance(v, dict) and isinstance(base.get(k), dict):
      _update(base[k], v)
    else:
      base[k] = v
  return base


def _substitute(tree: Any, workdir: str) -> Any:
  if isinstance(tree, dict):
    return {k: _substitute(v, workdir) for k, v in tree.items()}
  if isinstance(tree, str):
    return tree.replace("{workdir}", workdir)
  return tree


def expand(config: ml_collections.ConfigDict, workdir: str
           ) -> list[tuple[str, ml_collections.ConfigDict]]:
  """[(run name, its full config)] in order."""
  shared = config.to_dict()
  order, runs = shared.pop("suite"), shared.pop("runs")
  out = []
  for name in order:
    if name not in runs:
      raise jconfig.ConfigError(f"suite names run {name!r} but config.runs has no entry for it.")
    merged = _substitute(_update(copy.deepcopy(shared), runs[name]), os.path.abspath(workdir))
    out.append((name, ml_collections.ConfigDict(merged)))
  return out


def validate(config: ml_collections.ConfigDict, *, device_count: int,
             workdir: str = "/nonexistent-workdir") -> None:
  """Validates every run; a teacher made by an earlier run of the suite need not exist yet,
  and one made by an earlier invocation (a suite narrowed to its students with
  `--config.suite`) is found in `workdir`."""
  produced = set()
  workdir = os.path.abspath(workdir)
  for name, run in expand(config, workdir):
    from_suite = run.mode == "distill" and run.teacher.checkpoint in produced
    check = lm_config.validate if lm_config.is_lm(run) else jconfig.validate
    check(run, device_count=device_count, teacher_from_suite=from_suite)
    produced.add(os.path.join(workdir, name, "model"))


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  from jaxkd import train  # deferred: the heavy imports
  from jaxkd.train import workdir as jworkdir

  workdir = os.path.abspath(workdir)
  jworkdir.prepare(workdir)  # a file or a read-only folder: one error line, not a traceback
  if lm_config.is_lm(config):
    return _run_lm(config, workdir)
  rows = []
  for name, run_config in expand(config, workdir):
    what = (f"a sweep of {', '.join(jconfig.sweep_names(run_config))}"
            if jconfig.sweep_names(run_config) else run_config.method)
    print(f"== {name}: {run_config.mode} {run_config.model} ({what})", flush=True)
    summary, seconds = _train_run(train.train_and_evaluate, name, run_config, workdir)
    if summary.get("format") == compare.SUMMARY_FORMAT:  # a sweep: a row per member
      for i, m in enumerate(summary["members"]):
        rows.append({"run": m["name"], "path": f"{name}/{m['name']}", "mode": run_config.mode,
                     "model": run_config.model, "method": m["method"],
                     "best_top1": m["best_top1"], "last_top1": m["last_top1"],
                     "seconds": seconds if i == 0 else None, "sweep": name,
                     "sweep_size": len(summary["members"]),
                     "images_per_sec": summary.get("images_per_sec")})
      continue
    rows.append({"run": name, "mode": run_config.mode, "model": run_config.model,
                 "method": run_config.method, "best_top1": summary["best_top1"],
                 "last_top1": summary["last_top1"], "best_epoch": summary.get("best_epoch"),
                 "seconds": seconds, "images_per_sec": summary.get("images_per_sec")})
  table = format_table(rows, jax.devices()[0].device_kind)
  print("\n" + table, flush=True)
  _write_summary(workdir, table, rows)
  if jax.process_index() == 0:
    from jaxkd import report  # deferred: matplotlib
    where = report.write_report([workdir], os.path.join(workdir, "report"))["html"]
    print(f"Report (tables and figures of every run): {where}", flush=True)
  return rows


def _train_run(train_and_evaluate, name: str, run_config, workdir: str
               ) -> tuple[dict[str, Any], float]:
  """(summary, seconds) of one run of the suite, in `workdir/<name>`; an error that stops it
  names the run (the runs before it are done and kept)."""
  from jaxkd.train import workdir as jworkdir  # deferred: the heavy imports
  start = time.perf_counter()
  try:
    summary = train_and_evaluate(run_config, os.path.join(workdir, name))
  except (jconfig.ConfigError, jworkdir.RunError) as e:
    e.args = (f"suite run {name!r}: {e}",) + e.args[1:]
    raise
  return summary, time.perf_counter() - start


def _write_summary(workdir: str, table: str, rows: list[dict[str, Any]]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(rows, f, indent=1)


def _run_lm(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """A language-model suite: each run in turn, then one table of validation perplexity."""
  from jaxkd.train import lm_loop, lm_results  # deferred: the heavy imports
  rows, last = [], None
  for name, run_config in expand(config, workdir):
    members = lm_config.members(run_config)
    print(f"== {name}: {run_config.mode} {run_config.model} ({', '.join(members)})",
          flush=True)
    summary, seconds = _train_run(lm_loop.train_and_evaluate, name, run_config, workdir)
    last = summary
    for s in summary.get("members", [summary]):
      row = lm_results.table_row(name if "members" not in summary else s["method"], s)
      rows.append({**row, "path": name if "members" not in summary else
                   f"{name}/{s['method']}", "seconds": seconds, "mode": run_config.mode})
  table = lm_results.format_table(
      rows, unigram_ppl=last["unigram_ppl"],
      teacher=None if any(r["mode"] == "teacher" for r in rows) else last.get("teacher"),
      title=f"Validation perplexity per run ({jax.devices()[0].device_kind}; a sweep's "
            f"students train in one program)")
  print("\n" + table, flush=True)
  _write_summary(workdir, table, rows)
  return rows


def _top1(value) -> str:
  """A top-1: a number, or {"mean", "std", "n"} over seeds."""
  if value is None:
    return "-"
  if isinstance(value, dict):
    return f"{value['mean']:.2f}" + (f" ± {value['std']:.2f}" if value.get("n", 1) > 1 else "")
  return f"{value:.2f}"


def _time(r: dict[str, Any]) -> str:
  if r.get("sweep") is None:
    return f"{r['seconds']:.0f} s"
  if r["seconds"] is None:
    return "(same program)"
  return f"{r['seconds']:.0f} s for the {r['sweep_size']} students of {r['sweep']}"


def format_table(rows: list[dict[str, Any]], device: str) -> str:
  lines = [f"Test top-1 per run ({device}; wall-clock includes compilation and evaluation)", "",
           "| run | model | method | best top-1 | last top-1 | time |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['model']} | {r['method']} | {_top1(r['best_top1'])} | "
                 f"{_top1(r['last_top1'])} | {_time(r)} |")
  return "\n".join(lines)
