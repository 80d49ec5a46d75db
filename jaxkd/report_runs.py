"""Reading run folders for `jaxkd.report`: what the trainer writes, and `diagnostics.json`.

A run folder holds `metrics.jsonl` (one JSON object a line: "step" and "train/…", "eval/…",
"teacher/…" scalars), `config.json`, `run_info.json` (`steps_per_epoch`, …), `summary.json`
when finished (one seed: "best_top1", "last_top1", "best", "last", "history", …; several:
"seeds": [those], "best_top1"/"last_top1": {"mean", "std"}), `eval_best.json` /
`eval_last.json` ( `_seed{i}` for several seeds: "epoch", "top1", "top5", "ce",
"per_class_recall": [C]) and, from the trainer's diagnostics, `diagnostics.json`:

    {
      "format": "jaxkd-diagnostics-1",
      "step": int, "epoch": int,             # the evaluation the per-seed entries describe
      "num_classes": C,
      "teacher_class_mass": {                # distill runs only: the frozen teacher's
        "split": "train", "augmentation": false, "num_examples": N,
        "temperatures": [1.0, 2.0, 4.0, 8.0],
        "mass": [[C floats] for each temperature]
      },                                     # diagnostics.class_mass_record(class_mass(z))
      "seeds": [{                            # one entry per seed, in the run's seed order
        "seed": int,
        "self_class_mass": {...},            # teacher / self_distill runs: the model's own
                                             # mass, same fields as teacher_class_mass
        "calibration": {...},                # diagnostics.calibration_from on the test split
        "weights": {                         # weighted methods only
          "per_epoch": [{"epoch": int, "mean", "std", "percentiles": {"5": …, …}}],
                                             # diagnostics.epoch_weight_record each epoch
          "final": {...}                     # diagnostics.weight_stats(w, labels, C) over
        }                                    # the last epoch's training examples
      }]
    }

Every field but "format" and "seeds" may be missing; a reader uses what is there. A suite or
sweep folder (no `metrics.jsonl` of its own) counts as the runs below it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from jaxkd import diagnostics as dg

__all__ = ["ReportError", "find_runs", "load_run", "mean_std"]

# The summary.json of a sweep (`jaxkd/train/compare.py`): its members' folders are the runs.
SWEEP_FORMAT = "jaxkd-sweep-1"
_NOT_RUNS = ("checkpoints", "tb", "damaged_checkpoints", "superseded_checkpoints")


class ReportError(ValueError):
  """A folder or file the report cannot use; the message says which and what to do."""


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ReportError(f"{path} is not valid JSON ({e}); rerun or delete that run.") from None


def _maybe_json(path: str) -> Any:
  return _read_json(path) if os.path.isfile(path) else None


def _sweep_members(summary: Any) -> list[str] | None:
  """A sweep's member names in order, if `summary` is a sweep's summary.json."""
  if isinstance(summary, dict) and summary.get("format") == SWEEP_FORMAT:
    return [m.get("name") for m in summary.get("members", []) if isinstance(m, dict)]
  return None


def _is_lm(summary: Any) -> bool:
  """A language-model run's or sweep's summary: not read here (its table is summary.md)."""
  return isinstance(summary, dict) and str(summary.get("format", "")).startswith("jaxkd-lm-")


def _is_run(path: str) -> bool:
  summary = _maybe_json(os.path.join(path, "summary.json"))
  if _sweep_members(summary) is not None or _is_lm(summary):
    return False  # a sweep's members' folders are the runs
  return os.path.isfile(os.path.join(path, "metrics.jsonl")) or isinstance(summary, dict)


def find_runs(paths: list[str], depth: int = 3) -> list[str]:
  """The run folders among `paths`, a suite or sweep folder standing for the runs below it
  (a suite's in its `summary.json` order, others sorted by name). Each once, in order."""
  found: list[str] = []

  def visit(path: str, left: int) -> None:
    if _is_run(path):
      if path not in found:
        found.append(path)
      return
    if left == 0:
      return
    names = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))
                   and n not in _NOT_RUNS and not n.startswith("model"))
    suite = _maybe_json(os.path.join(path, "summary.json"))
    order = _sweep_members(suite)
    if isinstance(suite, list):  # a suite's rows name its runs in order
      order = [r.get("run") for r in suite if isinstance(r, dict)]
    if order:
      names = [n for n in order if n in names] + [n for n in names if n not in order]
    for n in names:
      visit(os.path.join(path, n), left - 1)

  for p in paths:
    p = os.path.abspath(p)
    if not os.path.isdir(p):
      raise ReportError(f"{p} is not a folder; pass run folders (or a suite's workdir).")
    before = len(found)
    visit(p, depth)
    if len(found) == before and any(_is_lm(_maybe_json(os.path.join(d, "summary.json")))
                                    for d, _, _ in os.walk(p)):
      raise ReportError(f"{p} holds language-model runs, which this report does not read: "
                        f"their perplexity table is summary.md beside their summary.json "
                        f"(docs/LM.md#training-from-the-command-line).")
    if len(found) == before:
      raise ReportError(f"{p} holds no run (no metrics.jsonl or summary.json in it or its "
                        f"subfolders); pass a run's --workdir or a suite's workdir.")
  return found


