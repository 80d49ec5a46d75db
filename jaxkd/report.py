"""One report over any set of runs: tables, figures, `report.md` and a self-contained HTML.

  python -m jaxkd.report RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR] --out DIR

A suite's or sweep's workdir counts as its runs. Writes `DIR/report.md`, `DIR/report.html`
(the figures embedded, one file to send) and the PNG figures, each only when its data exists:
learning curves and training losses (every run), reliability diagrams, the teacher's class
mass (IPWD Fig. 1), the recall gain by teacher-mass rank against the baseline (IPWD Table 1)
and the sample weights (histograms, weight against class mass, during training). The last
four need the `diagnostics.json` a run writes (schema: `jaxkd/report_runs.py`). The
baseline (the vanilla student) defaults to the one CE run of the distilled students' model.
Needs matplotlib, no display, and neither JAX nor TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from jaxkd import diagnostics as dg
from jaxkd import report_figures as figs
from jaxkd import report_pages as pages
from jaxkd.report_runs import ReportError, find_runs, load_run, mean_std

__all__ = ["write_report", "main", "ReportError"]


def _add_figures(blocks: list, figures: list, drawn) -> None:
  """Appends each (path, caption) whose figure was drawn (path not None) to the report."""
  for path, caption in drawn:
    if path:
      figures.append(path)
      blocks.append(("fig", path, caption))


def _f(v, digits: int = 2, sign: bool = False) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "—"
  return f"{v:{'+' if sign else ''}.{digits}f}"


def _pm(ms: dict[str, float] | float | None, digits: int = 2, sign: bool = False) -> str:
  """"m ± s" for a {"mean", "std"} over seeds, the value itself for one seed."""
  if isinstance(ms, dict):
    return f"{_f(ms['mean'], digits, sign)} ± {_f(ms['std'], digits)}"
  return _f(ms, digits, sign)


def _over_seeds(run, values: list) -> dict[str, float] | float | None:
  return values[0] if run["num_seeds"] == 1 else mean_std(values)


def _top1(run, kind: str):
  s = run["summary"]
  if s is not None and s.get(f"{kind}_top1") is not None:
    return s[f"{kind}_top1"]  # summary.json's own numbers: the mean ± std it wrote
  return _over_seeds(run, [e[f"{kind}_top1"] for e in run["seeds"]])


def _eval_field(run, kind: str, key: str):
  return _over_seeds(run, [(e[kind] or {}).get(key) for e in run["seeds"]])


def _seed_diag(run) -> list[dict[str, Any]]:
  return (run["diagnostics"] or {}).get("seeds") or []


def _mass_at(mass: dict[str, Any], temperature: float) -> np.ndarray:
  temps = [float(t) for t in mass["temperatures"]]
  j = temps.index(temperature) if temperature in temps else 0
  return np.asarray(mass["mass"][j], np.float64)


def _group_labels(num_classes: int, groups: int) -> list[str]:
  sizes = [len(g) for g in np.array_split(np.arange(num_classes), groups)]
  ends = np.cumsum(sizes)
  return [f"top {e - s + 1}–{e}" if s > 1 else f"top {e}" for s, e in zip(sizes, ends)]


def _auto_baseline(runs):
  students = {r["model"] for r in runs if r["mode"] == "distill"}
  found = [r for r in runs if r["method"] == "ce" and r["mode"] == "teacher"
           and r["model"] in students]
  return found[0] if len(found) == 1 else None


def _unit(runs) -> str:
  """The x axis of every curve: epochs, unless a run's epoch length is unknown or no run
  got past its first epoch (a smoke run), where steps say more."""
  spans = [max((m["step"] for m in r["metrics"]), default=0) / r["steps_per_epoch"]
           for r in runs if r["steps_per_epoch"]]
  return "epoch" if len(spans) == len(runs) and max(spans, default=0) >= 1 else "step"


def _curve(run, key: str, unit: str):
  """(x [K], values [K]) of a metric over training in `unit`, or None."""
  pts = [(r["step"], r[key]) for r in run["metrics"] if key in r]
  scale = run["steps_per_epoch"] if unit == "epoch" else 1
  if pts:
    return [s / scale for s, _ in pts], [v for _, v in pts]
  if key == "eval/top1" and run["summary"] and "history" in run["summary"]:
    h = run["summary"]["history"]
    return [e[unit] for e in h], [e["top1"] for e in h]
  return None


def _runs_section(runs, blocks) -> None:
  rows = []
  for r in runs:
    t = r["teacher"] or {}
    rows.append([r["name"], r["mode"] or "—", r["method"] or "—", r["model"] or "—",
                 r["teacher_model"] or "—", str(r["num_seeds"]), _pm(_top1(r, "best")),
                 _pm(_top1(r, "last")), _pm(_eval_field(r, "last", "top5")),
                 _f(t.get("top1")), "yes" if r["finished"] else "no (running or stopped)"])
  blocks += [("h", "Runs"),
             ("p", "Test top-1 and top-5 in %; mean ± sample std over seeds where a run "
                   "has several. Best: the best evaluation (selected on the test split, as "
                   "the peers report it); last: the final model."),
             ("table", ["run", "mode", "method", "model", "teacher", "seeds", "best top-1",
                        "last top-1", "last top-5", "teacher top-1", "finished"], rows)]
  groups: dict[tuple, list] = {}
  for r in runs:
    key = (r["mode"], r["method"], r["model"], r["teacher_model"], r["dataset"])
    groups.setdefault(key, []).append(r)
  multi = [(k, g) for k, g in groups.items() if len(g) > 1]
  if multi:
    rows = []
    for (mode, method, model, teacher, _), g in multi:
      seeds = [x for r in g for x in (e["best_top1"] for e in r["seeds"])]
      last = [x for r in g for x in (e["last_top1"] for e in r["seeds"])]
      rows.append([method, model, teacher or "—", str(len(seeds)), _pm(mean_std(seeds)),
                   _pm(mean_std(last)), ", ".join(r["name"] for r in g)])
    blocks += [("h", "Methods over run folders"),
               ("p", "Runs with the same mode, method, model, teacher and dataset pooled "
                     "(every seed of every folder)."),
               ("table", ["method", "model", "teacher", "seeds", "best top-1", "last top-1",
                          "runs"], rows)]


def _calibration_section(runs, blocks, out, figures) -> None:
  rows, panels = [], []
  for r in runs:
    cal = [d.get("calibration") for d in _seed_diag(r)]
    cal = [c for c in cal if c]
    pick = lambda k, scale=1.0: (_over_seeds(r, [scale * c[k] for c in cal])
                                 if len(cal) == r["num_seeds"] else None)
    rows.append([r["name"], _pm(_eval_field(r, "last", "ce"), 4), _pm(pick("ece", 100.0)),
                 _pm(pick("aurc", 1000.0)), _pm(pick("e_aurc", 1000.0))])
    if cal:
      panels.append({"name": r["name"], "colour": r["colour"], "bins": cal[0]["bins"],
                     "ece": cal[0]["ece"]})
  blocks += [("h", "Calibration"),
             ("p", "Of the final model on the test split. NLL: mean negative log-likelihood "
                   "(nats; the evaluation's CE). ECE: expected calibration error over 15 "
                   "equal-width confidence bins, in %. AURC and E-AURC: area under the "
                   "risk–coverage curve (examples ranked by maximum probability) and its "
                   "excess over the ideal ranking, ×1000. Lower is better for all four."),
             ("table", ["run", "NLL", "ECE (%)", "AURC (×1000)", "E-AURC (×1000)"], rows)]
  _add_figures(blocks, figures, [(figs.reliability(panels, out),
                                  "Reliability diagrams (seed 0 of each run): accuracy per "
                                  "confidence bin against the diagonal of perfect "
                                  "calibration.")])


def _mass_section(runs, blocks, out, figures) -> None:
  teachers, seen = [], {}
  for r in runs:
    m = r["class_mass"]
    if not m:
      continue
    key = tuple(np.round(np.asarray(m["mass"], np.float64).ravel(), 6))
    own = r["mode"] != "distill"
    if key not in seen:  # one teacher seen by several students, or as its own run
      seen[key] = {"label": (r["model"] if own else r["teacher_model"]) or "?", "own": [],
                   "students": [], "mass": m}
      teachers.append(seen[key])
    seen[key]["own" if own else "students"].append(r["name"])
  if not teachers:
    return
  rows, panels = [], []
  for t in teachers:
    who = ([f"run {', '.join(t['own'])}"] if t["own"] else []) + (
        [f"teacher of {', '.join(t['students'])}"] if t["students"] else [])
    name = f"{t['label']} ({'; '.join(who)})"
    m = t["mass"]
    for tau, mass in zip(m["temperatures"], m["mass"]):
      mass = np.sort(np.asarray(mass, np.float64))[::-1]
      top = max(1, len(mass) // 4)
      rows.append([name, _f(tau, 0), _f(mass[0], 1), _f(mass[-1], 1),
                   _f(mass[0] / mass[-1] if mass[-1] > 0 else None),
                   _f(100.0 * mass[:top].sum() / mass.sum(), 1)])
    panels.append({"name": name, "temperatures": m["temperatures"], "mass": m["mass"],
                   "num_examples": m["num_examples"]})
  blocks += [("h", "Teacher class mass"),
             ("p", "Σ_i softmax(z_i/τ)_c over the training set without augmentation (IPWD, "
                   "Fig. 1). Balanced labels would give N/C per class; the ratio of the "
                   "largest to the smallest class and the share of the top quarter of "
                   "classes measure how long-tailed the teacher's predictions are."),
             ("table", ["teacher", "τ", "largest class", "smallest class", "ratio",
                        "top-quarter share (%)"], rows)]
  _add_figures(blocks, figures, [(figs.class_mass(panels, out),
                                  "The teacher's probability mass per class, ranked.")])


def _recall_of(run, kind: str) -> list[list]:
  return [(e[kind] or {}).get("per_class_recall") for e in run["seeds"]]


def _gain_section(runs, baseline, args, blocks, out, figures, notes) -> None:
  if baseline is None:
    notes.append("No recall-gain table: no baseline (pass --baseline RUN_DIR, the vanilla "
                 "student; found automatically only when exactly one CE run trains the "
                 "distilled students' model).")
    return
  base = [r for r in _recall_of(baseline, args.recall) if r]
  if not base:
    notes.append(f"No recall-gain table: the baseline {baseline['name']} has no per-class "
                 f"recall yet.")
    return
  base_mean = [None if any(b[c] is None for b in base) else float(np.mean([b[c] for b in base]))
               for c in range(len(base[0]))]
  rows, bars, labels = [], [], None
  for r in runs:
    recalls = [x for x in _recall_of(r, args.recall) if x]
    if r is baseline or r["model"] != baseline["model"] or not recalls or not r["class_mass"]:
      continue
    mass = _mass_at(r["class_mass"], args.rank_temperature)
    if len(mass) != len(base_mean):
      continue
    gains = np.asarray([[np.nan if v is None else v for v in
                         dg.recall_gain_by_group(x, base_mean, mass, args.groups)]
                        for x in recalls], np.float64)
    mean = [None if np.isnan(v) else float(v) for v in gains.mean(0)]
    std = ([None if np.isnan(v) else float(v) for v in gains.std(0, ddof=1)]
           if len(recalls) > 1 else None)
    if labels is None:
      labels = _group_labels(len(mass), args.groups)
      own = dg.grouped_recall(base_mean, mass, args.groups)
      own_all = dg.grouped_recall(base_mean, mass, 1)[0]
    rows.append([r["name"]] + [_pm(m if std is None else {"mean": m, "std": s}, 2, True)
                               if m is not None else "—"
                               for m, s in zip(mean, std or [None] * len(mean))]
                + [_pm(_over_seeds(r, [dg.recall_gain_by_group(x, base_mean, mass, 1)[0]
                                       for x in recalls]), 2, True)])
    bars.append({"name": r["name"], "colour": r["colour"], "gain": mean, "std": std})
  if not rows:
    notes.append("No recall-gain table: no run of the baseline's model has both per-class "
                 "recall and its teacher's class mass (diagnostics.json).")
    return
  blocks += [("h", "Recall gain by teacher-mass rank"),
             ("p", f"IPWD's Table 1 layout: classes ranked by the teacher's mass at τ = "
                   f"{args.rank_temperature:g} and split into {args.groups} groups (most "
                   f"massive first); each cell is the run's macro-average recall minus the "
                   f"baseline's ({baseline['name']}), in points, from the {args.recall} "
                   f"evaluation. Mean ± std over the run's seeds where it has several."),
             ("table", ["run"] + labels + ["all classes"], rows),
             ("p", f"The baseline's own macro recall (%) by the same groups (ranked by "
                   f"{rows[0][0]}'s teacher): " + " / ".join(_f(v) for v in own)
                   + f"; all classes {_f(own_all)}.")]
  _add_figures(blocks, figures, [(figs.recall_gain(bars, labels, baseline["name"], out),
                                  "Macro recall gain over the baseline, by teacher-mass rank.")])


def _weights_section(runs, args, blocks, out, figures) -> None:
  rows, hists, scatter, curves = [], [], [], []
  for r in runs:
    w = (_seed_diag(r) or [{}])[0].get("weights") or {}
    final, per_epoch = w.get("final"), w.get("per_epoch") or []
    if final:
      mass = _mass_at(r["class_mass"], args.rank_temperature) if r["class_mass"] else None
      rho = (dg.spearman(final["class_mean"], mass)
             if mass is not None and final.get("class_mean") else None)
      p = final["percentiles"]
      rows.append([r["name"], _f(final["mean"], 3), _f(final["std"], 3), _f(p.get("5"), 3),
                   _f(p.get("50"), 3), _f(p.get("95"), 3), _f(final["max"], 3),
                   _f(rho, 2, True)])
      hists.append({"name": r["name"], "colour": r["colour"], "histogram": final["histogram"],
                    "mean": final["mean"]})
      if rho is not None:
        scatter.append({"name": r["name"], "colour": r["colour"], "mass": mass,
                        "class_mean": final["class_mean"], "spearman": rho})
    logged = _curve(r, "train/weight_mean", args.unit)
    if per_epoch and (len(per_epoch) > 1 or not logged):
      scale = 1 if args.unit == "epoch" else (r["steps_per_epoch"] or 1)
      curves.append({"name": r["name"], "colour": r["colour"],
                     "epochs": [e["epoch"] * scale for e in per_epoch],
                     "mean": [e["mean"] for e in per_epoch],
                     "low": [e["percentiles"]["5"] for e in per_epoch],
                     "high": [e["percentiles"]["95"] for e in per_epoch]})
    elif logged:  # per logged step (the batch means), finer than one epoch's statistics
      x, y = logged
      curves.append({"name": r["name"], "colour": r["colour"], "epochs": x, "mean": y})
  if not rows and not curves:
    return
  blocks.append(("h", "Sample weights"))
  if rows:
    blocks.append(("p", "The per-example weights of the weighted methods (ER-KD, EA-KD, "
                        "IPWD) over the last epoch's training examples (seed 0). ρ: Spearman's "
                        "rank correlation of a class's mean weight with its teacher mass; IPWD "
                        "expects it negative (over-represented classes get less weight)."))
  else:
    blocks.append(("p", "Only the logged batch means of the weights are known (metrics.jsonl): "
                        "the distributions need diagnostics.json."))
  if rows:
    blocks.append(("table", ["run", "mean", "std", "p5", "median", "p95", "max", "ρ"], rows))
  _add_figures(blocks, figures, [
      (figs.weight_histograms(hists, out), "Final weight distributions."),
      (figs.weight_vs_mass(scatter, out), "Mean weight per class against the teacher's "
                                          "class mass."),
      (figs.weights_over_training(curves, out, args.unit),
       "Mean sample weight during training.")])


def _names(paths: list[str]) -> list[str]:
  """The folder names, with the parent's prepended where two would be equal."""
  base = [os.path.basename(p) for p in paths]
  return [os.path.join(os.path.basename(os.path.dirname(p)), b) if base.count(b) > 1 else b
          for p, b in zip(paths, base)]


