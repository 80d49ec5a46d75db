"""`python -m jaxkd.report` over run folders this test writes with the trainer's own writers
(`jaxkd.train.report`: the exact files a run writes), plus made-up `diagnostics.json`:
every file is written, and the numbers in report.md are those of the runs' JSON."""

import base64
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxkd import diagnostics as dg
from jaxkd import report
from jaxkd.report_runs import ReportError
from jaxkd.train import report as train_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, N_TRAIN, N_TEST, SPE = 10, 400, 200, 4

STUDENTS = {"ce": ("teacher", None), "kd": ("distill", None), "erkd": ("distill", "entropy"),
            "ipwd": ("distill", "inverse_propensity")}
SUITE = ("teacher",) + tuple(STUDENTS)


def _eval(rng, labels, skill):
  """A made-up evaluation: sums shaped as `eval_step` returns them, and the logits."""
  logits = rng.normal(size=(len(labels), C))
  logits[np.arange(len(labels)), labels] += skill * rng.uniform(0.5, 1.5, len(labels))
  pred = logits.argmax(1)
  ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
  sums = {"top1": (pred == labels).sum(), "top5": (ranks < 5).sum(), "count": len(labels),
          "ce": len(labels) * dg.nll(logits, labels),
          "class_hits": np.bincount(labels[pred == labels], minlength=C),
          "class_count": np.bincount(labels, minlength=C)}
  return train_report.summarize_eval(sums), logits


