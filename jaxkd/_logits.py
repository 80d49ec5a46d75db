"""Private numerics and input checks shared by `jaxkd.losses` and `jaxkd.weighting`.

Not public API: names here may change without notice. The two public modules import this one
and nothing else of jaxkd, so copying the loss layer into your own code means copying
`_logits.py`, `losses.py` and (for the sample weights) `weighting.py`.

Conventions (docs/DESIGN.md#numerics-of-the-loss-layer): logits carry classes on the last
axis and any leading axes; math runs in at least float32; a `where=` mask over the leading
axes excludes rows that may hold anything (padding, ±inf, NaN) without reaching a value or a
gradient.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array or anything jnp.asarray accepts.


# --------------------------------------------------------------------------------------------
# Input checks. They run on shapes and Python scalars only, so they fire at trace time, before
# any computation, and cost nothing inside a compiled step.


def as_float32(x: Array) -> jax.Array:
  """Promotes to at least float32 (bf16/f16 in -> f32 math; f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_positive(value: Any, name: str) -> None:
  """Raises ValueError if a concrete scalar `value` is not a finite positive number.

  Traced values (e.g. a learnable temperature under `jit` or `grad`) have no value at trace
  time and pass: converting one to NumPy raises JAX's documented tracer-conversion error.
  """
  try:
    v = np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  try:
    v = float(v)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a positive number, got {value!r}.") from e
  if not v > 0 or v == float("inf"):
    raise ValueError(f"{name} must be a finite positive number, got {value!r}.")


def check_option(value: Any, options: tuple, name: str) -> None:
  """Raises ValueError if `value` is not one of `options`."""
  if value not in options:
    raise ValueError(f"{name} must be one of {options}, got {value!r}.")


def check_class_axis(x: Array, name: str) -> None:
  """`x` has a non-empty last (class) axis."""
  if jnp.ndim(x) < 1 or jnp.shape(x)[-1] < 1:
    raise ValueError(f"{name} must have a class axis (last axis), got shape {jnp.shape(x)}.")


def check_logits_pair(a: Array, b: Array, name_a: str, name_b: str) -> None:
  """Two logits arrays must have the same shape with at least one (class) axis."""
  check_class_axis(a, name_a)
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and "
        f"{jnp.shape(b)}.")


def check_labels(labels: Array, logits: Array, name: str = "labels") -> None:
  """Integer labels of shape `logits.shape[:-1]`."""
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(
        f"{name} must have shape {jnp.shape(logits)[:-1]} (the logits' leading axes), got "
        f"{jnp.shape(labels)}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{name} must be integer class indices, got dtype {jnp.result_type(labels)}.")


def check_leading(x: Array | None, leading_shape: tuple[int, ...], name: str) -> None:
  """`x` (a per-example array such as weights or a where-mask) matches the leading shape."""
  if x is not None and jnp.shape(x) != tuple(leading_shape):
    raise ValueError(
        f"{name} must have shape {tuple(leading_shape)} (the per-example shape), got "
        f"{jnp.shape(x)}.")


# --------------------------------------------------------------------------------------------
# Masks.


def mask_rows(logits: Array, where: Array | None) -> jax.Array:
  """Replaces the logits of rows that `where` excludes by zeros.

  Excluded rows may hold ±inf or NaN (padding tokens, dropped examples). Multiplying their loss
  by zero would still give NaN (0·inf) and NaN gradients, so they are replaced before any math
  (the "double where" rule for safe gradients).
  """
  if where is None:
    return logits
  return jnp.where(jnp.asarray(where, bool)[..., None], logits, jnp.zeros((), logits.dtype))


def mask_labels(labels: Array, where: Array | None) -> jax.Array:
  """Replaces the labels of excluded rows by class 0.

  Excluded rows may carry any label (padding, −1); class 0 keeps their gathers in range.
  """
  labels = jnp.asarray(labels)
  if where is None:
    return labels
  return jnp.where(jnp.asarray(where, bool), labels, 0)


def masked_mean(x: jax.Array, where: Array | None) -> jax.Array:
  """Σ_i where_i · x_i / max(Σ_i where_i, 1): the mean over the kept entries, 0 if none.

  Excluded entries never reach the result, even if they hold NaN or inf.
  """
  if where is None:
    return jnp.mean(x)
  where = jnp.asarray(where, bool)
  return jnp.sum(jnp.where(where, x, 0.0)) / jnp.maximum(jnp.sum(where), 1).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Building blocks.


