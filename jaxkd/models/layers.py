"""Building blocks shared by the model zoo: PyTorch-faithful BatchNorm, convs, initialisers.

Every model in `jaxkd.models` is written so that a PyTorch reference checkpoint imports into
it exactly (`jaxkd.models.torch_import`). That fixes three things here:

* BatchNorm follows `torch.nn.BatchNorm2d`: the training batch is normalised with the biased
  variance, but `running_var` is updated with the unbiased one (n / (n - 1) times larger);
  momentum 0.1 in PyTorch's convention (running = 0.9 running + 0.1 batch); eps 1e-5. Flax's
  own `nn.BatchNorm` uses the biased variance for both, so imported teachers would drift.
* Convolutions pad explicitly and symmetrically, as PyTorch does. Flax's "SAME" pads a stride-2
  conv on an even input as (0, 1), PyTorch as (1, 1): the outputs would differ.
* Initialisers are the ones the reference models use (see the `*_init` functions).

Parameters are always float32; `dtype` is the compute dtype (bfloat16 on accelerators).
BatchNorm statistics, pooled features and logits are float32 whatever `dtype` is.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import cpu_conv

Dtype = Any
Initializer = Callable[..., jax.Array]

# ---------------------------------------------------------------------------------------------
# Initialisers (flax kernel layouts: conv [kh, kw, in/groups, out], dense [in, out]).
# ---------------------------------------------------------------------------------------------

# torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out) with
# fan_out = kh * kw * out. This is also WRN/VGG/MobileNetV2's N(0, sqrt(2 / (k * k * out))), so
# one initialiser serves both schemes. "normal" (not "truncated_normal") matches torch.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default for Conv2d/Linear weights: kaiming_uniform_(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kh * kw * in / groups (or in for Linear).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# VGG's and MobileNetV2's classifier: N(0, 0.01).
normal_001 = nn.initializers.normal(stddev=0.01)

zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The bias initialiser cannot see the kernel's fan-in, so the caller passes it.
  """
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------


class BatchNorm(nn.Module):
  """BatchNorm over the last (channel) axis with PyTorch's semantics.

  Train mode: y = (x - mean_B) / sqrt(var_B + eps) * scale + bias with the biased batch
  variance var_B, and the running statistics updated as
  running_mean <- (1 - momentum) * running_mean + momentum * mean_B and
  running_var <- (1 - momentum) * running_var + momentum * var_B * n / (n - 1),
  where n = B * H * W is the number of values per channel (torch.nn.BatchNorm2d).
  Eval mode normalises with the running statistics.

  Under `jax.jit` with the batch sharded over devices, the means over axis 0 are global-batch
  means (XLA inserts the all-reduce), so this is SyncBatchNorm at no extra code.

  Variables: params `scale`, `bias` [C]; batch_stats `mean`, `var` [C] (all float32).

  Attributes:
    momentum: PyTorch-convention momentum (weight of the new batch statistic).
    epsilon: added to the variance.
    dtype: dtype of the output; statistics are computed in float32.
    scale_init: initialiser of `scale` (PyTorch: ones).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Initializer = ones

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [..., C] -> [..., C] in `self.dtype`."""
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=axes)
      # Two-pass variance: E[(x - mean)^2] is robust where E[x^2] - mean^2 cancels badly.
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      n = math.prod(x.shape[:-1])
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        # PyTorch stores the unbiased variance (and would raise for n == 1; we keep it finite).
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value

    # Fold into one multiply-add per element; XLA fuses it with the casts around it.
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return (xf * mul + add).astype(self.dtype)


