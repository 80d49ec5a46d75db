"""The model zoo: the mdistiller/RepDistiller CIFAR models, ImageNet ResNets and MobileNetV1,
and two quick 28x28 grey models, behind one registry.

  model = jaxkd.models.create("resnet32x4", num_classes=100, dtype=jnp.bfloat16)
  variables = model.init(rng, images, train=False)        # {"params", "batch_stats"}
  logits = model.apply(variables, images, train=False)    # [B, C] float32
  logits, features = model.apply(variables, images, return_features=True)  # features [B, D]
  (logits, features), new = model.apply(variables, images, train=True,
                                        return_features=True, mutable=["batch_stats"])

Images are NHWC float32 (already normalised). Parameters and BatchNorm statistics are float32
whatever the compute `dtype`; logits and the pooled penultimate features are float32. Names
follow the peers (`resnet8x4`, `wrn_40_2`, `ShuffleV1`, ...) and are looked up
case-insensitively. PyTorch checkpoints of every model import with
`jaxkd.models.torch_import.from_state_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models import mobilenet, quick, resnet, shufflenet, vgg, wrn

__all__ = ["ModelSpec", "available", "create", "dataset_family", "feature_dim", "input_shape",
           "spec"]

_INPUT_SHAPES = {"cifar": (32, 32, 3), "imagenet": (224, 224, 3), "quick": (28, 28, 1)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registry entry.

  Attributes:
    name: canonical name (as the peers spell it).
    build: `(num_classes, dtype) -> nn.Module`.
    dataset_family: "cifar" (32x32x3), "imagenet" (224x224x3) or "quick" (28x28x1).
    feature_dim: D of the pooled penultimate features.
    aliases: other accepted names.
  """
  name: str
  build: Callable[[int, Any], nn.Module]
  dataset_family: str
  feature_dim: int
  aliases: tuple[str, ...] = ()

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the native input."""
    return _INPUT_SHAPES[self.dataset_family]


def _specs() -> list[ModelSpec]:
  p = functools.partial
  specs = []
  for depth in (8, 14, 20, 32, 44, 56, 110):
    specs.append(ModelSpec(f"resnet{depth}", p(_cifar_resnet, depth, (16, 16, 32, 64)),
                           "cifar", 64))
  for depth in (8, 32):
    specs.append(ModelSpec(f"resnet{depth}x4", p(_cifar_resnet, depth, (32, 64, 128, 256)),
                           "cifar", 256))
  for depth, k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    specs.append(ModelSpec(f"wrn_{depth}_{k}", p(_wrn, depth, k), "cifar", 64 * k))
  for depth in (8, 11, 13, 16, 19):
    specs.append(ModelSpec(f"vgg{depth}", p(_vgg, depth), "cifar", 512,
                           aliases=(f"vgg{depth}_bn",)))
  specs += [
      ModelSpec("MobileNetV2", _mobilenetv2, "cifar", 1280, aliases=("mobile_half",)),
      ModelSpec("ShuffleV1", _shufflev1, "cifar", 960),
      ModelSpec("ShuffleV2", _shufflev2, "cifar", 1024),
      ModelSpec("ResNet18", p(_resnetv2, 18), "cifar", 512),
      ModelSpec("ResNet34", p(_resnetv2, 34), "cifar", 512),
      ModelSpec("ResNet50", p(_resnetv2, 50), "cifar", 2048),
      ModelSpec("resnet18_imagenet", p(_resnet_imagenet, 18), "imagenet", 512),
      ModelSpec("resnet34_imagenet", p(_resnet_imagenet, 34), "imagenet", 512),
      ModelSpec("resnet50_imagenet", p(_resnet_imagenet, 50), "imagenet", 2048),
      ModelSpec("mobilenetv1_imagenet", _mobilenetv1, "imagenet", 1024,
                aliases=("MobileNetV1",)),
      ModelSpec("quick_teacher", p(_quick, quick.QUICK_TEACHER), "quick",
                quick.QUICK_TEACHER[-1][-1]),
      ModelSpec("quick_student", p(_quick, quick.QUICK_STUDENT), "quick",
                quick.QUICK_STUDENT[-1][-1]),
  ]
  return specs


def _cifar_resnet(depth, widths, num_classes, dtype):
  return resnet.cifar_resnet(depth, widths, num_classes, dtype)


def _resnetv2(depth, num_classes, dtype):
  return resnet.resnetv2_cifar(depth, num_classes, dtype)


def _resnet_imagenet(depth, num_classes, dtype):
  return resnet.resnet_imagenet(depth, num_classes, dtype)


def _wrn(depth, k, num_classes, dtype):
  return wrn.WideResNet(depth=depth, widen_factor=k, num_classes=num_classes, dtype=dtype)


def _vgg(depth, num_classes, dtype):
  return vgg.vgg(depth, num_classes, dtype)


def _mobilenetv2(num_classes, dtype):
  return mobilenet.MobileNetV2(width_mult=0.5, num_classes=num_classes, dtype=dtype)


def _mobilenetv1(num_classes, dtype):
  return mobilenet.MobileNetV1(num_classes=num_classes, dtype=dtype)


def _shufflev1(num_classes, dtype):
  return shufflenet.ShuffleNetV1(num_classes=num_classes, dtype=dtype)


def _shufflev2(num_classes, dtype):
  return shufflenet.ShuffleNetV2(num_classes=num_classes, dtype=dtype)


def _quick(blocks, num_classes, dtype):
  return quick.QuickCNN(blocks=blocks, num_classes=num_classes, dtype=dtype)


_REGISTRY: dict[str, ModelSpec] = {}
for _s in _specs():
  for _key in (_s.name, *_s.aliases):
    assert _key.lower() not in _REGISTRY, _key
    _REGISTRY[_key.lower()] = _s
del _s, _key


def available(include_aliases: bool = False) -> list[str]:
  """Sorted canonical model names (and the aliases too with `include_aliases=True`)."""
  names = {s.name for s in _REGISTRY.values()}
  if include_aliases:
    names |= {a for s in _REGISTRY.values() for a in s.aliases}
  return sorted(names, key=str.lower)


def spec(name: str) -> ModelSpec:
  """The registry entry of `name` (case-insensitive); ValueError listing the known names."""
  try:
    return _REGISTRY[name.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f"unknown model {name!r}; known models: "
                     f"{', '.join(available(include_aliases=True))}") from None


def create(name: str, num_classes: int, *, dtype: Any = jnp.float32) -> nn.Module:
  """A Flax module for model `name` with `num_classes` outputs and compute dtype `dtype`.

  Parameters are float32 whatever `dtype`; BatchNorm statistics, logits and features too.
  """
  try:
    num_classes = operator.index(num_classes)  # ints and numpy ints; not floats or strings
  except TypeError:
    num_classes = -1
  if num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  return spec(name).build(num_classes, dtype)


def dataset_family(name: str) -> str:
  """"cifar", "imagenet" or "quick": which images the model is built for."""
  return spec(name).dataset_family


def input_shape(name: str) -> tuple[int, int, int]:
  """(H, W, C) of the model's native input: (32, 32, 3), (224, 224, 3) or (28, 28, 1)."""
  return spec(name).input_shape


def feature_dim(name: str) -> int:
  """D of the pooled penultimate features that `return_features=True` gives."""
  return spec(name).feature_dim
