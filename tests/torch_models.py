"""PyTorch reference models for the parity tests and the benchmark.

Written from the definitions of mdistiller's `mdistiller/models/cifar/` and
`mdistiller/models/imagenet/` (not copied from the peers' code); their `state_dict()` names and
shapes equal those of the peers' models (docs/PYTORCH.md#parameter-names), which
`tests/test_models.py` checks against a record of the peers' state dicts. NCHW, as PyTorch.

  model = build("resnet8x4", num_classes=100)   # same names as jaxkd.models.create
  randomize_(model, seed=0)                      # random weights and BN statistics
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from jaxkd.models import quick


def _conv(cin, cout, k, stride=1, groups=1, bias=False):
  return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


def _gap(x):
  return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# ------------------------------------------------------------------------------------------
# ResNets (mdistiller CIFAR resnet, RepDistiller resnetv2, torchvision ImageNet).
# ------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, shortcut_name):
    super().__init__()
    self.conv1 = _conv(cin, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut_name = shortcut_name
    if stride != 1 or cin != planes:
      setattr(self, shortcut_name, nn.Sequential(_conv(cin, planes, 1, stride),
                                                 nn.BatchNorm2d(planes)))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = getattr(self, self.shortcut_name, None)
    return F.relu(y + (shortcut(x) if shortcut is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, shortcut_name):
    super().__init__()
    out = planes * 4
    self.conv1 = _conv(cin, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, out, 1)
    self.bn3 = nn.BatchNorm2d(out)
    self.shortcut_name = shortcut_name
    if stride != 1 or cin != out:
      setattr(self, shortcut_name, nn.Sequential(_conv(cin, out, 1, stride),
                                                 nn.BatchNorm2d(out)))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = getattr(self, self.shortcut_name, None)
    return F.relu(y + (shortcut(x) if shortcut is not None else x))


class ResNet(nn.Module):

  def __init__(self, block, sizes, widths, strides, stem_width, num_classes, imagenet_stem,
               shortcut_name, head_name):
    super().__init__()
    self.imagenet_stem = imagenet_stem
    self.conv1 = (nn.Conv2d(3, stem_width, 7, 2, 3, bias=False) if imagenet_stem
                  else _conv(3, stem_width, 3))
    self.bn1 = nn.BatchNorm2d(stem_width)
    cin = stem_width
    for i, (n, planes, stride) in enumerate(zip(sizes, widths, strides), start=1):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, planes, stride if j == 0 else 1, shortcut_name))
        cin = planes * block.expansion
      setattr(self, f"layer{i}", nn.Sequential(*blocks))
    self.num_stages = len(sizes)
    self.head_name = head_name
    setattr(self, head_name, nn.Linear(cin, num_classes))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    for i in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{i}")(x)
    return getattr(self, self.head_name)(_gap(x))


def cifar_resnet(depth, widths, num_classes):
  n = (depth - 2) // 6
  return ResNet(BasicBlock, (n, n, n), widths[1:], (1, 2, 2), widths[0], num_classes, False,
                "downsample", "fc")


_LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
            50: (Bottleneck, (3, 4, 6, 3))}


def resnetv2(depth, num_classes):
  block, sizes = _LAYOUTS[depth]
  return ResNet(block, sizes, (64, 128, 256, 512), (1, 2, 2, 2), 64, num_classes, False,
                "shortcut", "linear")


def resnet_imagenet(depth, num_classes):
  block, sizes = _LAYOUTS[depth]
  return ResNet(block, sizes, (64, 128, 256, 512), (1, 2, 2, 2), 64, num_classes, True,
                "downsample", "fc")


# ------------------------------------------------------------------------------------------
# Wide ResNet.
# ------------------------------------------------------------------------------------------


class WideBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = _conv(cin, cout, 3, stride)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = _conv(cout, cout, 3)
    self.equal = cin == cout
    self.convShortcut = None if self.equal else _conv(cin, cout, 1, stride)

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
    return (x if self.equal else self.convShortcut(pre)) + y


class WideStage(nn.Module):

  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0
                                           else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth, k, num_classes):
    super().__init__()
    n = (depth - 4) // 6
    self.conv1 = _conv(3, 16, 3)
    self.block1 = WideStage(n, 16, 16 * k, 1)
    self.block2 = WideStage(n, 16 * k, 32 * k, 2)
    self.block3 = WideStage(n, 32 * k, 64 * k, 2)
    self.bn1 = nn.BatchNorm2d(64 * k)
    self.fc = nn.Linear(64 * k, num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(_gap(F.relu(self.bn1(x))))


# ------------------------------------------------------------------------------------------
# VGG-BN.
# ------------------------------------------------------------------------------------------

_VGG = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):

  def __init__(self, depth, num_classes):
    super().__init__()
    cin = 3
    for b, widths in enumerate(_VGG[depth]):
      mods = []
      for w in widths:
        mods += [_conv(cin, w, 3, bias=True), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
      setattr(self, f"block{b}", nn.Sequential(*mods[:-1]))  # the last ReLU is in forward
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    h = x.shape[2]
    for b in range(5):
      x = F.relu(getattr(self, f"block{b}")(x))
      if b < 3 or (b == 3 and h == 64):
        x = F.max_pool2d(x, 2, 2)
    return self.classifier(_gap(x))


# ------------------------------------------------------------------------------------------
# MobileNets.
# ------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = cin * t
    self.residual = stride == 1 and cin == cout
    self.conv = nn.Sequential(
        _conv(cin, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
        _conv(hidden, hidden, 3, stride, groups=hidden), nn.BatchNorm2d(hidden), nn.ReLU(),
        _conv(hidden, cout, 1), nn.BatchNorm2d(cout))

  def forward(self, x):
    return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
  SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1))

  def __init__(self, num_classes, width=0.5):
    super().__init__()
    cin = int(32 * width)
    self.conv1 = nn.Sequential(_conv(3, cin, 3, 2), nn.BatchNorm2d(cin), nn.ReLU())
    stages = []
    for t, c, n, s in self.SETTINGS:
      cout = int(c * width)
      blocks = []
      for i in range(n):
        blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
        cin = cout
      stages.append(nn.Sequential(*blocks))
    self.blocks = nn.ModuleList(stages)
    self.conv2 = nn.Sequential(_conv(cin, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    for stage in self.blocks:
      x = stage(x)
    return self.classifier(_gap(self.conv2(x)))


class MobileNetV1(nn.Module):
  UNITS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
           (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

  def __init__(self, num_classes):
    super().__init__()
    mods = [nn.Sequential(_conv(3, 32, 3, 2), nn.BatchNorm2d(32), nn.ReLU())]
    cin = 32
    for cout, s in self.UNITS:
      mods.append(nn.Sequential(
          _conv(cin, cin, 3, s, groups=cin), nn.BatchNorm2d(cin), nn.ReLU(),
          _conv(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU()))
      cin = cout
    self.model = nn.Sequential(*mods)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    return self.fc(_gap(self.model(x)))


# ------------------------------------------------------------------------------------------
# ShuffleNets.
# ------------------------------------------------------------------------------------------


def _shuffle(x, g):
  n, c, h, w = x.shape
  return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):

  def __init__(self, cin, cout, stride, groups):
    super().__init__()
    mid = cout // 4
    self.g = 1 if cin == 24 else groups
    self.stride = stride
    self.conv1 = _conv(cin, mid, 1, groups=self.g)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = _conv(mid, mid, 3, stride, groups=mid)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = _conv(mid, cout, 1, groups=groups)
    self.bn3 = nn.BatchNorm2d(cout)

  def forward(self, x):
    y = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.stride == 2:
      return F.relu(torch.cat([y, F.avg_pool2d(x, 3, 2, 1)], 1))
    return F.relu(y + x)


class ShuffleNetV1(nn.Module):

  def __init__(self, num_classes, widths=(240, 480, 960), sizes=(4, 8, 4), groups=3):
    super().__init__()
    self.conv1 = _conv(3, 24, 1)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for i, (w, n) in enumerate(zip(widths, sizes), start=1):
      units = []
      for j in range(n):
        units.append(ShuffleV1Unit(cin, w - cin if j == 0 else w, 2 if j == 0 else 1, groups))
        cin = w
      setattr(self, f"layer{i}", nn.Sequential(*units))
    self.linear = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(_gap(x))


class ShuffleV2Down(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1 = _conv(cin, cin, 3, 2, groups=cin)
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv2 = _conv(cin, mid, 1)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = _conv(cin, mid, 1)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = _conv(mid, mid, 3, 2, groups=mid)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = _conv(mid, mid, 1)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    right = F.relu(self.bn5(self.conv5(right)))
    return _shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2Basic(nn.Module):

  def __init__(self, channels):
    super().__init__()
    c = channels // 2
    self.half = c
    self.conv1 = _conv(c, c, 1)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = _conv(c, c, 3, groups=c)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = _conv(c, c, 1)
    self.bn3 = nn.BatchNorm2d(c)

  def forward(self, x):
    keep, y = x[:, :self.half], x[:, self.half:]
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))
    y = F.relu(self.bn3(self.conv3(y)))
    return _shuffle(torch.cat([keep, y], 1), 2)


class ShuffleNetV2(nn.Module):

  def __init__(self, num_classes, widths=(116, 232, 464), sizes=(3, 7, 3), head=1024):
    super().__init__()
    self.conv1 = _conv(3, 24, 1)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for i, (w, n) in enumerate(zip(widths, sizes), start=1):
      setattr(self, f"layer{i}", nn.Sequential(ShuffleV2Down(cin, w),
                                               *[ShuffleV2Basic(w) for _ in range(n)]))
      cin = w
    self.conv2 = _conv(cin, head, 1)
    self.bn2 = nn.BatchNorm2d(head)
    self.linear = nn.Linear(head, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(_gap(F.relu(self.bn2(self.conv2(x)))))


# ------------------------------------------------------------------------------------------
# Quick 28x28 grey models (jaxkd's own layout; see jaxkd/models/quick.py).
# ------------------------------------------------------------------------------------------


class QuickCNN(nn.Module):

  def __init__(self, blocks, num_classes, in_channels=1):
    super().__init__()
    self.blocks = [len(b) for b in blocks]
    cin, i = in_channels, 0
    for widths in blocks:
      for w in widths:
        i += 1
        setattr(self, f"conv{i}", _conv(cin, w, 3))
        setattr(self, f"bn{i}", nn.BatchNorm2d(w))
        cin = w
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    i = 0
    for n in self.blocks:
      for _ in range(n):
        i += 1
        x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
      x = F.max_pool2d(x, 2, 2)
    return self.fc(_gap(x))


# ------------------------------------------------------------------------------------------
# Registry (the names of jaxkd.models) and helpers.
# ------------------------------------------------------------------------------------------


def _builders():
  b = {}
  for d in (8, 14, 20, 32, 44, 56, 110):
    b[f"resnet{d}"] = lambda c, d=d: cifar_resnet(d, (16, 16, 32, 64), c)
  for d in (8, 32):
    b[f"resnet{d}x4"] = lambda c, d=d: cifar_resnet(d, (32, 64, 128, 256), c)
  for d, k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    b[f"wrn_{d}_{k}"] = lambda c, d=d, k=k: WideResNet(d, k, c)
  for d in _VGG:
    b[f"vgg{d}"] = b[f"vgg{d}_bn"] = lambda c, d=d: VGG(d, c)
  b["mobilenetv2"] = b["mobile_half"] = MobileNetV2
  b["shufflev1"] = ShuffleNetV1
  b["shufflev2"] = ShuffleNetV2
  for d in (18, 34, 50):
    b[f"resnet{d}"] = lambda c, d=d: resnetv2(d, c)
    b[f"resnet{d}_imagenet"] = lambda c, d=d: resnet_imagenet(d, c)
  b["mobilenetv1_imagenet"] = b["mobilenetv1"] = MobileNetV1
  # jaxkd's own layout (no peer to follow): take it from the library so the two cannot drift.
  b["quick_teacher"] = lambda c: QuickCNN(quick.QUICK_TEACHER, c)
  b["quick_student"] = lambda c: QuickCNN(quick.QUICK_STUDENT, c)
  return b


_BUILDERS = _builders()


def build(name: str, num_classes: int) -> nn.Module:
  """The PyTorch reference of jaxkd model `name` (case-insensitive), in train mode."""
  try:
    return _BUILDERS[name.lower()](num_classes)
  except KeyError:
    raise ValueError(f"no PyTorch reference for {name!r}") from None


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, images: torch.Tensor | None = None):
  """Random weights and non-trivial BatchNorm parameters and running statistics, in place.

  With `images`, the running statistics are first set to that batch's own statistics (one
  train-mode forward with momentum 1), so that deep models stay well scaled in eval mode,
  then perturbed; without, they are drawn at random.
  """
  g = torch.Generator().manual_seed(seed)
  uniform = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      if m.bias is not None:
        uniform(m.bias, -0.1, 0.1)
    elif isinstance(m, nn.BatchNorm2d):
      uniform(m.weight, 0.5, 1.5)
      uniform(m.bias, -0.2, 0.2)
      uniform(m.running_mean, -0.2, 0.2)
      uniform(m.running_var, 0.5, 1.5)
  if images is not None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
      m.momentum = 1.0
    was_training = model.training
    model.train()
    model(images)
    model.train(was_training)
    for m, mom in zip(bns, saved):
      m.momentum = mom
      m.running_mean.add_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
      m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
  return model
