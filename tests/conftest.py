"""Test set-up: CPU only, 8 virtual devices, float64 available for references.

The device count must be fixed before JAX initialises its backends, so it is set here, at
import time of the test session, before any test module imports jax.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the session, in the environment so that the trainer
# and benchmark subprocesses share it too: the same program (a run resumed after a kill, the
# eval step of every quickstart student, the two sides of bench_against_revision) compiles
# once per session instead of once per process or per run. Nothing is kept between sessions,
# so CI still compiles everything from scratch once. JAX reports a cache hit as a backend
# compile too, so helpers.count_compilations counts the same programs with or without it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jaxkd-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (must come after the environment above)

# jaxkd computes in float32; float64 is switched on only inside reference code that asks
# for it explicitly with numpy, so JAX's default dtype stays float32 here.
assert jax.device_count() == 8, f"expected 8 virtual CPU devices, got {jax.devices()}"
