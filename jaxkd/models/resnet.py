"""ResNets: the CIFAR family (mdistiller `resnet8` ... `resnet32x4`), the CIFAR `resnetv2`
family (`ResNet18/34/50`) and the torchvision ImageNet ResNet18/34/50.

All three are one `ResNet` module with different stems, stage layouts and submodule names
(the names are the PyTorch state-dict names with "." -> "_", so checkpoints import one to
one; see `jaxkd.models.torch_import` and docs/PYTORCH.md#parameter-names). Definitions:
mdistiller's `mdistiller/models/cifar/resnet.py`, `resnetv2.py` and
`mdistiller/models/imagenet/resnet.py` (torchvision's).

Init (all families): convs Kaiming-normal fan_out (ReLU gain), BatchNorm 1 / 0, the classifier
PyTorch's default.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.layers import BatchNorm, Conv, Dtype, Linear


class BasicBlock(nn.Module):
  """conv3x3(stride) BN ReLU conv3x3 BN, plus shortcut, then ReLU. [B,H,W,in] -> [B,H/s,W/s,planes].

  Attributes:
    planes: output channels.
    stride: stride of the first conv and of the projection.
    projection: use a 1x1 conv + BN shortcut (when the shape changes) instead of identity.
    shortcut_name: PyTorch name of the projection ("downsample" or "shortcut").
    dtype: compute dtype.
  """
  planes: int
  stride: int = 1
  projection: bool = False
  shortcut_name: str = "downsample"
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: Conv(f, k, s, dtype=self.dtype,
                                      kernel_init=layers.kaiming_normal_fan_out, name=name)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    y = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, "conv1")(x), train))
    y = bn("bn2")(conv(self.planes, 3, 1, "conv2")(y), train)
    if self.projection:
      x = conv(self.planes, 1, self.stride, f"{self.shortcut_name}_0")(x)
      x = bn(f"{self.shortcut_name}_1")(x, train)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 BN ReLU, 3x3(stride) BN ReLU, 1x1 (x4) BN, plus shortcut, then ReLU.

  The stride sits on the 3x3 conv (torchvision's "ResNet v1.5", also RepDistiller's
  `resnetv2`). [B,H,W,in] -> [B,H/s,W/s,4*planes]. Attributes as `BasicBlock`.
  """
  planes: int
  stride: int = 1
  projection: bool = False
  shortcut_name: str = "downsample"
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: Conv(f, k, s, dtype=self.dtype,
                                      kernel_init=layers.kaiming_normal_fan_out, name=name)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    out = self.planes * self.expansion
    y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, "conv1")(x), train))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, "conv2")(y), train))
    y = bn("bn3")(conv(out, 1, 1, "conv3")(y), train)
    if self.projection:
      x = conv(out, 1, self.stride, f"{self.shortcut_name}_0")(x)
      x = bn(f"{self.shortcut_name}_1")(x, train)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """A ResNet: stem, stages of residual blocks, global average pool, linear classifier.

  Call: `(images [B,H,W,3], train=False, return_features=False)` -> logits [B, num_classes]
  float32, or (logits, pooled features [B, feature_dim]).

  Attributes:
    stage_sizes: blocks per stage.
    stage_widths: `planes` per stage (output channels are planes * expansion).
    stage_strides: stride of each stage's first block.
    stem_width: output channels of the stem conv.
    bottleneck: Bottleneck blocks (x4 expansion) instead of BasicBlocks.
    imagenet_stem: conv7x7/2 + BN + ReLU + maxpool3x3/2 (torchvision) instead of conv3x3/1.
    shortcut_name: PyTorch name of projection shortcuts.
    head_name: PyTorch name of the classifier ("fc" or "linear").
    num_classes: classes.
    dtype: compute dtype (params and BN statistics stay float32).
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  stage_strides: Sequence[int]
  stem_width: int
  bottleneck: bool = False
  imagenet_stem: bool = False
  shortcut_name: str = "downsample"
  head_name: str = "fc"
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.stage_widths[-1] * (4 if self.bottleneck else 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    layers.check_images(x, 3, type(self).__name__)
    kernel_init = layers.kaiming_normal_fan_out
    if self.imagenet_stem:
      x = Conv(self.stem_width, 7, 2, dtype=self.dtype, kernel_init=kernel_init, name="conv1")(x)
    else:
      x = Conv(self.stem_width, 3, 1, dtype=self.dtype, kernel_init=kernel_init, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    if self.imagenet_stem:
      x = layers.max_pool(x, 3, 2, padding=1)

    block_cls = Bottleneck if self.bottleneck else BasicBlock
    in_channels = self.stem_width
    for stage, (size, planes, stride) in enumerate(
        zip(self.stage_sizes, self.stage_widths, self.stage_strides), start=1):
      for i in range(size):
        s = stride if i == 0 else 1
        out_channels = planes * block_cls.expansion
        x = block_cls(planes, s, projection=(s != 1 or in_channels != out_channels),
                      shortcut_name=self.shortcut_name, dtype=self.dtype,
                      name=f"layer{stage}_{i}")(x, train)
        in_channels = out_channels

    features = layers.global_avg_pool(x)
    logits = Linear(self.num_classes, dtype=self.dtype, name=self.head_name)(features)
    return layers.outputs(logits, features, return_features)


def cifar_resnet(depth: int, widths: Sequence[int], num_classes: int,
                 dtype: Dtype = jnp.float32) -> ResNet:
  """mdistiller's CIFAR ResNet: n = (depth - 2) / 6 BasicBlocks per stage, widths [c0..c3].

  resnet8..110 use [16, 16, 32, 64]; resnet8x4 / resnet32x4 use [32, 64, 128, 256].
  """
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
  n = (depth - 2) // 6
  return ResNet(stage_sizes=(n, n, n), stage_widths=tuple(widths[1:]), stage_strides=(1, 2, 2),
                stem_width=widths[0], shortcut_name="downsample", head_name="fc",
                num_classes=num_classes, dtype=dtype)


_V2_LAYOUTS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}


def resnetv2_cifar(depth: int, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's CIFAR `resnetv2` ResNet18/34/50: conv3x3 stem, no max-pool."""
  sizes, bottleneck = _V2_LAYOUTS[depth]
  return ResNet(stage_sizes=sizes, stage_widths=(64, 128, 256, 512), stage_strides=(1, 2, 2, 2),
                stem_width=64, bottleneck=bottleneck, shortcut_name="shortcut",
                head_name="linear", num_classes=num_classes, dtype=dtype)


def resnet_imagenet(depth: int, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """torchvision's ImageNet ResNet18/34/50 (v1.5: the bottleneck stride is on the 3x3 conv)."""
  sizes, bottleneck = _V2_LAYOUTS[depth]
  return ResNet(stage_sizes=sizes, stage_widths=(64, 128, 256, 512), stage_strides=(1, 2, 2, 2),
                stem_width=64, bottleneck=bottleneck, imagenet_stem=True,
                shortcut_name="downsample", head_name="fc", num_classes=num_classes,
                dtype=dtype)
