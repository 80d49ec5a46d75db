"""What every benchmark shares: the device's name, the slug of its result files, timing,
the machine's load, and the PyTorch reference models.

The scripts run as `python benchmarks/bench_<name>.py` (Python puts benchmarks/ on sys.path
itself); every module here is named bench_* so that none stands beside jaxkd's `losses`,
`models` or `train` under the same name.
"""

import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def device_name() -> str:
  """e.g. "NVIDIA H100 80GB HBM3", or "cpu-2core (AMD EPYC 7B13)" for the host CPU."""
  d = jax.devices()[0]
  if d.platform != "cpu":
    return d.device_kind
  model = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"cpu-{os.cpu_count()}core ({model})"


def device_slug(name: str | None = None) -> str:
  """The device part of result file names: "nvidia-h100-80gb-hbm3", "cpu-2core"."""
  name = device_name() if name is None else name
  return name.split(" (")[0].replace(" ", "-").lower()


def median_time(fn, repeats: int, warmup: int = 3) -> float:
  """Median seconds of `repeats` calls of `fn` (which must synchronise) after `warmup`."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def busy_cores(seconds: float = 1.0, cores: list[int] | None = None) -> float | None:
  """How many cores other jobs keep busy, measured from /proc/stat while this process sleeps.

  Unlike the 1-minute load average, which lingers for minutes after a job ends (and counts
  this benchmark's own threads), this sees only the present. `cores`: only those cores
  (e.g. the one a pinned benchmark runs on); None: all. None where /proc is missing."""
  return busy_core_counts(seconds, cores)[0]


def busy_core_counts(seconds: float, *core_sets: list[int] | None) -> tuple[float | None, ...]:
  """`busy_cores` of each set of cores (None: all of them), over the same `seconds`."""
  names = [["cpu"] if cores is None else [f"cpu{c}" for c in cores] for cores in core_sets]

  def ticks():
    per_cpu = {}
    with open("/proc/stat") as f:
      for line in f:
        name, *rest = line.split()
        if name.startswith("cpu"):
          fields = [int(x) for x in rest[:8]]
          per_cpu[name] = (sum(fields) - fields[3] - fields[4], sum(fields))  # idle + iowait
    return [tuple(sum(per_cpu[n][i] for n in group) for i in (0, 1)) for group in names]

  try:
    before = ticks()
    time.sleep(seconds)
    after = ticks()
  except (OSError, ValueError, IndexError, KeyError):
    return (None,) * len(core_sets)
  return tuple(
      round((b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() if cores is None else len(cores)), 2)
      for (b0, t0), (b1, t1), cores in zip(before, after, core_sets))


def busy_core_seconds() -> float | None:
  """Core-seconds all processes of the machine have kept its cores busy since boot, from
  /proc/stat (None where it is missing): the difference over a run, less the run's own CPU
  time, is what other jobs took meanwhile."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def load_torch_models():
  """tests/torch_models.py (the PyTorch reference models), loaded from its path under a
  private name: the tests folder is not a package and does not belong on sys.path."""
  name = "_jaxkd_bench_torch_models"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "torch_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]
