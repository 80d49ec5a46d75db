"""What every benchmark shares: the device's name, the slug of its result files, timing."""

import os
import platform
import statistics
import time

import jax


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


def busy_cores(seconds: float = 1.0) -> float | None:
  """How many cores other jobs keep busy, measured from /proc/stat while this process sleeps.

  Unlike the 1-minute load average, which lingers for minutes after a job ends (and counts
  this benchmark's own threads), this sees only the present. None where /proc is missing."""
  def ticks():
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])
  try:
    busy0, total0 = ticks()
    time.sleep(seconds)
    busy1, total1 = ticks()
  except (OSError, ValueError, IndexError):
    return None
  return round((busy1 - busy0) / max(total1 - total0, 1) * os.cpu_count(), 2)
