"""Small CNNs for 28x28 grey images (Fashion-MNIST), for quick runs and tests on a CPU.

`quick_teacher` and `quick_student` have no published peer; their layout is ours. They use
the same layers (PyTorch BatchNorm, Kaiming fan_out convs) and the same naming convention as
the zoo, so the PyTorch import path covers them too: conv i is `conv{i}`, its BN `bn{i}`, the
classifier `fc`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.layers import BatchNorm, Conv, Dtype, Linear

# Convs per block (3x3, stride 1, each + BN + ReLU); a 2x2 max-pool follows every block.
# Measured on the 2-core CI CPU, Fashion-MNIST, one epoch at batch 128, SGD nesterov 0.9:
#   teacher (94,186 params): 51 s/epoch, 88.1% test (lr 0.05 cosine), 87.3% (lr 0.1 constant);
#   student (5,178 params): 22 s/epoch, 77.5% test (lr 0.05 cosine), a gap KD can close.
# Two convs per block, ((32, 32), (64, 64)), take 86 s/epoch for 86.2%: the 32->32 conv at
# 28x28 costs most; a third block at 7x7 is cheaper and more accurate.
QUICK_TEACHER = ((32,), (64,), (128,))
QUICK_STUDENT = ((16,), (32,))


class QuickCNN(nn.Module):
  """conv3x3 BN ReLU blocks with max-pools, global average pool, linear classifier.

  Call: `(images [B,H,W,C], train=False, return_features=False)` -> logits [B, num_classes]
  float32, or (logits, pooled features [B, blocks[-1][-1]]).

  Attributes:
    blocks: output channels of the convs of each block.
    num_classes: classes.
    in_channels: image channels (1 for Fashion-MNIST).
    dtype: compute dtype.
  """
  blocks: Sequence[Sequence[int]] = QUICK_TEACHER
  num_classes: int = 10
  in_channels: int = 1
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.blocks[-1][-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, self.in_channels, "QuickCNN")
    i = 0
    for widths in self.blocks:
      for width in widths:
        i += 1
        x = Conv(width, 3, 1, dtype=self.dtype, kernel_init=layers.kaiming_normal_fan_out,
                 name=f"conv{i}")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train))
      x = layers.max_pool(x, 2, 2)
    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, name="fc")(features)
    return layers.outputs(logits, features, return_features)
