"""MobileNets: the CIFAR MobileNetV2 (`mobile_half`) and the ImageNet MobileNetV1.

Definitions: mdistiller's `mdistiller/models/cifar/mobilenetv2.py` and
`mdistiller/models/imagenet/mobilenetv1.py`; names: docs/PYTORCH.md#parameter-names.

* MobileNetV2 (RepDistiller/mdistiller): width 0.5, expansion 6, ReLU (not ReLU6), stem
  stride 2, the 1x1 expansion present even for t = 1, a 1x1 head conv to 1280 channels. Init:
  convs N(0, sqrt(2 / (k * k * out))), BN 1 / 0, classifier N(0, 0.01) with bias 0.
* MobileNetV1 (mdistiller ImageNet): conv3x3/2 to 32, then 13 depthwise-separable units.
  PyTorch's default init.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.layers import BatchNorm, Conv, Dtype, Linear

# (expansion t, output channels at width 1.0, repeats n, first stride s).
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """1x1 expand BN ReLU, dw3x3(stride) BN ReLU, 1x1 project BN; residual iff s = 1, in = out.

  PyTorch names: one `conv` Sequential, parameter entries 0, 1, 3, 4, 6, 7.
  """
  out_channels: int
  stride: int
  expansion: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    conv = lambda f, k, s, g, name: Conv(f, k, s, groups=g, dtype=self.dtype,
                                         kernel_init=layers.kaiming_normal_fan_out, name=name)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    y = nn.relu(bn("conv_1")(conv(hidden, 1, 1, 1, "conv_0")(x), train))
    y = nn.relu(bn("conv_4")(conv(hidden, 3, self.stride, hidden, "conv_3")(y), train))
    y = bn("conv_7")(conv(self.out_channels, 1, 1, 1, "conv_6")(y), train)
    if self.stride == 1 and in_channels == self.out_channels:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2. Call: `(images [B,H,W,3], train=False, return_features=False)` ->
  logits [B, num_classes] float32, or (logits, pooled features [B, 1280]).

  Attributes:
    width_mult: channel multiplier (0.5 for `mobile_half`).
    expansion: t of every block but the first (t = 1 there).
    num_classes: classes.
    dtype: compute dtype.
  """
  width_mult: float = 0.5
  expansion: int = 6
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self._last_channels()

  def _last_channels(self) -> int:
    # The reference widens the head only for width_mult > 1 (to a multiple of 8).
    if self.width_mult > 1.0:
      return int(-(-1280 * self.width_mult // 8) * 8)
    return 1280

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, "MobileNetV2")
    kernel_init = layers.kaiming_normal_fan_out
    x = Conv(int(32 * self.width_mult), 3, 2, dtype=self.dtype, kernel_init=kernel_init,
             name="conv1_0")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="conv1_1")(x, train))
    for stage, (t, c, n, s) in enumerate(MOBILENETV2_SETTINGS):
      t = t if t == 1 else self.expansion
      for i in range(n):
        x = InvertedResidual(int(c * self.width_mult), s if i == 0 else 1, t, dtype=self.dtype,
                             name=f"blocks_{stage}_{i}")(x, train)
    x = Conv(self._last_channels(), 1, 1, dtype=self.dtype, kernel_init=kernel_init,
             name="conv2_0")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="conv2_1")(x, train))
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, kernel_init=layers.normal_001,
                    bias_init=layers.zeros, name="classifier_0")(features)
    return layers.outputs(logits, features, return_features)


# (output channels, stride) of the 13 depthwise-separable units.
MOBILENETV1_UNITS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                     (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
  """ImageNet MobileNetV1. Call: `(images [B,H,W,3], train=False, return_features=False)` ->
  logits [B, num_classes] float32, or (logits, pooled features [B, 1024]).

  PyTorch names: `model` is one Sequential; unit u's depthwise conv/BN are `model.u.0/1` and
  its pointwise conv/BN `model.u.3/4` (the stem is `model.0.0/1`).
  """
  num_classes: int = 1000
  units: Sequence[Sequence[int]] = MOBILENETV1_UNITS
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.units[-1][0]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, "MobileNetV1")
    conv = lambda f, k, s, g, name: Conv(f, k, s, groups=g, dtype=self.dtype, name=name)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    x = nn.relu(bn("model_0_1")(conv(32, 3, 2, 1, "model_0_0")(x), train))
    for u, (out, stride) in enumerate(self.units, start=1):
      c = x.shape[-1]
      x = nn.relu(bn(f"model_{u}_1")(conv(c, 3, stride, c, f"model_{u}_0")(x), train))
      x = nn.relu(bn(f"model_{u}_4")(conv(out, 1, 1, 1, f"model_{u}_3")(x), train))
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, name="fc")(features)
    return layers.outputs(logits, features, return_features)