class Conv(nn.Module):
  """2-D convolution with PyTorch's symmetric padding; NHWC in and out.

  Variables: params `kernel` [k, k, in/groups, features] and, with `use_bias`, `bias`
  [features], both float32 (PyTorch's `weight` [out, in/groups, k, k] transposed).

  Attributes:
    features: output channels.
    kernel_size: k (square kernels only: all reference models use them).
    stride: s.
    padding: p pixels on every side (PyTorch `padding=p`); None means k // 2.
    groups: PyTorch `groups` (XLA feature_group_count; both split the input and output
      channels into contiguous groups); groups == in_channels is a depthwise conv.
    use_bias: add a bias (VGG's convs have one; the other models' do not).
    dtype: compute dtype; the float32 kernel is cast to it.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser; None means PyTorch's default U(+-1/sqrt(fan_in)).
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int | None = None
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = torch_default_kernel
  bias_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in] -> [B, H', W', features] in `self.dtype`."""
    k, g = self.kernel_size, self.groups
    p = k // 2 if self.padding is None else self.padding
    in_features = x.shape[-1]
    if in_features % g or self.features % g:
      raise ValueError(f"groups={g} must divide the input ({in_features}) and output "
                       f"({self.features}) channels")
    kernel = self.param("kernel", self.kernel_init, (k, k, in_features // g, self.features),
                        jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, p, g)
    if self.use_bias:
      bias_init = self.bias_init or torch_default_bias(k * k * in_features // g)
      bias = self.param("bias", bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1,
           lowering: str = "auto") -> jax.Array:
  """PyTorch's Conv2d(groups=groups, padding=padding, stride=stride) in NHWC / HWIO.

  x: [B, H, W, C_in]; kernel: [k, k, C_in / groups, C_out] -> [B, H', W', C_out] with
  H' = (H + 2 * padding - k) // stride + 1. Group j maps input channels
  [j * C_in/g, (j+1) * C_in/g) to output channels [j * C_out/g, (j+1) * C_out/g).

  lowering: how a grouped conv (groups > 1) is computed; ungrouped ones are always one XLA
  convolution.
    "xla": one convolution with feature_group_count (cuDNN's grouped kernels on GPU).
    "split": `jaxkd.models.cpu_conv.split_grouped_conv`: a depthwise conv as k * k shifted
      multiply-adds, other grouped convs as `groups` ungrouped convolutions. XLA:CPU runs
      grouped convolutions through a slow generic path
      (docs/ENVIRONMENT.md#grouped-convolutions-on-cpu).
    "auto": "split" on CPU, "xla" elsewhere.
  Both lowerings compute the same sums, values and gradients, up to float rounding order
  (accumulated in float32, or float64 for float64 inputs). The split depthwise conv has a
  custom reverse-mode gradient, so it does not support forward-mode autodiff (jax.jvp,
  jacfwd); use lowering="xla" for that.
  """
  if lowering == "auto":
    lowering = "split" if jax.default_backend() == "cpu" else "xla"
  if lowering not in ("xla", "split"):
    raise ValueError(f"lowering must be 'auto', 'xla' or 'split', got {lowering!r}")
  group_in = kernel.shape[2]
  if x.shape[-1] != group_in * groups or kernel.shape[-1] % groups:
    raise ValueError(
        f"conv2d: input channels {x.shape[-1]} must be groups ({groups}) x the kernel's input "
        f"channels per group ({group_in}), and groups must divide the kernel's output "
        f"channels ({kernel.shape[-1]}): kernel shape is [k, k, C_in / groups, C_out]")
  if groups > 1 and lowering == "split":
    return cpu_conv.split_grouped_conv(x, kernel, stride, padding, groups)
  pad = ((padding, padding), (padding, padding))
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=pad,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


class Linear(nn.Module):
  """Fully connected layer: params `kernel` [in, out] (PyTorch's `weight` transposed), `bias`.

  Attributes:
    features: output features.
    dtype: compute dtype.
    kernel_init: kernel initialiser (PyTorch's default unless the model says otherwise).
    bias_init: None means PyTorch's default U(+-1/sqrt(in)).
  """
  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = torch_default_kernel
  bias_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, in] -> [B, features] in `self.dtype`."""
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init or torch_default_bias(in_features),
                      (self.features,), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Stateless helpers.
# ---------------------------------------------------------------------------------------------


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch MaxPool2d(window, stride, padding) (floor mode; padding counts as -inf). NHWC."""
  if window == stride and padding == 0:
    # Non-overlapping windows as a reshape + max: the same values, and its gradient is a
    # cheap mask where reduce_window's (select_and_scatter) is 4x slower on XLA's CPU.
    b, h, w, c = x.shape
    h, w = h // window, w // window
    x = x[:, :h * window, :w * window]
    return jnp.max(x.reshape(b, h, window, w, window, c), axis=(2, 4))
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def avg_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch AvgPool2d(window, stride, padding) with count_include_pad=True (its default). NHWC."""
  return nn.avg_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)), count_include_pad=True)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C] float32.

  Replaces the reference models' fixed AvgPool(8)/(4)/(7): equal at the native input size, and
  other sizes still work. The mean is taken in float32 so bf16 features are not summed in bf16.
  """
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle in NHWC: channel i * (C/g) + j moves to j * g + i."""
  if groups == 1:
    return x
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def outputs(logits: jax.Array, features: jax.Array, return_features: bool):
  """The models' common return: float32 logits [B, C], or (logits, features [B, D])."""
  logits = logits.astype(jnp.float32)
  if return_features:
    return logits, features.astype(jnp.float32)
  return logits


def check_images(x: jax.Array, channels: int, name: str) -> None:
  """Trace-time check that images are NHWC with the expected channel count."""
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"{name} expects NHWC images with {channels} channels, got shape "
                     f"{tuple(x.shape)}")