def row_max(z: jax.Array) -> jax.Array:
  """max over the last axis, keepdims, as a constant for autodiff; 0 for all −inf rows.

  Every log-sum-exp here is written lse(z) = log Σ exp(z − m) + m with this m; the identity
  holds for any m, so m carries no gradient (on both sides of it).
  """
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  return jnp.where(jnp.isfinite(m), m, 0.0)


def scaled_shift(z: jax.Array, temperature: Any = 1.0) -> jax.Array:
  """u = (z − max z) / τ: the logits at temperature τ shifted to a row maximum of 0.

  max(z/τ) = max(z)/τ for τ > 0, so one maximum of the raw logits serves every temperature
  and every function of the same logits (XLA computes it once): KD at τ = 4, ER-KD's entropy
  at τ′ = 4, EA-KD's at t = 3 share a single sweep.
  """
  return (z - row_max(z)) / temperature


def shifted_logsumexp(z: jax.Array, temperature: Any = 1.0) -> tuple[jax.Array, jax.Array]:
  """Returns (u, lse) with u = scaled_shift(z, τ) and lse = log Σ exp(u), both float32.

  log softmax(z/τ) = u − lse, elementwise and without cancellation against the max.
  """
  u = scaled_shift(z, temperature)
  return u, jnp.log(jnp.sum(jnp.exp(u), axis=-1))


def take_label(u: jax.Array, labels: jax.Array) -> jax.Array:
  """u_y per row: `[..., C]` and integer `[...]` -> `[...]`."""
  return jnp.take_along_axis(u, jnp.asarray(labels)[..., None], axis=-1)[..., 0]


def expectation(p: jax.Array, v: jax.Array) -> jax.Array:
  """Σ_c p_c · v_c over the last axis, with the convention 0 · (±inf) = 0."""
  return jnp.sum(jnp.where(p > 0, p * v, 0.0), axis=-1)


