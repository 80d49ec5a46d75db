"""Forward + backward time of the reweighted distillation objectives: jaxkd vs PyTorch eager.

Each objective is the distillation term of the training loss, differentiated with respect to
the student logits (the teacher and the auxiliary IPWD head are inputs). jaxkd runs jitted;
the same formulas run in PyTorch eager (written as the peers write them) on the same device in
the same run. The objectives of one size run in --rounds interleaved rounds (KD, ER-KD, ...,
then again), so that another job's load falls on all of them alike; each round takes the median
of --repeats runs after warm-up (compile excluded), and the table the median over rounds. The
machine's load (1-minute load average and the cores other jobs keep busy, `busy_cores`) is
recorded before every round.

  python benchmarks/bench_losses.py             # all sizes, writes benchmarks/results/
  python benchmarks/bench_losses.py --sizes 1024x100 --repeats 20
  python benchmarks/bench_losses.py --hlo-passes 8192x1000   # memory sweeps of the HLO, no timing
"""

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import busy_cores, device_name, device_slug, RESULTS
from jaxkd import losses, weighting

SIZES = {"1024x100": (1024, 100), "1024x1000": (1024, 1000), "8192x1000": (8192, 1000),
         "4x1024x32000": (4, 1024, 32000)}
TEMPERATURE = 4.0


def jax_objectives():
  """name -> f(student, teacher, aux_head, labels) -> scalar, differentiated in student."""
  t = TEMPERATURE
  return {
      "KD": lambda s, te, g, y: losses.kd_loss(s, te, temperature=t),
      "ER-KD": lambda s, te, g, y: losses.kd_loss(
          s, te, temperature=t, weights=weighting.teacher_entropy_weights(te)),
      "EA-KD": lambda s, te, g, y: losses.kd_loss(
          s, te, temperature=t, weights=weighting.adaptive_entropy_weights(te, s)),
      "IPWD (likelihood_ratio)": lambda s, te, g, y: losses.kd_loss(
          s, te, temperature=t, weights=weighting.inverse_propensity_weights(s, g, y)),
      "IPWD (loss_ratio)": lambda s, te, g, y: losses.kd_loss(
          s, te, temperature=t,
          weights=weighting.inverse_propensity_weights(s, g, y, estimator="loss_ratio")),
      "DKD": lambda s, te, g, y: losses.dkd_loss(s, te, y, temperature=t),
      "ER-DKD": lambda s, te, g, y: losses.dkd_loss(
          s, te, y, temperature=t, weights=weighting.teacher_entropy_weights(te)),
  }


def torch_objectives(torch):
  """The same objectives in PyTorch eager, in the peers' style (flattened to [N, C])."""
  F = torch.nn.functional
  t = TEMPERATURE

  def kl_rows(s, te):
    return F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="none").sum(-1)

  def entropy(z, temp):
    p = F.softmax(z / temp, -1)
    return -(p * torch.log(torch.clamp(p, min=1e-10))).sum(-1)

  def kd(s, te, w=None):
    kl = kl_rows(s, te)
    return (kl if w is None else kl * w).mean() * t**2

  def standardize(z):
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)

  def ipw(s, g, y, estimator):
    with torch.no_grad():
      lq_kd = F.log_softmax(standardize(s), -1).gather(-1, y[:, None])[:, 0]
      lq_ce = F.log_softmax(standardize(g), -1).gather(-1, y[:, None])[:, 0]
      if estimator == "likelihood_ratio":
        return 1 + torch.exp(lq_ce - lq_kd)
      return 1 + lq_ce / lq_kd

  def dkd(s, te, y, w=None):
    gt = F.one_hot(y, s.shape[-1]).bool()
    ps, pt = F.softmax(s / t, -1), F.softmax(te / t, -1)
    bs = torch.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
    bt = torch.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="none").sum(-1)
    nckd = F.kl_div(F.log_softmax(s / t - 1000.0 * gt, -1), F.softmax(te / t - 1000.0 * gt, -1),
                    reduction="none").sum(-1)
    per = (tckd + 8.0 * nckd) * t**2
    return (per if w is None else per * w).mean()

  def with_no_grad(fn):
    def wrapped(*a):
      with torch.no_grad():
        return fn(*a)
    return wrapped

  return {
      "KD": lambda s, te, g, y: kd(s, te),
      "ER-KD": lambda s, te, g, y: kd(s, te, with_no_grad(entropy)(te, 4.0)),
      "EA-KD": lambda s, te, g, y: kd(s, te, with_no_grad(
          lambda a, b: 0.5 * entropy(a, 3.0) * (1 + entropy(b, 3.0) / np.log(a.shape[-1])))(
              te, s.detach())),
      "IPWD (likelihood_ratio)": lambda s, te, g, y: kd(s, te, ipw(s.detach(), g, y,
                                                                     "likelihood_ratio")),
      "IPWD (loss_ratio)": lambda s, te, g, y: kd(s, te, ipw(s.detach(), g, y, "loss_ratio")),
      "DKD": lambda s, te, g, y: dkd(s, te, y),
      "ER-DKD": lambda s, te, g, y: dkd(s, te, y, with_no_grad(entropy)(te, 4.0)),
  }


