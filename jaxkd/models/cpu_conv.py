"""Grouped convolutions without XLA's grouped convolution: the "split" lowering for CPUs.

XLA:CPU computes a convolution with `feature_group_count > 1` through a slow generic path
(MobileNetV2 trains at about a tenth of PyTorch's speed with it; see
docs/ENVIRONMENT.md#grouped-convolutions-on-cpu). `split_grouped_conv` computes the same sums
from operations XLA:CPU is fast at:

* a depthwise conv (one input channel per group) as k * k shifted multiply-adds over the
  channels, which XLA fuses into one elementwise loop, with a custom reverse-mode gradient
  whose kernel part walks the batch in cache-sized chunks (`depthwise_kernel_grad`);
* any other grouped conv as `groups` ungrouped convolutions, concatenated (autodiff of that
  is again ungrouped convolutions).

`jaxkd.models.layers.conv2d` validates the shapes and calls this module; nothing else should.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def split_grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                       groups: int) -> jax.Array:
  """PyTorch's Conv2d(groups=groups > 1) in NHWC / HWIO, without a grouped XLA convolution.

  x: [B, H, W, C_in]; kernel: [k, k, C_in / groups, C_out] -> [B, H', W', C_out], with the
  shapes already checked by `layers.conv2d`. Accumulates in float32 (float64 for float64
  inputs). The depthwise case has a custom VJP, so it supports reverse-mode autodiff only.
  """
  if kernel.shape[2] == 1:
    return _depthwise_conv(x, kernel, stride, padding)
  pad = ((padding, padding), (padding, padding))
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(stride, stride),
                           padding=pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xs = jnp.split(x, groups, axis=-1)
  ks = jnp.split(kernel, groups, axis=-1)
  return jnp.concatenate([conv(xi, ki) for xi, ki in zip(xs, ks)], axis=-1)


def _depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """conv2d with one input channel per group: out[b, i, j, c] =
  sum_{u, v} x_pad[b, s*i + u, s*j + v, c // m] * kernel[u, v, 0, c], m = C_out / C_in."""
  c_in, c_out = x.shape[-1], kernel.shape[-1]
  if c_out != c_in:  # a channel multiplier m: output channel c reads input channel c // m
    x = jnp.repeat(x, c_out // c_in, axis=-1)
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return _depthwise_taps(x, kernel, stride)


def _windows(x_pad: jax.Array, k: int, stride: int):
  """Yields (u, v, x_pad[:, u::stride, v::stride][:, :H', :W']) for the k * k kernel taps."""
  b, h, w, c = x_pad.shape
  h_out, w_out = (h - k) // stride + 1, (w - k) // stride + 1
  for u in range(k):
    for v in range(k):
      yield u, v, jax.lax.slice(
          x_pad, (0, u, v, 0),
          (b, u + stride * (h_out - 1) + 1, v + stride * (w_out - 1) + 1, c),
          (1, stride, stride, 1))


def _sum_of_taps(x_pad: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """x_pad: [B, H, W, C] (already padded), kernel: [k, k, 1, C] -> [B, H', W', C]:
  sum over the taps of window(u, v) * kernel[u, v, 0], which XLA fuses into one loop."""
  # Accumulated in float32 (as a bf16 convolution accumulates; XLA fuses the casts).
  acc = _accumulation_dtype(x_pad.dtype)
  kernel = kernel.astype(acc)
  out = sum(window.astype(acc) * kernel[u, v, 0]
            for u, v, window in _windows(x_pad, kernel.shape[0], stride))
  return out.astype(x_pad.dtype)


def _accumulation_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


# _sum_of_taps with a cache-friendly kernel gradient.
_depthwise_taps = jax.custom_vjp(_sum_of_taps, nondiff_argnums=(2,))


def _depthwise_taps_fwd(x_pad, kernel, stride):
  return _depthwise_taps(x_pad, kernel, stride), (x_pad, kernel)


def _depthwise_taps_bwd(stride, residuals, d_out):
  x_pad, kernel = residuals
  # d x_pad is elementwise again (autodiff of the taps), summed over the taps in float32 and
  # rounded once; d kernel is not elementwise: see depthwise_kernel_grad.
  acc = _accumulation_dtype(x_pad.dtype)
  _, vjp_x = jax.vjp(lambda x: _sum_of_taps(x, kernel, stride), x_pad.astype(acc))
  (d_x,) = vjp_x(d_out.astype(acc))
  d_kernel = depthwise_kernel_grad(x_pad, d_out, kernel.shape[0], stride)
  return d_x.astype(x_pad.dtype), d_kernel.astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def depthwise_kernel_grad(x_pad: jax.Array, d_out: jax.Array, k: int, stride: int,
                          chunk_bytes: int = 2 ** 17, shards: int | None = None) -> jax.Array:
  """d kernel[u, v, 0, c] = sum_{b, i, j} x_pad[b, s*i + u, s*j + v, c] * d_out[b, i, j, c].

  x_pad: [B, H, W, C], d_out: [B, H', W', C] -> [k, k, 1, C] in float32 (float64 for float64
  inputs). As k * k separate reductions over the whole batch, each rereads both arrays from
  memory (3.5x slower on a 2-core CPU at MobileNetV2's sizes); so the batch is taken in chunks
  that give each of `shards` devices at most `chunk_bytes` of x_pad (or one example), which
  stay in a core's cache with their d_out for all the taps. The default, 128 KiB, is sized
  for a 512 KiB per-core L2 cache (MobileNetV2 trains 1.3x faster than unchunked on a 2-core
  CPU with one).

  Chunk j holds examples j, j + n, j + 2n, ... (n chunks) and its size is a multiple of
  `shards` (default: gcd(B, jax.device_count()), which any mesh of a divisor of the device
  count that shards B evenly divides), so that a batch sharded in contiguous blocks over the
  devices stays sharded in every chunk, without gathering; each device sums its part of the
  chunks, and the devices' partial sums are added once, after the last chunk. The chunk count
  is the smallest that B's divisors allow: a prime B larger than a chunk is taken one example
  at a time (correct, slower).
  """
  b = x_pad.shape[0]
  if b == 0:
    raise ValueError("depthwise_kernel_grad: the batch is empty")
  shards = math.gcd(b, jax.device_count()) if shards is None else shards
  if b % shards:  # not evenly sharded over the devices anyway: chunk for one
    shards = 1
  example_bytes = x_pad[0].size * x_pad.dtype.itemsize
  per_shard = max(1, chunk_bytes // example_bytes)  # examples a device takes at a time
  size = max(d for d in range(shards, b + 1, shards) if b % d == 0 and d <= per_shard * shards)
  n = b // size
  acc = _accumulation_dtype(x_pad.dtype)

  def chunk(a, j):  # examples j, j + n, ... of a: [size, ...]
    return jax.lax.dynamic_index_in_dim(a.reshape(size, n, *a.shape[1:]), j, 1, False)

  def by_shard(a):  # [size, ...] -> [shards, size / shards, ...]
    return a.reshape(shards, size // shards, *a.shape[1:])

  def chunk_grad(j):  # [k * k, shards, C]: each shard's sum over its examples of chunk j
    ds = by_shard(chunk(d_out, j)).astype(acc)
    return jnp.stack([jnp.sum(by_shard(w).astype(acc) * ds, axis=(1, 2, 3))
                      for _, _, w in _windows(chunk(x_pad, j), k, stride)])

  grad = jax.lax.fori_loop(1, n, lambda j, total: total + chunk_grad(j), chunk_grad(0))
  return grad.sum(axis=1).reshape(k, k, 1, -1)
