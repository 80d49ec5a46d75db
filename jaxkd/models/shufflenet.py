"""ShuffleNets for CIFAR (RepDistiller/mdistiller `ShuffleV1`, `ShuffleV2`).

Both use a 1x1 stem without max-pool (32x32 inputs) and PyTorch's default init.
Definitions: mdistiller's `mdistiller/models/cifar/ShuffleNetv1.py` and `ShuffleNetv2.py`;
names: docs/PYTORCH.md#parameter-names.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.layers import BatchNorm, Conv, Dtype, Linear


class ShuffleV1Unit(nn.Module):
  """ShuffleNetV1 unit. [B,H,W,in] -> [B,H/s,W/s,in + out] (stride 2) or [B,H,W,out].

  1x1 group conv (1 group when in = 24, the stem width) BN ReLU, channel shuffle, depthwise
  3x3(stride) BN ReLU, 1x1 group conv BN. Stride 2: concatenated with AvgPool3x3/2 (padding
  counted, as PyTorch's default) of the input; stride 1: added to it. ReLU after either.
  """
  out_channels: int
  stride: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_channels = x.shape[-1]
    mid = self.out_channels // 4
    g = 1 if in_channels == 24 else self.groups
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    y = Conv(mid, 1, 1, groups=g, dtype=self.dtype, name="conv1")(x)
    y = layers.channel_shuffle(nn.relu(bn("bn1")(y, train)), g)
    y = Conv(mid, 3, self.stride, groups=mid, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(bn("bn2")(y, train))
    y = Conv(self.out_channels, 1, 1, groups=self.groups, dtype=self.dtype, name="conv3")(y)
    y = bn("bn3")(y, train)
    if self.stride == 2:
      return nn.relu(jnp.concatenate([y, layers.avg_pool(x, 3, 2, padding=1)], axis=-1))
    return nn.relu(y + x)


class ShuffleNetV1(nn.Module):
  """ShuffleNetV1 (groups 3). Call: `(images [B,H,W,3], train=False, return_features=False)`
  -> logits [B, num_classes] float32, or (logits, pooled features [B, 960]).

  A stage's first unit has stride 2 and outputs (stage width - input width) channels that are
  concatenated with the pooled input, so every stage ends at its stage width.
  """
  stage_widths: Sequence[int] = (240, 480, 960)
  stage_sizes: Sequence[int] = (4, 8, 4)
  groups: int = 3
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.stage_widths[-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, "ShuffleNetV1")
    x = Conv(24, 1, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    for stage, (width, size) in enumerate(zip(self.stage_widths, self.stage_sizes), start=1):
      for i in range(size):
        out = width - x.shape[-1] if i == 0 else width
        x = ShuffleV1Unit(out, 2 if i == 0 else 1, self.groups, dtype=self.dtype,
                          name=f"layer{stage}_{i}")(x, train)
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, name="linear")(features)
    return layers.outputs(logits, features, return_features)


class ShuffleV2Down(nn.Module):
  """ShuffleNetV2 down-sampling block. [B,H,W,in] -> [B,H/2,W/2,out].

  left: dw3x3/2 BN, 1x1 (in -> out/2) BN ReLU; right: 1x1 (in -> out/2) BN ReLU, dw3x3/2 BN,
  1x1 BN ReLU; concatenate [left, right]; shuffle with 2 groups.
  """
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c, mid = x.shape[-1], self.out_channels // 2
    conv = lambda f, k, s, g, name: Conv(f, k, s, groups=g, dtype=self.dtype, name=name)
    bn = lambda name, y: BatchNorm(dtype=self.dtype, name=name)(y, train)
    left = bn("bn1", conv(c, 3, 2, c, "conv1")(x))
    left = nn.relu(bn("bn2", conv(mid, 1, 1, 1, "conv2")(left)))
    right = nn.relu(bn("bn3", conv(mid, 1, 1, 1, "conv3")(x)))
    right = bn("bn4", conv(mid, 3, 2, mid, "conv4")(right))
    right = nn.relu(bn("bn5", conv(mid, 1, 1, 1, "conv5")(right)))
    return layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2Basic(nn.Module):
  """ShuffleNetV2 basic block. [B,H,W,C] -> [B,H,W,C].

  Split channels in half; the second half goes 1x1 BN ReLU, dw3x3 BN, 1x1 BN ReLU; concatenate
  [first half, result]; shuffle with 2 groups.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    half = x.shape[-1] // 2
    keep, y = x[..., :half], x[..., half:]
    conv = lambda k, g, name: Conv(half, k, 1, groups=g, dtype=self.dtype, name=name)
    bn = lambda name, y: BatchNorm(dtype=self.dtype, name=name)(y, train)
    y = nn.relu(bn("bn1", conv(1, 1, "conv1")(y)))
    y = bn("bn2", conv(3, half, "conv2")(y))
    y = nn.relu(bn("bn3", conv(1, 1, "conv3")(y)))
    return layers.channel_shuffle(jnp.concatenate([keep, y], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 (net size 1). Call: `(images [B,H,W,3], train=False,
  return_features=False)` -> logits [B, num_classes] float32, or (logits, features [B, 1024]).
  """
  stage_widths: Sequence[int] = (116, 232, 464)
  stage_sizes: Sequence[int] = (3, 7, 3)
  head_width: int = 1024
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.head_width

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, "ShuffleNetV2")
    x = Conv(24, 1, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    for stage, (width, size) in enumerate(zip(self.stage_widths, self.stage_sizes), start=1):
      x = ShuffleV2Down(width, dtype=self.dtype, name=f"layer{stage}_0")(x, train)
      for i in range(1, size + 1):
        x = ShuffleV2Basic(dtype=self.dtype, name=f"layer{stage}_{i}")(x, train)
    x = Conv(self.head_width, 1, 1, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(x, train))
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, name="linear")(features)
    return layers.outputs(logits, features, return_features)