def write_report(paths: list[str], out: str, baseline: str | None = None, *,
                 recall: str = "last", groups: int = 4, rank_temperature: float = 1.0
                 ) -> dict[str, Any]:
  """Writes the report of the runs under `paths` into `out`; returns {"markdown", "html",
  "figures": [paths], "runs": [names], "baseline": name or None}."""
  args = argparse.Namespace(recall=recall, groups=groups, rank_temperature=rank_temperature)
  found = find_runs(paths)
  if baseline is not None:
    try:
      baseline = find_runs([baseline], depth=0)[0]
    except ReportError as e:
      raise ReportError(f"--baseline must be one run's folder: {e}") from None
    found = found if baseline in found else found + [baseline]
  runs = [load_run(p, n) for p, n in zip(found, _names(found))]
  for i, r in enumerate(runs):
    r["colour"] = figs.colour(i)
  base = (next(r for r in runs if r["path"] == baseline) if baseline is not None
          else _auto_baseline(runs))
  os.makedirs(out, exist_ok=True)
  blocks, figures, notes = [("title", "jaxkd report")], [], []
  blocks.append(("p", f"{len(runs)} runs: " + ", ".join(f"{r['name']} ({r['path']})"
                                                       for r in runs) + "."))
  if base is not None:
    blocks.append(("p", f"Baseline (vanilla student): {base['name']}"
                        + ("" if baseline is not None else " (chosen automatically)") + "."))
  _runs_section(runs, blocks)
  args.unit = _unit(runs)
  curves = [{"name": r["name"], "colour": r["colour"],
             "eval_curve": _curve(r, "eval/top1", args.unit),
             "loss_curve": _curve(r, "train/loss", args.unit)} for r in runs]
  _add_figures(blocks, figures, [
      (figs.learning_curves(curves, out, args.unit), "Test top-1 at each evaluation."),
      (figs.train_loss(curves, out, args.unit), "Training loss at each logged step.")])
  _calibration_section(runs, blocks, out, figures)
  _mass_section(runs, blocks, out, figures)
  _gain_section(runs, base, args, blocks, out, figures, notes)
  _weights_section(runs, args, blocks, out, figures)
  missing = [r["name"] for r in runs if r["diagnostics"] is None]
  if missing:
    notes.append("No diagnostics.json in " + ", ".join(missing) + ": their ECE, AURC, class "
                 "mass, recall gain and weight statistics are not shown.")
  if notes:
    blocks += [("h", "Notes")] + [("p", n) for n in notes]
  md, page = os.path.join(out, "report.md"), os.path.join(out, "report.html")
  with open(md, "w") as f:
    f.write(pages.markdown(blocks))
  with open(page, "w") as f:
    f.write(pages.html(blocks))
  return {"markdown": md, "html": page, "figures": figures, "runs": [r["name"] for r in runs],
          "baseline": base and base["name"]}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxkd.report", description=__doc__.split("\n")[0])
  p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or suite workdirs")
  p.add_argument("--out", required=True, help="folder for report.md, report.html, PNGs")
  p.add_argument("--baseline", help="the vanilla student's run folder (recall-gain table)")
  p.add_argument("--recall", choices=("last", "best"), default="last",
                 help="which evaluation's per-class recall the gain table uses")
  p.add_argument("--groups", type=int, default=4, help="teacher-rank groups (IPWD: 4)")
  p.add_argument("--rank-temperature", type=float, default=1.0,
                 help="the τ of the class mass that ranks the classes")
  a = p.parse_args(argv)
  try:
    result = write_report(a.runs, a.out, a.baseline, recall=a.recall, groups=a.groups,
                          rank_temperature=a.rank_temperature)
  except (ReportError, ValueError) as e:
    print(f"jaxkd.report: error: {e}", file=sys.stderr)
    return 2
  print(f"Report of {len(result['runs'])} runs: {result['html']} (and report.md, "
        f"{len(result['figures'])} figures, in {a.out})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