def median_times(fn, repeats, warmup=1):
  """(wall, CPU, faults) of `fn` (which must synchronise), each the median of `repeats` calls
  after `warmup`. CPU: the process's user + system seconds over the call (all its threads),
  which other jobs on a shared machine move less than the wall-clock. Faults: minor page
  faults per call; thousands mean a buffer the allocator mapped afresh (docs/NOTES.md)."""
  for _ in range(warmup):
    fn()
  wall, cpu, faults = [], [], []
  for _ in range(repeats):
    start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
  return statistics.median(wall), statistics.median(cpu), statistics.median(faults)


def make_inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  s = (rng.standard_normal(shape, np.float32) * 3)
  te = (rng.standard_normal(shape, np.float32) * 3)
  g = s + rng.standard_normal(shape, np.float32) * 0.5
  y = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  if dtype == "bfloat16":
    s, te, g = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (s, te, g))
  return s, te, g, y


def jax_runner(fn, inputs, dtype):
  """A no-argument call of the jitted forward + backward (compiled on first call)."""
  jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  s, te, g, y = inputs
  s, te, g = (jnp.asarray(x, jdtype) for x in (s, te, g))
  y = jnp.asarray(y)
  step = jax.jit(jax.value_and_grad(fn))
  return lambda: jax.block_until_ready(step(s, te, g, y))


def torch_runner(torch, fn, inputs, dtype):
  tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  s, te, g, y = inputs
  # Flatten leading axes as a PyTorch user would; bf16 inputs are upcast for float32 math.
  c = s.shape[-1]
  s, te, g = (torch.from_numpy(x.reshape(-1, c)).to(tdtype) for x in (s, te, g))
  y = torch.from_numpy(y.reshape(-1)).long()

  def run():
    s_ = s.detach().float().requires_grad_(True)
    loss = fn(s_, te.float(), g.float(), y)
    loss.backward()
    return loss.item()

  return run


