"""The model zoo: the mdistiller/RepDistiller CIFAR models, ImageNet ResNets and MobileNetV1,
and two quick 28x28 grey models, behind one registry.

  model = jaxkd.models.create("resnet32x4", num_classes=100, dtype=jnp.bfloat16)
  variables = model.init(rng, images, train=False)        # {"params", "batch_stats"}
  logits = model.apply(variables, images, train=False)    # [B, C] float32
  logits, features = model.apply(variables, images, return_features=True)  # features [B, D]
  (logits, features), new = model.apply(variables, images, train=True,
                                        return_features=True, mutable=["batch_stats"])
  shapes = jaxkd.models.abstract_variables("resnet32x4", 100)  # ShapeDtypeStructs, no compute
  aux = jaxkd.models.AuxHead(100)  # IPWD's auxiliary classifier on `features`

Images are NHWC float32 (already normalised). Parameters and BatchNorm statistics are float32
whatever the compute `dtype`; logits and the pooled penultimate features are float32. Names
follow the peers (`resnet8x4`, `wrn_40_2`, `ShuffleV1`, ...) and are looked up
case-insensitively. PyTorch checkpoints of every model import with
`jaxkd.models.torch_import.from_state_dict` (docs/PYTORCH.md#converting-a-teacher).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import mobilenet, quick, resnet, shufflenet, vgg, wrn
from jaxkd.models.heads import AuxHead

__all__ = ["AuxHead", "ModelSpec", "abstract_variables", "available", "create",
           "dataset_family", "feature_dim", "input_shape", "spec"]

_INPUT_SHAPES = {"cifar": (32, 32, 3), "imagenet": (224, 224, 3), "quick": (28, 28, 1)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registry entry.

  Attributes:
    name: canonical name (as the peers spell it).
    build: `(*, num_classes, dtype) -> nn.Module`, called with keywords.
    dataset_family: "cifar" (32x32x3), "imagenet" (224x224x3) or "quick" (28x28x1).
    feature_dim: D of the pooled penultimate features.
    aliases: other accepted names.
  """
  name: str
  build: Callable[..., nn.Module]
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
    specs.append(ModelSpec(f"resnet{depth}", p(resnet.cifar_resnet, depth, (16, 16, 32, 64)),
                           "cifar", 64))
  for depth in (8, 32):
    specs.append(ModelSpec(f"resnet{depth}x4",
                           p(resnet.cifar_resnet, depth, (32, 64, 128, 256)), "cifar", 256))
  for depth, k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    specs.append(ModelSpec(f"wrn_{depth}_{k}", p(wrn.WideResNet, depth=depth, widen_factor=k),
                           "cifar", 64 * k))
  for depth in (8, 11, 13, 16, 19):
    specs.append(ModelSpec(f"vgg{depth}", p(vgg.vgg, depth), "cifar", 512,
                           aliases=(f"vgg{depth}_bn",)))
  specs += [
      ModelSpec("MobileNetV2", p(mobilenet.MobileNetV2, width_mult=0.5), "cifar", 1280,
                aliases=("mobile_half",)),
      ModelSpec("ShuffleV1", shufflenet.ShuffleNetV1, "cifar", 960),
      ModelSpec("ShuffleV2", shufflenet.ShuffleNetV2, "cifar", 1024),
      ModelSpec("ResNet18", p(resnet.resnetv2_cifar, 18), "cifar", 512),
      ModelSpec("ResNet34", p(resnet.resnetv2_cifar, 34), "cifar", 512),
      ModelSpec("ResNet50", p(resnet.resnetv2_cifar, 50), "cifar", 2048),
      ModelSpec("resnet18_imagenet", p(resnet.resnet_imagenet, 18), "imagenet", 512),
      ModelSpec("resnet34_imagenet", p(resnet.resnet_imagenet, 34), "imagenet", 512),
      ModelSpec("resnet50_imagenet", p(resnet.resnet_imagenet, 50), "imagenet", 2048),
      ModelSpec("mobilenetv1_imagenet", mobilenet.MobileNetV1, "imagenet", 1024,
                aliases=("MobileNetV1",)),
      ModelSpec("quick_teacher", p(quick.QuickCNN, blocks=quick.QUICK_TEACHER), "quick",
                quick.QUICK_TEACHER[-1][-1]),
      ModelSpec("quick_student", p(quick.QuickCNN, blocks=quick.QUICK_STUDENT), "quick",
                quick.QUICK_STUDENT[-1][-1]),
  ]
  return specs


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
  return spec(name).build(num_classes=num_classes, dtype=dtype)


def dataset_family(name: str) -> str:
  """"cifar", "imagenet" or "quick": which images the model is built for."""
  return spec(name).dataset_family


def input_shape(name: str) -> tuple[int, int, int]:
  """(H, W, C) of the model's native input: (32, 32, 3), (224, 224, 3) or (28, 28, 1)."""
  return spec(name).input_shape


def feature_dim(name: str) -> int:
  """D of the pooled penultimate features that `return_features=True` gives."""
  return spec(name).feature_dim


def abstract_variables(name: str, num_classes: int, *, dtype: Any = jnp.float32) -> dict:
  """The variables of `create(name, num_classes, dtype=dtype)` as jax.ShapeDtypeStructs.

  {"params": ..., "batch_stats": ...} with every leaf float32 (whatever `dtype`), from
  `jax.eval_shape` of the module's init on one image of `input_shape(name)`: nothing is
  computed, so it is cheap even for the ImageNet models.
  """
  module = create(name, num_classes, dtype=dtype)
  images = jax.ShapeDtypeStruct((1, *input_shape(name)), jnp.float32)
  abstract = jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, train=False), images)
  return flax.core.unfreeze(abstract)
