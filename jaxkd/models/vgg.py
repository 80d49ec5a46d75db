"""VGG with BatchNorm for CIFAR (RepDistiller/mdistiller `vgg8_bn` ... `vgg19_bn`).

Five blocks of (conv3x3 with bias, BN, ReLU); max-pool 2x2 after blocks 0, 1, 2 (and after
block 3 only for 64-pixel inputs, as the reference does); global average pool; one linear
layer. Definition: mdistiller's `mdistiller/models/cifar/vgg.py`. Init: convs
N(0, sqrt(2 / (9 * out))) with bias 0, BN 1 / 0, classifier N(0, 0.01) with bias 0.

PyTorch names: block b is an `nn.Sequential` whose j-th conv is entry 3j and its BN 3j + 1
(ReLUs in between hold no parameters), hence `block{b}_{3j}` / `block{b}_{3j+1}` here.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.layers import BatchNorm, Conv, Dtype, Linear

CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
  """VGG-BN. Call: `(images [B,H,W,3], train=False, return_features=False)` -> logits
  [B, num_classes] float32, or (logits, pooled features [B, 512]).

  Attributes:
    config: output channels of each conv, per block (five blocks).
    num_classes: classes.
    dtype: compute dtype.
  """
  config: Sequence[Sequence[int]]
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.config[-1][-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, "VGG")
    height = x.shape[1]
    for b, widths in enumerate(self.config):
      for j, width in enumerate(widths):
        x = Conv(width, 3, 1, use_bias=True, dtype=self.dtype,
                 kernel_init=layers.kaiming_normal_fan_out, bias_init=layers.zeros,
                 name=f"block{b}_{3 * j}")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name=f"block{b}_{3 * j + 1}")(x, train))
      # The reference pools after block 3 only when the input is 64 pixels high.
      if b < 3 or (b == 3 and height == 64):
        x = layers.max_pool(x, 2, 2)
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, kernel_init=layers.normal_001,
                    bias_init=layers.zeros, name="classifier")(features)
    return layers.outputs(logits, features, return_features)


def vgg(depth: int, num_classes: int, dtype: Dtype = jnp.float32) -> VGG:
  """vgg8/11/13/16/19 with BatchNorm."""
  return VGG(config=CONFIGS[depth], num_classes=num_classes, dtype=dtype)