def hlo_passes(fn, inputs, grad=True):
  """Sweeps over [..., C]-sized memory in the compiled forward + backward of `fn` (forward
  only with grad=False).

  From `jax.jit(jax.value_and_grad(fn)).lower(...).compile().as_text()`: for every top-level
  instruction of the entry computation (a fusion, a library fusion, a copy), `reads` counts
  its operands of the logits' shape and `writes` whether its result has that shape; `exp`
  counts the exponentials of that shape inside the fused computations (each one an exp of
  every logit); `temp_mib` is the compiled temporary memory (`memory_analysis()`).
  """
  s, te, g, y = (jnp.asarray(x) for x in inputs)
  compiled = jax.jit(jax.value_and_grad(fn) if grad else fn).lower(s, te, g, y).compile()
  text = compiled.as_text()
  big = "f32[" + ",".join(map(str, s.shape)) + "]"
  bodies, name = {}, None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if head:
      name = "ENTRY" if line.startswith("ENTRY") else head.group(1)
      bodies[name] = []
    elif name and line.strip():
      bodies[name].append(line)
  shapes = {}
  for line in bodies["ENTRY"]:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+)", line)
    if m:
      shapes[m.group(1)] = m.group(2)
  reads = writes = exps = 0
  for line in bodies["ENTRY"]:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*?)\)", line)
    if not m or m.group(3) in ("parameter", "constant", "tuple", "bitcast", "get-tuple-element"):
      continue
    operands = re.findall(r"%([\w.-]+)", m.group(4))
    reads += sum(shapes.get(o, "").startswith(big) for o in operands)
    writes += m.group(2).startswith(big)
    called = re.search(r"calls=%([\w.-]+)", line)
    if called:
      exps += sum(big in l and " exponential(" in l for l in bodies.get(called.group(1), []))
  return dict(reads=reads, writes=writes, exp=exps,
              temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 2))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(SIZES), help="comma list of " + ", ".join(SIZES))
  parser.add_argument("--objectives", default="", help="comma list (default: all)")
  parser.add_argument("--repeats", type=int, default=10, help="runs per objective per round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size")
  parser.add_argument("--repeats-large", type=int, default=2,
                      help="runs per objective per round at the LM size (4x1024x32000)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--tag", default="", help="suffix of the result files' names")
  parser.add_argument("--hlo-passes", metavar="SIZE", default=None,
                      help="print the HLO memory sweeps of every objective at SIZE as JSON")
  args = parser.parse_args(argv)
  if args.hlo_passes:
    inputs = make_inputs(SIZES[args.hlo_passes], "float32")
    print(json.dumps({n: dict(forward=hlo_passes(f, inputs, grad=False),
                              forward_backward=hlo_passes(f, inputs))
                      for n, f in jax_objectives().items()}, indent=1))
    return

  torch = None
  if not args.no_torch:
    import torch  # noqa: F811  (optional baseline)
  jobj = jax_objectives()
  tobj = torch_objectives(torch) if torch else {}
  names = [n for n in jobj if not args.objectives or n in args.objectives.split(",")]
  device = device_name()
  rows = []
  for size in args.sizes.split(","):
    shape = SIZES[size]
    dtype = "bfloat16" if len(shape) == 3 else "float32"
    inputs = make_inputs(shape, dtype)
    repeats = args.repeats_large if len(shape) == 3 else args.repeats
    runners = {n: (jax_runner(jobj[n], inputs, dtype),
                   torch_runner(torch, tobj[n], inputs, dtype) if torch else None) for n in names}
    times = {n: ([], [], [], []) for n in names}  # jax wall, jax CPU, torch wall, jax faults
    loads = []
    for _ in range(args.rounds):
      loads.append(dict(load_average=round(os.getloadavg()[0], 2), busy_cores=busy_cores(0.5)))
      for name in names:
        jr, tr = runners[name]
        wall, cpu, faults = median_times(jr, repeats)
        times[name][0].append(wall)
        times[name][1].append(cpu)
        times[name][3].append(faults)
        if tr is not None:
          times[name][2].append(median_times(tr, repeats)[0])
    for name in names:
      jt = statistics.median(times[name][0])
      tt = statistics.median(times[name][2]) if times[name][2] else None
      row = dict(objective=name, size=size, dtype=dtype, jax_ms=jt * 1e3,
                 jax_ms_rounds=[t * 1e3 for t in times[name][0]],
                 jax_cpu_ms=statistics.median(times[name][1]) * 1e3,
                 jax_cpu_ms_rounds=[t * 1e3 for t in times[name][1]],
                 jax_faults_rounds=times[name][3],
                 torch_ms=None if tt is None else tt * 1e3,
                 speedup=None if tt is None else tt / jt, load=loads)
      rows.append(row)
      print(f"{size:>13} {dtype:>8} {name:>24}: jaxkd {jt*1e3:9.3f} ms"
            + ("" if tt is None else f"  torch {tt*1e3:9.3f} ms  x{tt/jt:5.2f}"), flush=True)
    print(f"{size:>13} load before each round: {loads}", flush=True)
  # Ratio to plain KD (and, for the DKD family, to plain DKD) of the same size.
  base = {(r["size"], r["objective"]): r for r in rows}
  for r in rows:
    for ref in ("KD", "DKD"):
      if (r["size"], ref) in base:
        r["ratio_to_" + ref.lower()] = r["jax_ms"] / base[(r["size"], ref)]["jax_ms"]
        r["cpu_ratio_to_" + ref.lower()] = r["jax_cpu_ms"] / base[(r["size"], ref)]["jax_cpu_ms"]
  write_results(rows, device, args)