def mean_std(values: list[float]) -> dict[str, float] | None:
  """Mean and sample standard deviation (ddof 1, 0 for one value), as summary.json has it."""
  v = [float(x) for x in values if x is not None]
  if not v:
    return None
  m = sum(v) / len(v)
  sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
  return {"mean": m, "std": sd}


def _metrics(path: str) -> list[dict[str, Any]]:
  rows = []
  file = os.path.join(path, "metrics.jsonl")
  if os.path.isfile(file):
    with open(file) as f:
      lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          if n < len(lines):  # a half-written last line is a live run's, not damage
            raise ReportError(f"{file} line {n} is not JSON; the file is damaged.") from None
  return rows


def _diagnostics(path: str) -> dict[str, Any] | None:
  d = _maybe_json(os.path.join(path, "diagnostics.json"))
  if d is None:
    return None
  if not isinstance(d, dict) or d.get("format") != dg.DIAGNOSTICS_FORMAT:
    got = d.get("format") if isinstance(d, dict) else type(d).__name__
    raise ReportError(f"{path}/diagnostics.json has format {got!r}, expected "
                      f"{dg.DIAGNOSTICS_FORMAT!r}; it was written by another jaxkd version.")
  return d


def _seed_evals(path: str, summary: dict | None, num_seeds: int) -> list[dict[str, Any]]:
  """Per seed: {"seed", "best", "last"} (eval dicts, or None)."""
  if summary is not None:
    seeds = summary["seeds"] if "seeds" in summary else [summary]
    return [{"seed": s.get("seed"), "best": s.get("best"), "last": s.get("last"),
             "best_top1": s.get("best_top1"), "last_top1": s.get("last_top1"),
             "best_epoch": s.get("best_epoch")} for s in seeds]
  out = []
  for i in range(num_seeds):
    suffix = "" if num_seeds == 1 else f"_seed{i}"
    best = _maybe_json(os.path.join(path, f"eval_best{suffix}.json"))
    last = _maybe_json(os.path.join(path, f"eval_last{suffix}.json"))
    out.append({"seed": i, "best": best, "last": last,
                "best_top1": best and best["top1"], "last_top1": last and last["top1"],
                "best_epoch": best and best.get("epoch")})
  return out


def _teacher_dir_mass(checkpoint: str | None) -> dict[str, Any] | None:
  """A distill run's teacher class mass from its teacher's own run folder, when the teacher
  was trained by jaxkd (`…/teacher/model` or `…/model_seed{k}`) and wrote diagnostics."""
  if not checkpoint:
    return None
  folder, model = os.path.split(os.path.normpath(checkpoint))
  k = int(model[len("model_seed"):]) if model.startswith("model_seed") else 0
  try:
    diag = _diagnostics(folder)
  except ReportError:
    return None
  seeds = (diag or {}).get("seeds") or []
  return seeds[k].get("self_class_mass") if k < len(seeds) else None


def load_run(path: str, name: str) -> dict[str, Any]:
  """Everything the report uses of one run folder, with missing files as None."""
  config = _maybe_json(os.path.join(path, "config.json")) or {}
  summary = _maybe_json(os.path.join(path, "summary.json"))
  summary = summary if isinstance(summary, dict) else None
  info = _maybe_json(os.path.join(path, "run_info.json")) or {}
  rows = _metrics(path)
  num_seeds = int((summary or {}).get("num_seeds") or config.get("num_seeds") or 1)
  diag = _diagnostics(path)
  pick = lambda k: (summary or {}).get(k) or config.get(k)
  teacher = config.get("teacher") or {}
  seeds = _seed_evals(path, summary, num_seeds)
  mass = (diag or {}).get("teacher_class_mass")
  if mass is None and pick("mode") == "distill":
    mass = _teacher_dir_mass(teacher.get("checkpoint"))
  if mass is None and pick("mode") != "distill" and diag:
    mass = (diag.get("seeds") or [{}])[0].get("self_class_mass")
  teacher_eval = (summary or {}).get("teacher")
  if teacher_eval is None:
    teacher_eval = next(({"top1": r["teacher/top1"]} for r in rows if "teacher/top1" in r),
                        None)
  return {"name": name, "path": path, "config": config, "summary": summary, "info": info,
          "metrics": rows, "diagnostics": diag, "num_seeds": num_seeds, "seeds": seeds,
          "mode": pick("mode"), "method": pick("method"), "model": pick("model"),
          "teacher_model": teacher.get("model") if pick("mode") == "distill" else None,
          "dataset": (config.get("dataset") or {}).get("name"),
          "finished": summary is not None, "class_mass": mass, "teacher": teacher_eval,
          "steps_per_epoch": info.get("steps_per_epoch")}
