"""Import PyTorch weights (mdistiller/RepDistiller teachers, torchvision ResNets) into the zoo.

  variables = from_state_dict("resnet32x4", state_dict, num_classes=100)
  variables = load("resnet32x4", "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")

Every zoo module names its submodules after the PyTorch state-dict entries with "." -> "_"
(`layer1_0/downsample_0/kernel` is `layer1.0.downsample.0.weight`), so the mapping is derived
from the module itself and needs no per-model table:

  Conv kernel [kh, kw, in/g, out]  <-  weight [out, in/g, kh, kw]
  Linear kernel [in, out]          <-  weight [out, in]
  bias                             <-  bias
  BatchNorm scale / bias           <-  weight / bias
  batch_stats mean / var           <-  running_mean / running_var   (num_batches_tracked unused)

A distiller's checkpoint (mdistiller's `latest`, `best`, `epoch_N`) holds the student and the
teacher in one state dict; `select_part` takes one of them out. A state dict that does not fit
the model named is compared with every zoo model, and the error names the one it fits
(docs/PYTORCH.md#parameter-names).

`torch` is imported only by `load_torch_file`; `from_state_dict` also takes numpy arrays.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax
import jax.numpy as jnp
import numpy as np

import jaxkd.models as models

_IGNORED_SUFFIX = "num_batches_tracked"


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  *modules, leaf = path
  prefix = ".".join(m.replace("_", ".") for m in modules)
  if collection == "batch_stats":
    name = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return f"{prefix}.{name}"


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # [kh, kw, in/g, out] -> [out, in/g, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # [in, out] -> [out, in]
    return (shape[1], shape[0])
  return tuple(shape)


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return array.T
  return array


Layout = dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]


def torch_layout(name: str, num_classes: int) -> Layout:
  """The state dict model `name` expects: {torch key: (collection, flax path, torch shape)}.

  Shapes come from `jaxkd.models.abstract_variables`, so nothing is computed.
  """
  return dict(_layout(models.spec(name).name, num_classes))


@functools.lru_cache(maxsize=None)
def _layout(name: str, num_classes: int) -> tuple:
  # Cached: one conversion asks for a model's layout several times (the classifier's key, the
  # layout itself, the zoo models an unmatched state dict is compared with).
  abstract = models.abstract_variables(name, num_classes)
  layout = []
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(abstract[collection])
    for path, leaf in flat.items():
      layout.append((_torch_key(collection, path),
                     (collection, path, _to_torch_shape(leaf.shape))))
  return tuple(layout)


def _as_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any float dtype, any device) or array-like as a numpy array."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16; half precision teachers exist
    value = value.numpy()
  # Copy: `.numpy()` shares the tensor's memory, and JAX may alias numpy memory on CPU, so a
  # later in-place update of the torch module (a train-mode forward) would change our arrays.
  return np.array(value, copy=True)


def _strip_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  # nn.DataParallel / DistributedDataParallel checkpoints prefix every key with "module.".
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return state_dict


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


# ---------------------------------------------------------------------------------------------
# Distillers' checkpoints: the student and the teacher in one state dict.

DISTILLER_PARTS = ("student", "teacher")


def distiller_parts(state_dict: Mapping[str, Any]) -> tuple[str, ...]:
  """Which of "student" and "teacher" a distiller's state dict holds; () for a model's own.

  mdistiller's whole-run checkpoints (`latest`, `best`, `epoch_N`) hold its distiller's state
  dict under "model": the student's entries as `module.student.*`, the teacher's as
  `module.teacher.*` (the distiller runs in nn.DataParallel), and a method's own modules
  (FitNet's `conv_reg`, CRD's embeddings) under other names
  (docs/PYTORCH.md#mdistiller-checkpoints).
  """
  keys = _strip_prefix(state_dict)
  return tuple(p for p in DISTILLER_PARTS if any(k.startswith(f"{p}.") for k in keys))


def select_part(state_dict: Mapping[str, Any], part: str | None = None) -> dict[str, Any]:
  """One model's state dict, out of a distiller's (`distiller_parts`) or a model's own.

  Args:
    state_dict: a model's state dict, or a distiller's; a common "module." prefix is dropped.
    part: "student" or "teacher": that model of a distiller's state dict, with its prefix
      stripped; None: `state_dict` is a model's own.

  Raises:
    ValueError: a distiller's state dict without `part`, or a `part` it does not hold.
  """
  state_dict = _strip_prefix(state_dict)
  parts = distiller_parts(state_dict)
  if part is None:
    if parts:
      raise ValueError(
          f"the state dict is a distiller's (keys {', '.join(f'{p}.*' for p in parts)}, as in "
          f"mdistiller's latest / best / epoch_N checkpoints); choose part='student' or "
          f"part='teacher'")
    return dict(state_dict)
  if part not in DISTILLER_PARTS:
    raise ValueError(f"part must be one of {DISTILLER_PARTS} or None, got {part!r}")
  if part not in parts:
    holds = (f"it holds {' and '.join(parts)} only" if parts else
             "it is a model's own state dict (convert it without a part)")
    raise ValueError(f"the state dict has no {part} (no keys {part}.* or module.{part}.*): "
                     f"{holds}")
  prefix = f"{part}."
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def matching_models(state_dict: Mapping[str, Any]) -> list[tuple[str, int]]:
  """(name, num_classes) of each zoo model whose PyTorch layout is exactly `state_dict`'s.

  Every zoo model has one Linear layer, the classifier [C, D]; only the models with that D
  as `feature_dim` are compared, from their abstract shapes (nothing is computed).
  """
  given = {k: _shape(v) for k, v in _strip_prefix(state_dict).items()
           if not k.endswith(_IGNORED_SUFFIX)}
  linear = [shape for shape in given.values() if len(shape) == 2]
  if len(linear) != 1 or min(linear[0]) < 1:
    return []
  num_classes, dim = linear[0]
  return [(name, num_classes) for name in models.available()
          if models.feature_dim(name) == dim and given == {
              k: shape for k, (_, _, shape) in torch_layout(name, num_classes).items()}]


def _hint(name: str, state_dict: Mapping[str, Any]) -> list[str]:
  """Lines that say what an unmatched state dict is, when the zoo knows."""
  parts = distiller_parts(state_dict)
  if parts:
    return [f"hint: this is a distiller's state dict ({' and '.join(parts)}): take one model "
            f"out of it with select_part(state_dict, {parts[0]!r})"]
  others = [(n, c) for n, c in matching_models(state_dict) if n != models.spec(name).name]
  if others:
    return ["hint: the state dict is a " + " or a ".join(f"{n} (num_classes={c})"
                                                          for n, c in others)
            + "; use that model name"]
  return []


def head_key(name: str) -> str:
  """The state-dict key of the classifier weight of model `name` (e.g. "fc.weight")."""
  heads = [k for k, (_, path, shape) in torch_layout(name, 1).items()
           if len(shape) == 2 and path[-1] == "kernel"]
  assert len(heads) == 1, heads
  return heads[0]


def infer_num_classes(name: str, state_dict: Mapping[str, Any]) -> int:
  """Number of classes of a state dict of model `name`, read off its classifier weight."""
  state_dict = _strip_prefix(state_dict)
  key = head_key(name)
  if key not in state_dict:
    raise ValueError("\n".join(
        [f"cannot infer num_classes for {name!r}: the state dict has no {key!r} (is it a "
         f"{models.spec(name).name} checkpoint?)"] + _hint(name, state_dict)))
  return int(_as_numpy(state_dict[key]).shape[0])


def from_state_dict(name: str, state_dict: Mapping[str, Any], num_classes: int) -> dict:
  """Flax variables {"params", "batch_stats"} (float32) of model `name` from a state dict.

  Args:
    name: a `jaxkd.models` name.
    state_dict: PyTorch state dict (tensors or numpy arrays) with the peers' names; a common
      "module." prefix (DataParallel) is dropped; `num_batches_tracked` entries are ignored.
    num_classes: classes of the checkpoint.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key at once.
  """
  canonical = models.spec(name).name
  state_dict = _strip_prefix(state_dict)
  layout = torch_layout(name, num_classes)
  given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}

  missing = [k for k in layout if k not in given]
  unexpected = [k for k in given if k not in layout]
  arrays, misshaped = {}, []
  for key, (_, _, shape) in layout.items():
    if key in given:
      arrays[key] = _as_numpy(given[key])
      if tuple(arrays[key].shape) != shape:
        misshaped.append(f"{key}: checkpoint {tuple(arrays[key].shape)}, {canonical} "
                         f"expects {shape}")
  if missing or unexpected or misshaped:
    lines = [f"state dict does not match {canonical} (num_classes={num_classes}): "
             f"{len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} mis-shaped keys"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
      if keys:
        lines.append(f"{title}:")
        lines += [f"  {k}" for k in keys]
    head = head_key(name)
    if any(m.startswith(f"{head}:") for m in misshaped):
      lines.append(f"hint: {head} has another number of classes; pass num_classes "
                   f"{_as_numpy(given[head]).shape[0]}")
    else:
      lines += _hint(name, state_dict)
    raise ValueError("\n".join(lines))

  flat = {"params": {}, "batch_stats": {}}
  for key, (collection, path, _) in layout.items():
    flat[collection][path] = jnp.array(_from_torch_layout(arrays[key]), jnp.float32)
  return {c: flax.traverse_util.unflatten_dict(v) for c, v in flat.items()}


def load_torch_file(path: str | os.PathLike) -> dict[str, Any]:
  """The state dict in a PyTorch checkpoint file, read with `weights_only=True`.

  Accepts a bare state dict or a dict holding it under "model" (mdistiller/RepDistiller teacher
  files) or "state_dict". `weights_only=True` means a checkpoint can never run code on load.

  Raises:
    ImportError: torch is not installed (it is only needed here: `pip install jaxkd[torch]`).
    FileNotFoundError: no such file.
    ValueError: the file is not a readable checkpoint (truncated, corrupt, not PyTorch) or
      holds no state dict; the message names the file.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError as e:
    raise ImportError("importing PyTorch weights needs torch: pip install 'jaxkd[torch]'") from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no PyTorch checkpoint file at {path}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
    raise ValueError(f"could not read PyTorch checkpoint {path} (truncated, corrupt, or saved "
                     f"with objects other than tensors): {type(e).__name__}: {e}") from e
  if isinstance(obj, Mapping):
    for key in ("model", "state_dict"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    what = f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else (
        type(obj).__name__)
    raise ValueError(f"{path} holds no state dict (found {what}); expected a state dict or "
                     f"a dict with one under 'model' or 'state_dict'")
  return dict(obj)


def load(name: str, path: str | os.PathLike, num_classes: int | None = None,
         part: str | None = None) -> dict:
  """Flax variables of model `name` from a PyTorch checkpoint file.

  `num_classes=None` reads it off the checkpoint's classifier. `part` ("student" or
  "teacher") takes that model out of a distiller's checkpoint (see `select_part`).
  """
  try:
    state_dict = select_part(load_torch_file(path), part)
    if num_classes is None:
      num_classes = infer_num_classes(name, state_dict)
    return from_state_dict(name, state_dict, num_classes)
  except ValueError as e:
    message = str(e)
    raise ValueError(message if os.fspath(path) in message else
                     f"{os.fspath(path)}: {message}") from None
