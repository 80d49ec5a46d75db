"""Test set-up: CPU only, 8 virtual devices, float64 available for references.

The device count must be fixed before JAX initialises its backends, so it is set here, at
import time of the test session, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must come after the environment above)

# jaxkd computes in float32; float64 is switched on only inside reference code that asks
# for it explicitly with numpy, so JAX's default dtype stays float32 here.
assert jax.device_count() == 8, f"expected 8 virtual CPU devices, got {jax.devices()}"
