"""Sweep throughput: M objectives × S seeds in one program against M·S separate runs.

A sweep (`jaxkd.train.step.sweep_train_step`, what the trainer runs for `config.sweep`)
trains every member × seed student from one teacher forward per seed's batch. Without it,
the same grid is M·S separate runs, each with its own teacher forward. Per pair and batch
this script compiles, on random normalised images:

  - the single-run step of each objective (`jaxkd.train.step.train_step`, jitted),
  - the teacher's inference forward alone (t),
  - the sweep step of the M objectives × S seeds, for each S in --seeds,

and times them interleaved: every repeat runs the sweep step, each single step and the
teacher forward once, in an order that rotates, so that a varying load hits all alike.
Times are medians over --repeats, compile excluded, every call synchronised.

Reported: images/s per trained student (sweep: M·S·B / T_sweep; separate runs one after
another: M·S·B / (S·Σ_m T_m)), the speed-up S·Σ_m T_m / T_sweep, and its bound if the
teacher forward were the only work saved: Σ_m T_m / (Σ_m T_m − (M − 1)·t) (one teacher
forward instead of M per seed's batch; the same for every S); and the fraction of the bound
reached. On a CPU the members and seeds are unrolled (`seeds_per_vmap` = 1); on a GPU the
seeds of a member are vectorised (the platform default).

  python benchmarks/bench_sweep.py                                  # CPU default matrix
  python benchmarks/bench_sweep.py --pairs resnet56-resnet20 --seeds 1,5 --repeats 10

Writes benchmarks/results/sweep-<device>[-tag].{json,md}.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import busy_core_seconds, device_name, device_slug, RESULTS
from bench_train_step import OBJECTIVES, PAIRS, calibrated_teacher, jax_config, random_batch
from bench_train_step import load_average, versions

from jaxkd import config as jconfig
from jaxkd import models
from jaxkd.train import step as jstep

SWEEP_PAIRS = {**PAIRS, "quick_teacher-quick_student": ("quick_teacher", "quick_student")}
# family -> (classes, training images): steps per epoch only set the schedules' horizon.
_DATA = {"cifar": (100, 50_000), "imagenet": (1000, 1_281_167), "quick": (10, 60_000)}


def _step_config(teacher: str, student: str, method: str, batch: int, dtype: str):
  spec = jconfig.resolve(jax_config(teacher, student, method, batch, dtype, 1))
  classes, images = _DATA[models.dataset_family(student)]
  return jstep.make_step_config(
      model=student, num_classes=classes, objective=spec.objective, optimizer=spec.optimizer,
      steps_per_epoch=images // batch, num_epochs=spec.num_epochs, teacher_model=teacher,
      dtype=dtype), classes


def build(teacher: str, student: str, methods, batch: int, dtype: str, seeds_list,
          seeds_per_vmap):
  """{name: run()} of the single steps, the teacher forward and each sweep; compile seconds."""
  cfgs, classes = zip(*[_step_config(teacher, student, m, batch, dtype) for m in methods])
  classes = classes[0]
  shape = models.input_shape(student)
  max_seeds = max(seeds_list)
  batches = [random_batch(shape, batch, classes, seed=s) for s in range(max_seeds)]
  teacher_model = next(c.teacher for c in cfgs if c.teacher is not None)
  teacher_vars = calibrated_teacher(teacher_model, jnp.asarray(batches[0]["image"]),
                                    jax.random.key(1))
  init = lambda cfg, key: jstep.init_train_state(cfg, key, image_shape=shape,
                                                 feature_dim=models.feature_dim(student))
  runs, compile_s = {}, {}

  def add(name, fn, args, donate: bool):
    """Compiles fn(*args); run() calls it, feeding a donated state back in."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args).compile()
    compile_s[name] = time.perf_counter() - start
    carry = list(args)

    def run():
      out = compiled(*carry)
      if donate:
        carry[0] = out[0]
      jax.block_until_ready(out)

    runs[name] = run

  one = jax.device_put(batches[0])
  for m, cfg in zip(methods, cfgs):
    state = jax.jit(functools.partial(init, cfg))(jax.random.key(0))
    add(m, functools.partial(jstep.train_step, cfg),
        (state, one, teacher_vars if cfg.teacher is not None else None), donate=True)
  add("teacher", lambda v, x: jstep.teacher_logits(teacher_model, v, x),
      (teacher_vars, one["image"]), donate=False)
  for s in seeds_list:
    keys = jnp.stack([jax.random.key(i) for i in range(s)])
    states = tuple(jax.jit(jax.vmap(functools.partial(init, cfg)))(keys) for cfg in cfgs)
    data = jax.device_put(jax.tree.map(lambda *x: np.stack(x), *batches[:s]))
    add(f"sweep{s}", functools.partial(jstep.sweep_train_step, cfgs,
                                       seeds_per_vmap=seeds_per_vmap),
        (states, data, teacher_vars), donate=True)
  return runs, compile_s


def time_interleaved(runs: dict, repeats: int, warmup: int) -> dict[str, float]:
  """Median seconds of each run, all timed in rotating order within every repeat."""
  names = list(runs)
  for _ in range(warmup):
    for n in names:
      runs[n]()
  times = {n: [] for n in names}
  for r in range(repeats):
    for n in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      runs[n]()
      times[n].append(time.perf_counter() - start)
  return {n: float(np.median(v)) for n, v in times.items()}


