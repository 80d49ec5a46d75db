"""Wide ResNets for CIFAR (mdistiller `wrn_16_1`, `wrn_16_2`, `wrn_40_1`, `wrn_40_2`).

Pre-activation blocks; dropout 0 (the reference default), so there is no dropout layer.
Definition: mdistiller's `mdistiller/models/cifar/wrn.py`. Init: convs
N(0, sqrt(2 / (k * k * out))), BN 1 / 0, classifier weight PyTorch's default and bias 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.layers import BatchNorm, Conv, Dtype, Linear


class WideBasicBlock(nn.Module):
  """BN ReLU conv3x3(stride) BN ReLU conv3x3, plus shortcut. [B,H,W,in] -> [B,H/s,W/s,out].

  When in != out the shortcut is a 1x1 conv (`convShortcut`) applied to the *pre-activated*
  input (BN + ReLU output), as in the reference; otherwise the raw input is added.
  """
  out_channels: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda k, s, name: Conv(self.out_channels, k, s, dtype=self.dtype,
                                   kernel_init=layers.kaiming_normal_fan_out, name=name)
    equal_in_out = x.shape[-1] == self.out_channels
    pre = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    y = conv(3, self.stride, "conv1")(pre)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
    y = conv(3, 1, "conv2")(y)
    shortcut = x if equal_in_out else conv(1, self.stride, "convShortcut")(pre)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-depth-k: n = (depth - 4) / 6 blocks per stage, widths 16k, 32k, 64k.

  Call: `(images [B,H,W,3], train=False, return_features=False)` -> logits [B, num_classes]
  float32, or (logits, pooled features [B, 64k]).
  """
  depth: int
  widen_factor: int
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return 64 * self.widen_factor

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, "WideResNet")
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}")
    n = (self.depth - 4) // 6
    k = self.widen_factor
    # The stem has no BN/ReLU after it: the first block pre-activates.
    x = Conv(16, 3, 1, dtype=self.dtype, kernel_init=layers.kaiming_normal_fan_out,
             name="conv1")(x)
    for stage, (width, stride) in enumerate(zip((16 * k, 32 * k, 64 * k), (1, 2, 2)), start=1):
      for i in range(n):
        x = WideBasicBlock(width, stride if i == 0 else 1, dtype=self.dtype,
                           name=f"block{stage}_layer_{i}")(x, train)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, bias_init=layers.zeros,
                    name="fc")(features)
    return layers.outputs(logits, features, return_features)