def softmax_moments(u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For shifted logits u (max 0): Z = Σ exp(u) and Σ exp(u)·u, with 0 · (−inf) = 0.

  The entropy of softmax(u) is log Z − (Σ e·u)/Z without forming p = e/Z. Both sums read the
  same exp(u); on XLA:CPU two reductions of one materialised `u` cost more than the two
  isolated sweeps of `sum_exp` and `exp_moment`, which the loss layer uses on raw logits.
  """
  e = jnp.exp(u)
  return jnp.sum(e, axis=-1), jnp.sum(e * jnp.maximum(u, exp_floor(u.dtype)), axis=-1)


# --------------------------------------------------------------------------------------------
# One reduction per sweep, nothing of shape [..., C] written to memory.
#
# What the compiled HLO of the loss layer costs on XLA:CPU
# (benchmarks/results/losses-hlo-passes-cpu-2core.md): a row reduction runs fast only when
# its fusion holds exactly ONE reduction whose elementwise producer reads the raw logits and
# per-row values. Any `[..., C]` value that two fusions share (a shifted copy, an exp, even a
# broadcast of the row max or of 1/τ) is written to memory first, and a select (`jnp.where`)
# on `[..., C]` cannot be fused into a reduction at all. Each such buffer is a write and a
# read per sweep and, past 32 MiB of temporaries, fresh pages on every call. So every
# reduction below reads its inputs through its own optimisation barrier (`isolated`), which
# keeps XLA from merging its producer with another reduction's, and writes 0·(±inf) = 0
# without a select. Identical reductions (same tag, same inputs) are still merged: KD at
# τ = 4 and ER-KD's entropy at τ′ = 4 share one Σ exp. Each result then passes a `fenced`
# select, which keeps XLA from merging reductions again through the expression that combines
# their results.


def isolated(tag: str, *arrays: Any) -> tuple:
  """`arrays` unchanged, behind an optimisation barrier tagged `tag` (see above)."""
  salt = np.int32(zlib.crc32(tag.encode()) & 0x7FFFFFFF)
  return jax.lax.optimization_barrier((arrays, salt))[0]


def fenced(x: jax.Array) -> jax.Array:
  """`x` unchanged (NaN stays NaN), as a select that ends the reduction fusion producing it.

  XLA:CPU otherwise merges reductions whose results meet in one elementwise expression (log Z
  − M/Z, or the four sums of EA-KD's weights) into one fusion, which runs about 1.5-2× slower
  than the same reductions apart. A select on the `[...]` result is not fused into it.
  """
  return jnp.where(x == x, x, jnp.nan)


def exp_floor(dtype: Any) -> float:
  """A shifted logit below which exp underflows to exactly 0 in `dtype` (−104.3 in float32).

  Clamping u ≥ floor leaves exp(u) bit-identical and makes exp(u) · u = 0 where exp(u) = 0
  (u = −inf included), the convention 0 · log 0 = 0 without a select.
  """
  return float(np.log(np.finfo(dtype).smallest_subnormal)) - 1.0


def raw_row_max(z: Array) -> jax.Array:
  """`row_max` of logits in their own dtype (exact: max commutes with the upcast), float32+."""
  z = jnp.asarray(z)
  return as_float32(row_max(z))


def _math_dtype(*arrays: Array) -> Any:
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _shifted(z: Array, m: jax.Array, temperature: Any) -> jax.Array:
  return (as_float32(z) - m) / temperature


def sum_exp(z: Array, m: jax.Array, temperature: Any = 1.0,
            ceiling: float | None = None) -> jax.Array:
  """Z = Σ_c exp((z_c − m)/τ) per row, one sweep; `m` the `[..., 1]` row max (`raw_row_max`).

  With `ceiling`, the exponents are clamped at it: for a shift `m` other than the row max
  whose exponents are known to stay below the ceiling (a bound that rounding could break),
  Z stays finite without changing a value.
  """
  if ceiling is None:
    z, m, temperature = isolated("sum_exp", z, m, temperature)
    return fenced(jnp.sum(jnp.exp(_shifted(z, m, temperature)), axis=-1))
  z, m, temperature, top = isolated("sum_exp_capped", z, m, temperature,
                                    jnp.asarray(ceiling, _math_dtype(z)))
  return fenced(jnp.sum(jnp.exp(jnp.minimum(_shifted(z, m, temperature), top)), axis=-1))


def exp_moment(z: Array, m: jax.Array, temperature: Any = 1.0) -> jax.Array:
  """Σ_c exp(u_c) · u_c per row, u = (z − m)/τ, with 0 · (−inf) = 0; one sweep.

  With Z = `sum_exp`, the entropy of softmax(z/τ) is log Z − (this)/Z.
  """
  dtype = _math_dtype(z)
  # The floor goes through the barrier too: a constant's broadcast shared by two fusions
  # would be written to memory like any other shared [..., C] value.
  z, m, temperature, floor = isolated("exp_moment", z, m, temperature,
                                      jnp.asarray(exp_floor(dtype), dtype))
  u = _shifted(z, m, temperature)
  return fenced(jnp.sum(jnp.exp(u) * jnp.maximum(u, floor), axis=-1))


def kl_cross(zs: Array, zt: Array, ms: jax.Array, mt: jax.Array,
             temperature: Any = 1.0) -> jax.Array:
  """Σ_c exp(u^t_c) · (u^t_c − u^s_c) per row (u = (z − m)/τ), one sweep over both logits.

  0 · (±inf) = 0 where exp(u^t) = 0, and +inf where the teacher has mass on a class the
  student puts at −inf, as the select `where(p^t > 0, ...)` would give, in arithmetic: the
  student side is clamped below at ℓ = −max_float where e = 0 (a finite difference times 0 is
  0) and at ℓ·(1 + 1) = −inf where e > 0 (u^s = −inf stays −inf, its term +inf), by
  max(u^s, ℓ · (1 + ⌈e⌉)), ⌈e⌉ ∈ {0, 1} since 0 ≤ e ≤ 1. Each elementwise op costs a pass in
  XLA:CPU's reduction fusions, so the sweep holds as few as this takes (docs/NOTES.md).
  """
  dtype = _math_dtype(zs, zt)
  zs, zt, ms, mt, temperature, floor, lowest, one = isolated(
      "kl_cross", zs, zt, ms, mt, temperature, jnp.asarray(exp_floor(dtype), dtype),
      jnp.asarray(-np.finfo(dtype).max, dtype), jnp.ones((), dtype))
  us, ut = _shifted(zs, ms, temperature), _shifted(zt, mt, temperature)
  e = jnp.exp(ut)
  us_c = jnp.maximum(us, lowest * (one + jnp.ceil(e)))
  return fenced(jnp.sum(e * (jnp.maximum(ut, floor) - us_c), axis=-1))


def row_sum(z: Array, m: jax.Array, power: int = 1) -> jax.Array:
  """Σ_c (z_c − m)^power per row (power 1 or 2), one sweep."""
  z, m = isolated(f"row_sum{power}", z, m)
  d = as_float32(z) - m
  return fenced(jnp.sum(d if power == 1 else d * d, axis=-1))
