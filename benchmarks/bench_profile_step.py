"""Where a training step's time goes: XLA's compiled step, op by op, and a profiler trace.

Compiles the same jaxkd step as benchmarks/bench_train_step.py, then
  1. takes a census of the optimised HLO: every op XLA will run (fusions, convolutions,
     grouped convolutions, matmuls, layout copies and transposes, collectives, host
     callbacks), each labelled with the phase of the step it belongs to (the named scopes of
     `jaxkd.train.step.train_step`: teacher, student forward/backward, aux_head, loss, optimizer,
     finite_guard);
  2. traces --steps steps with `jax.profiler` and sums the time of every op, by phase and by
     kind of op (XLA:CPU reports each thunk, a GPU each kernel, under its HLO name);
  3. writes the tables to benchmarks/results/profile-<device>.md (one section per run,
     appended) and leaves the raw trace under --trace-dir for TensorBoard or Perfetto.

  python benchmarks/bench_profile_step.py --pair resnet32x4-resnet8x4 --method erkd
  python benchmarks/bench_profile_step.py --pair resnet56-resnet20 --seeds 5 --seeds-per-vmap 5
  XLA_FLAGS=--xla_cpu_use_xnnpack=false python benchmarks/bench_profile_step.py --tag no-xnnpack

Op times from a trace add up the work of concurrently running ops, so their sum can exceed
the step's wall time on a multi-threaded CPU; the shares are what matters.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import device_name, device_slug, RESULTS  # noqa: E402
from bench_train_step import OBJECTIVES, PAIRS, jax_step, timed  # noqa: E402

# The named scopes of jaxkd.train.step.train_step, most specific first (an op's name holds
# its scopes).
PHASES = ("teacher", "aux_head", "loss", "optimizer", "finite_guard", "student")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
HOST = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
NO_WORK = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")
LAYOUT = ("copy", "transpose")


# ---------------------------------------------------------------------------------------------
# The optimised HLO, op by op.


@dataclasses.dataclass
class Op:
  name: str
  opcode: str
  computation: str
  attributes: str
  op_name: str           # the JAX source path, with the named scopes


_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> dict[str, list[Op]]:
  """computation name -> its ops, from `compiled.as_text()`."""
  comps, current = {}, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      name, opcode, rest = m.groups()
      op_name = _OP_NAME.search(rest)
      comps[current].append(Op(name, opcode, current, rest,
                               op_name.group(1) if op_name else ""))
  return comps


def _called(op: Op, attribute: str) -> list[str]:
  m = re.search(attribute + r"=\{?([%\w.\-, ]+)\}?", op.attributes)
  return [c.strip().lstrip("%") for c in m.group(1).split(",")] if m else []


def _is_grouped(op: Op) -> bool:
  return bool(re.search(r"(feature|batch)_group_count=([2-9]|\d\d)", op.attributes))


def executed_ops(comps: dict[str, list[Op]]) -> list[Op]:
  """The ops the runtime launches: those of the entry computation and of the bodies of its
  loops and conditionals, not the insides of fusions."""
  entry = next(iter(reversed(comps)))   # XLA prints the entry computation last
  out, todo, seen = [], [entry], set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for op in comps[name]:
      if op.opcode in ("while", "conditional", "call"):
        todo += (_called(op, "body") + _called(op, "condition") + _called(op, "to_apply")
                 + _called(op, "branch_computations") + _called(op, "true_computation")
                 + _called(op, "false_computation"))
      elif op.opcode not in NO_WORK:
        out.append(op)
  return out


def kind(op: Op, comps: dict[str, list[Op]]) -> str:
  """What an executed op does: convolution, grouped convolution, matmul, reduction,
  elementwise, layout (copy/transpose), collective, host transfer, ..."""
  body = [op]
  if op.opcode == "fusion":
    body = comps.get((_called(op, "calls") or [""])[0], [])
  opcodes = {o.opcode for o in body} - set(NO_WORK)
  convs = [o for o in body if o.opcode == "convolution"]
  if convs:
    return "grouped convolution" if any(_is_grouped(c) for c in convs) else "convolution"
  if "dot" in opcodes:
    return "matmul"
  if opcodes & set(COLLECTIVES):
    return "collective"
  if opcodes & set(HOST) or (op.opcode == "custom-call" and "callback" in op.attributes):
    return "host transfer"
  if op.opcode == "custom-call":
    return "custom call"
  if opcodes & {"reduce", "reduce-window", "select-and-scatter", "scatter", "sort"}:
    return "reduction / scatter"
  root = body[-1] if body else op    # XLA prints a computation's ROOT last
  if "transpose" in opcodes and root.opcode in LAYOUT:
    return "transpose (+ fused elementwise)"
  if opcodes and opcodes <= set(LAYOUT) | {"reshape", "broadcast", "slice", "concatenate",
                                           "dynamic-slice", "dynamic-update-slice", "pad"}:
    return "layout / copy"
  return "elementwise"


def source(op: Op, comps: dict[str, list[Op]]) -> str:
  """The JAX source path of an op; for a fusion without one, that of the last op inside
  that has one (the nearest to its result)."""
  if op.op_name or op.opcode != "fusion":
    return op.op_name
  body = comps.get((_called(op, "calls") or [""])[0], [])
  return next((o.op_name for o in reversed(body) if o.op_name), "")


def phase(path: str) -> str:
  """The step phase from a JAX source path, e.g. "jit(train_step)/transpose(jvp(student))/
  ResNet/conv" (`transpose(` marks the backward pass)."""
  backward = "transpose(" in path
  for scope in PHASES:
    if re.search(rf"(^|[/(]){scope}($|[/)])", path):
      if scope == "student":
        return "student backward" if backward else "student forward"
      return scope + (" backward" if backward and scope in ("loss", "aux_head") else "")
  return "other"