def write_run(path, name, mode, weighting, seeds, rng, teacher_mass):
  """One run folder as `train_and_evaluate` leaves it (summary, evals, metrics, config,
  run_info) plus a diagnostics.json in the schema of jaxkd/report_runs.py."""
  os.makedirs(path)
  model = "quick_teacher" if name == "teacher" else "quick_student"
  skill = {"teacher": 3.0, "ce": 1.5}.get(name, 2.0)
  epochs = 2 if name == "teacher" else 1
  labels = rng.integers(0, C, N_TEST)
  config = {"mode": mode, "method": name if name != "teacher" else "ce", "model": model,
            "teacher": {"model": "quick_teacher", "checkpoint": os.path.join(
                os.path.dirname(path), "teacher", "model")},
            "dataset": {"name": "fashion_mnist"}, "seed": 0, "num_seeds": len(seeds)}
  train_report.write_json(os.path.join(path, "config.json"), config)
  train_report.write_json(os.path.join(path, "run_info.json"), {"steps_per_epoch": SPE})
  writer = train_report.MetricWriter(path)
  runs = [train_report.new_run_summary(s) for s in seeds]
  diag = {"format": dg.DIAGNOSTICS_FORMAT, "step": SPE * epochs, "epoch": epochs,
          "num_classes": C, "seeds": []}
  if mode == "distill":
    diag["teacher_class_mass"] = teacher_mass
  for step in range(1, SPE * epochs + 1):
    row = {"loss": 2.0 / step, "lr": 0.05}
    if weighting:
      row.update(weight_mean=1.0 + 0.1 * step * (1 if weighting == "entropy" else -0.5),
                 weight_max=3.0)
    writer.write(step, row, prefix="train/")
    if step % SPE == 0:
      results = []
      for i, run in enumerate(runs):
        result, logits = _eval(rng, labels, skill * step / (SPE * epochs))
        results.append(result)
        suffix = "" if len(seeds) == 1 else f"_seed{i}"
        if train_report.record_eval(run, result, step // SPE, step):
          train_report.write_json(os.path.join(path, f"eval_best{suffix}.json"),
                                  {"epoch": step // SPE, **result})
        train_report.write_json(os.path.join(path, f"eval_last{suffix}.json"),
                                {"epoch": step // SPE, **result})
        if step == SPE * epochs:
          conf, correct = dg.confidence_and_correct(logits, labels)
          entry = {"seed": seeds[i], "calibration": dg.calibration_from(
              conf, correct, result["ce"])}
          if name == "teacher":
            entry["self_class_mass"] = teacher_mass
          elif mode != "distill":  # the CE student's own predictions
            z = rng.normal(size=(N_TRAIN, C)) + np.linspace(1, 0, C)
            entry["self_class_mass"] = dg.class_mass_record(dg.class_mass(z), dg.TEMPERATURES,
                                                            N_TRAIN)
          if weighting:
            y = rng.integers(0, C, N_TRAIN)
            # Less weight for classes of more teacher mass, as IPWD intends.
            share = np.asarray(teacher_mass["mass"][0])[y] / (N_TRAIN / C)
            w = rng.gamma(4.0, 0.25, N_TRAIN) * (1.5 - share / 2)
            entry["weights"] = {"per_epoch": [dg.epoch_weight_record(1, w)],
                                "final": dg.weight_stats(w, y, C)}
          diag["seeds"].append(entry)
      writer.write(step, {"top1": float(np.mean([r["top1"] for r in results]))},
                   prefix="eval/")
  writer.close()
  final = train_report.final_summary(runs, teacher=None, images_per_sec=1000.0,
                                     steps=SPE * epochs, model=model, mode=mode,
                                     method=config["method"])
  train_report.write_json(os.path.join(path, "summary.json"), final)
  train_report.write_json(os.path.join(path, "diagnostics.json"), diag)
  return final


def write_suite(root, seed=0, student_seeds=(0,)):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N_TRAIN, C)) + np.linspace(2, 0, C)  # a long-tailed teacher
  mass = dg.class_mass_record(dg.class_mass(z), dg.TEMPERATURES, N_TRAIN)
  summaries, rows = {}, []
  for name in SUITE:
    mode, weighting = ("teacher", None) if name == "teacher" else STUDENTS[name]
    seeds = (0,) if name == "teacher" else student_seeds
    summaries[name] = write_run(os.path.join(root, name), name, mode, weighting, seeds, rng,
                                mass)
    rows.append({"run": name, "mode": mode, "best_top1": summaries[name]["best_top1"]})
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump(rows, f)
  return summaries, mass


def _md_table(md, heading):
  """{first cell: [cells]} of the first table after `## heading` in report.md."""
  part = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
  rows = [line.strip("|").split("|") for line in part.splitlines() if line.startswith("|")]
  return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[2:]}


def _pm(v):
  return f"{v['mean']:.2f} ± {v['std']:.2f}" if isinstance(v, dict) else f"{v:.2f}"


@pytest.mark.parametrize("student_seeds", [(0,), (0, 1)])
def test_report_of_a_suite(tmp_path, student_seeds):
  summaries, mass = write_suite(str(tmp_path / "suite"), student_seeds=student_seeds)
  out = str(tmp_path / "report")
  result = report.write_report([str(tmp_path / "suite")], out)
  assert result["runs"] == list(SUITE) and result["baseline"] == "ce"
  names = {os.path.basename(p) for p in result["figures"]}
  assert names == {"learning_curves.png", "train_loss.png", "reliability.png",
                   "class_mass.png", "recall_gain.png", "weight_histograms.png",
                   "weight_vs_mass.png", "weights_over_training.png"}
  for name in names | {"report.md", "report.html"}:
    assert os.path.getsize(os.path.join(out, name)) > 0
  for png in names:
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  md = open(os.path.join(out, "report.md")).read()
  page = open(os.path.join(out, "report.html")).read()
  # The HTML is self-contained: every figure inline, no file links.
  assert page.count("data:image/png;base64,") == len(names) and ".png\"" not in page
  blob = re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1)
  assert base64.b64decode(blob)[:4] == b"\x89PNG"
  # The run table repeats summary.json's numbers.
  runs = _md_table(md, "Runs")
  for name, s in summaries.items():
    assert runs[name][5] == _pm(s["best_top1"]) and runs[name][6] == _pm(s["last_top1"])
  # The gain table is diagnostics.recall_gain_by_group on the eval files' recall.
  base = [json.load(open(tmp_path / "suite" / "ce" / f"eval_last{sfx}.json"))
          ["per_class_recall"] for sfx in _suffixes(student_seeds)]
  base = np.mean(base, 0)
  gains = _md_table(md, "Recall gain by teacher-mass rank")
  assert set(gains) == {"kd", "erkd", "ipwd"}
  for name in gains:
    per_seed = [dg.recall_gain_by_group(
        json.load(open(tmp_path / "suite" / name / f"eval_last{sfx}.json"))["per_class_recall"],
        base, mass["mass"][0]) for sfx in _suffixes(student_seeds)]
    want = np.mean(per_seed, 0)
    got = [float(c.split(" ± ")[0]) for c in gains[name][:5]]
    macro = np.mean([np.nanmean(np.asarray(json.load(open(
        tmp_path / "suite" / name / f"eval_last{sfx}.json"))["per_class_recall"]) - base)
        for sfx in _suffixes(student_seeds)])  # the gain over all classes
    np.testing.assert_allclose(got, list(want) + [macro], atol=0.005 + 1e-9)
  own = dg.grouped_recall(base, mass["mass"][0])
  assert ("by the same groups (ranked by kd's teacher): " + " / ".join(f"{v:.2f}" for v in own)
          + f"; all classes {np.mean(base):.2f}.") in md
  # Calibration and weights come from diagnostics.json.
  cal = _md_table(md, "Calibration")
  d = json.load(open(tmp_path / "suite" / "kd" / "diagnostics.json"))
  eces = [100 * s["calibration"]["ece"] for s in d["seeds"]]
  assert cal["kd"][1].split(" ± ")[0] == f"{np.mean(eces):.2f}"
  w = _md_table(md, "Sample weights")
  assert set(w) == {"erkd", "ipwd"}
  final = json.load(open(tmp_path / "suite" / "ipwd" / "diagnostics.json"))["seeds"][0]
  assert w["ipwd"][0] == f"{final['weights']['final']['mean']:.3f}"
  rho = dg.spearman(final["weights"]["final"]["class_mean"], mass["mass"][0])
  assert w["ipwd"][6] == f"{rho:+.2f}"
  mass_rows = _md_table(md, "Teacher class mass")
  # The teacher (its own run and the teacher of three students) and the CE student's own.
  assert list(mass_rows) == ["quick_teacher (run teacher; teacher of kd, erkd, ipwd)",
                             "quick_student (run ce)"]


def _suffixes(seeds):
  return [""] if len(seeds) == 1 else [f"_seed{i}" for i in range(len(seeds))]


def test_runs_without_diagnostics_and_an_explicit_baseline(tmp_path):
  write_suite(str(tmp_path / "s"))
  for name in SUITE:
    os.remove(tmp_path / "s" / name / "diagnostics.json")
  out = str(tmp_path / "r")
  result = report.write_report([str(tmp_path / "s" / "kd"), str(tmp_path / "s" / "ipwd")],
                               out, baseline=str(tmp_path / "s" / "ce"))
  assert result["runs"] == ["kd", "ipwd", "ce"] and result["baseline"] == "ce"
  names = {os.path.basename(p) for p in result["figures"]}
  # Without diagnostics only what metrics.jsonl and the eval files hold can be drawn (and
  # these students evaluated once: no learning curve).
  assert names == {"train_loss.png", "weights_over_training.png"}
  md = open(os.path.join(out, "report.md")).read()
  assert "No diagnostics.json in kd, ipwd, ce" in md and "No recall-gain table" in md


def test_cli_errors_and_no_jax(tmp_path):
  write_suite(str(tmp_path / "s"))
  code = ("import sys, runpy; sys.argv = ['x', sys.argv[1], '--out', sys.argv[2]];\n"
          "try:\n  runpy.run_module('jaxkd.report', run_name='__main__')\n"
          "except SystemExit as e:\n  assert e.code == 0, e.code\n"
          "bad = [m for m in ('jax', 'tensorflow', 'matplotlib.pyplot') if m in sys.modules]\n"
          "assert not bad, bad")
  env = {**os.environ, "MPLBACKEND": ""}  # no display and no backend asked for
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), str(tmp_path / "o")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  bad = subprocess.run([sys.executable, "-m", "jaxkd.report", str(tmp_path / "nothing"),
                        "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "is not a folder" in bad.stderr


def test_bad_folders(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ReportError, match="holds no run"):
    report.write_report([str(tmp_path / "empty")], str(tmp_path / "o"))
  write_suite(str(tmp_path / "s"))
  with open(tmp_path / "s" / "kd" / "diagnostics.json", "w") as f:
    json.dump({"format": "other"}, f)
  with pytest.raises(ReportError, match="jaxkd-diagnostics-1"):
    report.write_report([str(tmp_path / "s")], str(tmp_path / "o"))


@pytest.mark.parametrize("module,allowed", [
    ("diagnostics", set()), ("report_figures", set()), ("report_pages", set()),
    ("report_runs", {"jaxkd.diagnostics"}),
    ("report", {"jaxkd.diagnostics", "jaxkd.report_figures", "jaxkd.report_pages",
                "jaxkd.report_runs"}),
])
def test_report_modules_import_nothing_of_the_trainer(module, allowed):
  """docs/DESIGN.md#import-rules: the diagnostics and the report stand on their own."""
  import ast
  tree = ast.parse(open(os.path.join(REPO, "jaxkd", f"{module}.py")).read())
  found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  found |= {f"{n.module}.{a.name}" if n.module == "jaxkd" else n.module
            for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
            for a in n.names}
  assert {m for m in found if m.split(".")[0] in ("jaxkd", "jax")} == allowed


@pytest.mark.slow
def test_report_of_a_real_smoke_suite(tmp_path):
  """The quickstart's smoke suite (teacher, then a sweep of the CE student and IPWD) on the
  small generated Fashion-MNIST, then the report: the files the trainer really writes are
  the ones read, a sweep's members as runs."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import helpers
  work = tmp_path / "qs"
  result = helpers.cli(["--config", os.path.join(REPO, "configs", "quickstart.py") + ":smoke",
                        "--workdir", str(work),
                        f"--config.dataset.data_dir={helpers.small_fashion_data_dir()}",
                        "--config.suite=('teacher','students')", "--config.max_steps=3",
                        "--config.runs.students.sweep=('ce','ipwd')",
                        "--config.log_every_steps=1",
                        "--config.progress_bar=False"], timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  # The suite wrote its own report at the end and said where.
  assert f"{work}/report/report.html" in result.stdout
  assert os.path.isfile(work / "report" / "report.md")
  out = str(tmp_path / "report")
  res = report.write_report([str(work)], out)
  assert res["runs"] == ["teacher", "ce", "ipwd"] and res["baseline"] == "ce"
  assert os.path.getsize(os.path.join(out, "report.html")) > 0
  md = open(os.path.join(out, "report.md")).read()
  runs = _md_table(md, "Runs")
  for name in res["runs"]:
    s = json.load(open(work / ("" if name == "teacher" else "students") / name / "summary.json"))
    assert runs[name][5] == _pm(s["best_top1"]) and runs[name][6] == _pm(s["last_top1"])
    assert runs[name][7] == f"{s['last']['top5']:.2f}"
  teacher = json.load(open(work / "students" / "ipwd" / "summary.json"))["teacher"]
  assert runs["ipwd"][8] == f"{teacher['top1']:.2f}"
  cal = _md_table(md, "Calibration")
  assert cal["ipwd"][0] == f"{json.load(open(work / 'students' / 'ipwd' / 'eval_last.json'))['ce']:.4f}"
  names = {os.path.basename(p) for p in res["figures"]}
  # One evaluation per run is no learning curve; the losses and weights are logged each step;
  # the rest come from the diagnostics.json each run wrote.
  assert names == {"train_loss.png", "weights_over_training.png", "reliability.png",
                   "class_mass.png", "recall_gain.png", "weight_histograms.png",
                   "weight_vs_mass.png"}
  assert "No diagnostics.json" not in md
  ipwd = json.load(open(work / "students" / "ipwd" / "diagnostics.json"))["seeds"][0]
  assert cal["ipwd"][1] == f"{100 * ipwd['calibration']['ece']:.2f}"


def test_a_students_teacher_mass_from_the_teachers_folder(tmp_path):
  """A distill run without its own teacher_class_mass takes the one its teacher's run wrote
  (config.teacher.checkpoint = …/teacher/model)."""
  _, mass = write_suite(str(tmp_path / "s"))
  path = tmp_path / "s" / "kd" / "diagnostics.json"
  d = json.load(open(path))
  del d["teacher_class_mass"]
  json.dump(d, open(path, "w"))
  md = open(report.write_report([str(tmp_path / "s")], str(tmp_path / "o"))["markdown"]).read()
  assert "kd" in _md_table(md, "Recall gain by teacher-mass rank")
  # Deleting the teacher's own record as well leaves kd out of the table.
  t = tmp_path / "s" / "teacher" / "diagnostics.json"
  d = json.load(open(t))
  del d["seeds"][0]["self_class_mass"]
  json.dump(d, open(t, "w"))
  md = open(report.write_report([str(tmp_path / "s")], str(tmp_path / "o"))["markdown"]).read()
  assert "kd" not in _md_table(md, "Recall gain by teacher-mass rank")