def write_results(rows, device, args):
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"losses-{device_slug(device)}"
                      + (f"-{args.tag}" if args.tag else ""))
  meta = dict(device=device, jax=jax.__version__, repeats=args.repeats, rounds=args.rounds,
              repeats_large=args.repeats_large,
              timestamp=time.strftime("%Y-%m-%d %H:%M:%S"), python=sys.version.split()[0],
              what="forward+backward of the distillation term w.r.t. student logits, median")
  try:
    import torch
    meta["torch"] = torch.__version__
    meta["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  lines = [f"# Loss benchmark on {device}", "",
           f"jax {meta['jax']}, torch {meta.get('torch', '-')}; {meta['what']} of {args.repeats} "
           f"runs per round ({args.repeats_large} at 4x1024x32000), median over {args.rounds} interleaved rounds, compile excluded. "
           "speed-up = torch time / jaxkd time; / KD = jaxkd time over plain KD's of the same "
           "size (/ DKD: over plain DKD's, for the DKD family); CPU: the process's user + "
           "system time per call (all threads), which other jobs move less than the "
           "wall-clock; faults: the minor page faults of a call (thousands: a buffer mapped "
           "afresh, 5-10 ms at 8192x1000). Load: the 1-minute load average "
           "and the cores other jobs kept busy (`busy_cores`) before each round, on a machine "
           f"of {os.cpu_count()} cores."
           + ("" if any(r["torch_ms"] is not None for r in rows)
              else " PyTorch was not run this time (--no-torch)."), "",
           "| size | dtype | objective | jaxkd ms | / KD | / DKD | CPU ms | CPU / KD | "
           "faults/call per round | torch eager ms | speed-up |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"
    lines.append(
        f"| {r['size']} | {r['dtype']} | {r['objective']} | {r['jax_ms']:.3f} | "
        f"{fmt(r.get('ratio_to_kd'))} | "
        f"{fmt(r.get('ratio_to_dkd') if 'DKD' in r['objective'] else None)} | "
        f"{r['jax_cpu_ms']:.3f} | {fmt(r.get('cpu_ratio_to_kd'))} | "
        f"{', '.join(str(round(f)) for f in r.get('jax_faults_rounds', [])) or '-'} | "
        + ("-" if r["torch_ms"] is None else f"{r['torch_ms']:.3f}") + " | "
        + fmt(r["speedup"]) + " |")
  lines += ["", "| size | load average before each round | other jobs' busy cores |",
            "|---|---|---|"]
  for size in dict.fromkeys(r["size"] for r in rows):
    load = next(r["load"] for r in rows if r["size"] == size)
    lines.append(f"| {size} | {', '.join(str(l['load_average']) for l in load)} | "
                 f"{', '.join(str(l['busy_cores']) for l in load)} |")
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("wrote", stem + ".json", stem + ".md")


if __name__ == "__main__":
  main()