# ---------------------------------------------------------------------------------------------
# The trace.


def op_times(trace_dir: str, names: set[str]) -> dict[str, float]:
  """HLO op name -> summed duration (s) in the newest trace under `trace_dir`.

  A GPU reports its kernels on the device plane's "XLA Ops" line; XLA:CPU reports each thunk
  on its worker threads' lines of the host plane.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                key=os.path.getmtime)[-1]
  totals = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      if on_device and line.name != "XLA Ops":
        continue
      if not on_device and not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if event.name in names:
          totals[event.name] += event.duration_ns * 1e-9
  return dict(totals)


# ---------------------------------------------------------------------------------------------
# Main.


def share_table(title: str, seconds: dict[str, float], counts: dict[str, int], steps: int,
                total: float) -> list[str]:
  lines = [f"| {title} | ops | ms/step | share |", "|---|---|---|---|"]
  for key, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
    lines.append(f"| {key} | {counts.get(key, 0)} | {sec / steps * 1e3:.2f} | "
                 f"{sec / max(total, 1e-12):.1%} |")
  return lines


def profile(args) -> str:
  teacher, student = PAIRS[args.pair]
  run, compile_s, flops, _, compiled = jax_step(teacher, student, args.method, args.batch,
                                                args.dtype, args.seeds, args.seeds_per_vmap)
  step_s, spread = timed(run, args.repeats, args.warmup)
  comps = parse_hlo(compiled.as_text())
  ops = executed_ops(comps)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxkd-profile-")
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      run()
  times = op_times(trace_dir, {op.name for op in ops})
  by_kind, by_phase = collections.Counter(), collections.Counter()
  n_kind, n_phase = collections.Counter(), collections.Counter()
  for op in ops:
    k, p = kind(op, comps), phase(source(op, comps))
    n_kind[k] += 1
    n_phase[p] += 1
    by_kind[k] += times.get(op.name, 0.0)
    by_phase[p] += times.get(op.name, 0.0)
  total = sum(times.values())
  label = OBJECTIVES[args.method][0]
  seeds = "" if args.seeds == 1 else (
      f", num_seeds {args.seeds}, {args.seeds_per_vmap or args.seeds} vectorised together")
  flags = os.environ.get("XLA_FLAGS", "")
  lines = [
      f"## {args.pair}, {label}, batch {args.batch}, {args.dtype}{seeds}"
      + (f" [{args.tag}]" if args.tag else ""), "",
      f"{time.strftime('%Y-%m-%d %H:%M:%S')}; jax {jax.__version__}; XLA_FLAGS "
      f"`{flags or '(none)'}`; 1-minute load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.",
      "",
      f"Step: {step_s * 1e3:.1f} ms median (spread {spread:.1%}) over {args.repeats} steps; "
      f"compile {compile_s:.1f} s; XLA cost analysis {flops / 1e9 if flops else float('nan'):.1f}"
      f" GFLOP/step. Executed ops: {len(ops)} ({n_kind['convolution']} convolution, "
      f"{n_kind['grouped convolution']} grouped convolution, "
      f"{n_kind['layout / copy'] + n_kind['transpose (+ fused elementwise)']} layout "
      f"transposes/copies, {n_kind['collective']} collective, {n_kind['host transfer']} host "
      f"transfer). Traced {args.steps} steps: {total / args.steps * 1e3:.1f} ms/step of op time "
      f"({times and len(times)} ops seen in the trace).", ""]
  lines += share_table("kind of op", by_kind, n_kind, args.steps, total) + [""]
  lines += share_table("phase", by_phase, n_phase, args.steps, total) + [""]
  top = sorted(((times.get(op.name, 0.0), op) for op in ops), key=lambda t: -t[0])[:args.top]
  lines += [f"Top {args.top} ops:", "", "| op | kind | phase | ms/step | share | source |",
            "|---|---|---|---|---|---|"]
  for sec, op in top:
    path = source(op, comps)
    lines.append(f"| {op.name} | {kind(op, comps)} | {phase(path)} | "
                 f"{sec / args.steps * 1e3:.2f} | {sec / max(total, 1e-12):.1%} | `{path.split('/', 1)[-1][-90:]}` |")
  lines.append("")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pair", default="resnet32x4-resnet8x4", choices=list(PAIRS))
  p.add_argument("--method", default="kd", choices=list(OBJECTIVES))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--seeds-per-vmap", type=int, default=None)
  p.add_argument("--steps", type=int, default=3, help="steps traced")
  p.add_argument("--repeats", type=int, default=5, help="steps timed (untraced)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=12)
  p.add_argument("--tag", default="", help="a label for this section (e.g. the XLA flags)")
  p.add_argument("--trace-dir", default="")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  section = profile(args)
  print(section, flush=True)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"profile-{device_slug(device_name())}.md")
  new = not os.path.exists(path)
  with open(path, "a") as f:
    if new:
      f.write(f"# Training-step profiles on {device_name()}\n\n"
              "Written by benchmarks/bench_profile_step.py: where the time of one jaxkd training "
              "step goes, by kind of op and by phase of the step.\n\n")
    f.write(section + "\n")
  print("appended to", path)


if __name__ == "__main__":
  main()