def rows_of(pair, batch, methods, seeds_list, times, compile_s) -> list[dict]:
  singles = sum(times[m] for m in methods)
  t = times["teacher"]
  bound = singles / (singles - (len(methods) - 1) * t)
  # The teacher's share of a step as the KD step minus the CE-only step (how the issue-era
  # profiles estimate it): also what the KD loss itself costs, so a slightly lower bound.
  t_step = times["kd"] - times["ce"] if {"kd", "ce"} <= set(methods) else None
  bound_step = (singles / (singles - (len(methods) - 1) * t_step)
                if t_step is not None and t_step > 0 else None)
  out = []
  for s in seeds_list:
    sweep = times[f"sweep{s}"]
    students = len(methods) * s
    speedup = s * singles / sweep
    out.append({"pair": pair, "batch": batch, "members": len(methods), "seeds": s,
                "students": students, "single_ms": {m: 1e3 * times[m] for m in methods},
                "teacher_ms": 1e3 * t, "sweep_ms": 1e3 * sweep,
                "separate_img_s_per_student": students * batch / (s * singles) / students,
                "sweep_img_s_per_student": students * batch / sweep / students,
                "speedup": speedup, "bound": bound, "fraction_of_bound": speedup / bound,
                "kd_minus_ce_ms": None if t_step is None else 1e3 * t_step,
                "bound_kd_minus_ce": bound_step,
                "compile_s": compile_s[f"sweep{s}"]})
  return out


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [f"# Sweep benchmark on {meta['device']}", "",
           f"{meta['date']}; jax {meta['versions'].get('jax')}; {meta['dtype']}; seeds per "
           f"vmap: {meta['seeds_per_vmap'] or 'platform default'}; median of {meta['repeats']} "
           f"interleaved repeats after {meta['warmup']}.", "",
           f"Machine load: 1-minute load average {meta['load_before']} before, "
           f"{meta['load_after']} after; other processes' CPU use during the run "
           f"{meta['other_cpu']}.", "",
           "*separate*: the M·S students as separate runs one after another (each its own "
           "teacher forward); *sweep*: one program, one teacher forward per seed's batch. "
           "*bound*: the speed-up if only the M − 1 saved teacher forwards per batch counted, "
           "Σ_m T_m / (Σ_m T_m − (M − 1)·t), with t the teacher forward timed alone; "
           "*bound′*: the same with t = KD step − CE step (the teacher's share inside a step).",
           "",
           "| pair | batch | members × seeds | single steps ms (Σ) | teacher fwd ms | sweep ms "
           "| img/s per student: separate | sweep | speed-up | bound | of bound | bound′ | "
           "of bound′ | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['pair']} | {r['batch']} | {r['members']} × {r['seeds']} | "
        f"{sum(r['single_ms'].values()):.1f} | {r['teacher_ms']:.1f} | {r['sweep_ms']:.1f} | "
        f"{r['separate_img_s_per_student']:.1f} | {r['sweep_img_s_per_student']:.1f} | "
        f"{r['speedup']:.2f}× | {r['bound']:.2f}× | {100 * r['fraction_of_bound']:.0f}% | "
        + (f"{r['bound_kd_minus_ce']:.2f}× | {100 * r['speedup'] / r['bound_kd_minus_ce']:.0f}% | "
           if r["bound_kd_minus_ce"] else "- | - | ") + f"{r['compile_s']:.0f} |")
  lines += ["", "Single steps (ms): " + "; ".join(
      f"{r['pair']} b{r['batch']}: " + ", ".join(f"{m} {v:.1f}" for m, v in
                                                 r["single_ms"].items())
      for r in rows if r["seeds"] == rows[0]["seeds"])]
  lines += [f"- {n}" for n in meta["notes"]]
  return "\n".join(lines) + "\n"


def main(argv=None):
  on_gpu = jax.devices()[0].platform == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", default="quick_teacher-quick_student,resnet56-resnet20")
  p.add_argument("--methods", default=",".join(OBJECTIVES))
  p.add_argument("--batch", default="64" if not on_gpu else "64,512")
  p.add_argument("--quick-batch", default="128", help="batch of the quick pair")
  p.add_argument("--seeds", default="1,5")
  p.add_argument("--seeds-per-vmap", type=int, default=0, help="0: the platform default")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
  p.add_argument("--note", action="append", default=[])
  p.add_argument("--tag", default="")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  methods = args.methods.split(",")
  seeds_list = [int(s) for s in args.seeds.split(",")]
  platform = jax.devices()[0].platform
  spv = args.seeds_per_vmap or jstep.default_seeds_per_vmap(max(seeds_list), platform)
  meta = {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
          "versions": versions(), "dtype": args.dtype, "seeds_per_vmap": spv,
          "repeats": args.repeats, "warmup": args.warmup, "load_before": load_average(),
          "notes": args.note, "argv": sys.argv[1:]}
  before, own = busy_core_seconds(), time.process_time()
  rows = []
  for pair in args.pairs.split(","):
    teacher, student = SWEEP_PAIRS[pair]
    batches = args.quick_batch if student.startswith("quick") else args.batch
    for batch in (int(b) for b in batches.split(",")):
      runs, compile_s = build(teacher, student, methods, batch, args.dtype, seeds_list, spv)
      times = time_interleaved(runs, args.repeats, args.warmup)
      for r in rows_of(pair, batch, methods, seeds_list, times, compile_s):
        rows.append(r)
        print(json.dumps(r), flush=True)
  after, own = busy_core_seconds(), time.process_time() - own
  meta["load_after"] = load_average()
  meta["other_cpu"] = "unknown" if before is None or after is None else (
      f"{max(0.0, after - before - own):.0f} core-seconds (this run: {own:.0f})")
  name = f"sweep-{device_slug()}" + (f"-{args.tag}" if args.tag else "")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, name + ".json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(args.out, name + ".md"), "w") as f:
    f.write(markdown(rows, meta))
  print(markdown(rows, meta))


if __name__ == "__main__":
  main()
