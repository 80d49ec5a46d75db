"""The model zoo: parameter counts, PyTorch layouts and parity, BatchNorm, dtypes, sharding.

CPU budget: shapes and counts come from abstract evaluation (nothing computed); each model's
parity outputs (eval, train, bf16) come from one jit, or from one eager pass for the models
made of repeated blocks (see `_EAGER`); batches are 4 images.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re

import flax
import jax
import jax.extend
import jax.numpy as jnp
import jax.test_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import torch

import jaxkd.models as models
from jaxkd.models import cpu_conv
from jaxkd.models import layers
from jaxkd.models import torch_import
import torch_models

# Tiny batches gain nothing from threads, and on a shared CPU OpenMP's barriers make every
# PyTorch op wait for a descheduled thread.
torch.set_num_threads(1)

ALL = models.available()

# Trainable parameters as PyTorch counts them for the peers' models (100 classes; ImageNet
# models 1000, the ResNets' equal to torchvision's published counts), ours for the quick
# models (10 classes).
PARAM_COUNTS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
    "ResNet18": 11_220_132, "ResNet34": 21_328_292, "ResNet50": 23_705_252,
    "resnet18_imagenet": 11_689_512, "resnet34_imagenet": 21_797_672,
    "resnet50_imagenet": 25_557_032, "mobilenetv1_imagenet": 4_231_976,
    "quick_teacher": 94_186, "quick_student": 5_178,
}
NUM_CLASSES = {"cifar": 100, "imagenet": 1000, "quick": 10}

def num_classes(name):
  return NUM_CLASSES[models.dataset_family(name)]


def abstract_variables(name, dtype=jnp.float32):
  return models.abstract_variables(name, num_classes(name), dtype=dtype)


def rel_err(actual, expected):
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def nhwc_to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


# ------------------------------------------------------------------------------------------
# Registry.
# ------------------------------------------------------------------------------------------


def test_registry_names_and_lookup():
  expected = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
              "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1",
              "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2",
              "ShuffleV1", "ShuffleV2", "ResNet18", "ResNet34", "ResNet50",
              "resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet",
              "mobilenetv1_imagenet", "quick_teacher", "quick_student"}
  assert set(ALL) == expected
  assert ALL == sorted(ALL, key=str.lower)
  assert set(PARAM_COUNTS) == expected
  # Case-insensitive, with the peers' aliases.
  assert models.spec("RESNET8X4").name == "resnet8x4"
  assert models.spec("mobile_half").name == "MobileNetV2"
  assert models.spec("shufflev1").name == "ShuffleV1"
  assert models.spec("MobileNetV1").name == "mobilenetv1_imagenet"
  assert models.spec("vgg13_bn").name == "vgg13"
  assert isinstance(models.create("Resnet8", 10), flax.linen.Module)
  with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*resnet8x4"):
    models.create("resnet9", 10)
  with pytest.raises(ValueError, match="num_classes"):
    models.create("resnet8", 0)
  with pytest.raises(ValueError, match="num_classes"):
    models.create("resnet8", 10.0)
  assert models.create("resnet8", np.int64(10)).num_classes == 10
  assert models.dataset_family("wrn_40_2") == "cifar"
  assert models.input_shape("resnet50_imagenet") == (224, 224, 3)
  assert models.input_shape("quick_student") == (28, 28, 1)
  assert models.feature_dim("resnet32x4") == 256
  assert models.create("ResNet50", 100).feature_dim == 2048
  assert models.create("wrn_40_2", 7, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert models.create("mobile_half", 7).width_mult == 0.5


def test_abstract_variables_are_shapes_of_the_real_ones():
  abstract = models.abstract_variables("quick_student", 10)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  real = jax.jit(models.create("quick_student", 10).init)(jax.random.key(0),
                                                          jnp.zeros((1, 28, 28, 1)))
  assert jax.tree.structure(abstract) == jax.tree.structure(flax.core.unfreeze(real))
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(real)]
  assert abstract["params"]["fc"]["kernel"].shape == (32, 10)


def test_aux_head_is_a_float32_dense_layer_named_fc():
  head = models.AuxHead(5)
  features = jax.random.normal(jax.random.key(1), (3, 8), jnp.bfloat16)
  params = head.init(jax.random.key(0), features)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == {
      "params": {"fc": {"kernel": ((8, 5), jnp.float32), "bias": ((5,), jnp.float32)}}}
  assert np.all(params["params"]["fc"]["bias"] == 0)  # Flax's Dense init: bias 0
  logits = head.apply(params, features)
  assert logits.dtype == jnp.float32
  fc = params["params"]["fc"]
  np.testing.assert_allclose(logits, np.asarray(features, np.float32) @ fc["kernel"] + fc["bias"],
                             rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Parameter counts, dtypes, output shapes (abstract evaluation: nothing is computed).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_and_dtypes(name):
  variables = abstract_variables(name, dtype=jnp.bfloat16)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  assert n == PARAM_COUNTS[name]
  # Parameters and BatchNorm statistics stay float32 whatever the compute dtype.
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("name", ALL)
def test_output_shapes(name):
  h, w, c = models.input_shape(name)  # 32x32x3, 224x224x3 or 28x28x1
  batch, classes = 3, num_classes(name)
  images = jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32)
  variables = abstract_variables(name)
  # Eval mode in bf16: logits still float32.
  bf16 = models.create(name, classes, dtype=jnp.bfloat16)
  logits = jax.eval_shape(lambda v, x: bf16.apply(v, x), variables, images)
  assert (logits.shape, logits.dtype) == ((batch, classes), jnp.float32)
  # Train mode with features: logits, features [B, D] and the new statistics.
  f32 = models.create(name, classes)
  (logits, features), new = jax.eval_shape(
      lambda v, x: f32.apply(v, x, train=True, return_features=True, mutable=["batch_stats"]),
      variables, images)
  assert (logits.shape, logits.dtype) == ((batch, classes), jnp.float32)
  assert (features.shape, features.dtype) == ((batch, models.feature_dim(name)), jnp.float32)
  assert new["batch_stats"] == variables["batch_stats"]  # same shapes and dtypes


def test_wrong_input_channels_is_a_clear_error():
  module = models.create("resnet8", 10)
  with pytest.raises(ValueError, match="3 channels"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))


# ------------------------------------------------------------------------------------------
# PyTorch layouts: the peers' state dicts, the references and the Flax modules agree.
# ------------------------------------------------------------------------------------------

# The peers' own state dicts (mdistiller/RepDistiller models instantiated in PyTorch, 100
# classes; ImageNet 1000), recorded as (number of entries, `state_dict_digest`): the
# references in torch_models.py must produce exactly these names and shapes.
PEER_STATE_DICTS = {
    "resnet8": (56, "c7e36ff449432b48"), "resnet14": (92, "dc881d5570e2148d"),
    "resnet20": (128, "649926fcf6240e69"), "resnet32": (200, "eee1916dfc5fb1e3"),
    "resnet44": (272, "f532b91b42661858"), "resnet56": (344, "2fac08358d132b70"),
    "resnet110": (668, "c6e9176cff1a7fee"), "resnet8x4": (62, "c7572c24d425e097"),
    "resnet32x4": (206, "632a5be2e9d2198d"), "wrn_16_1": (82, "c86622e01c0182ef"),
    "wrn_16_2": (83, "e6a57f3ddf2bbfc4"), "wrn_40_1": (226, "d0752782d5324ce6"),
    "wrn_40_2": (227, "cf299ba03b832625"), "vgg8": (37, "af0a4ac2401e1baa"),
    "vgg11": (58, "c01653e99717593a"), "vgg13": (72, "7ff3cbdb2a68220a"),
    "vgg16": (93, "671ffc473361af0f"), "vgg19": (114, "68d64a6eacb282aa"),
    "MobileNetV2": (320, "da613af71c09a1df"), "ShuffleV1": (296, "a6a7e5aaad503399"),
    "ShuffleV2": (338, "453a84f2a0f166f6"), "ResNet18": (122, "f6f82589f76989e6"),
    "ResNet34": (218, "373af83e7dd653a6"), "ResNet50": (320, "1383964ae529a18c"),
    "resnet18_imagenet": (122, "867b8d8ae95f5a28"),
    "resnet34_imagenet": (218, "d6dbfa48843359d6"),
    "resnet50_imagenet": (320, "2d5b8870b35e1530"),
    "mobilenetv1_imagenet": (164, "ee294b71f5bb13ce"),
}


def state_dict_digest(shapes: dict[str, tuple[int, ...]]) -> str:
  """sha256 (first 16 hex digits) of the sorted lines "key [d0, d1, ...]"."""
  text = "\n".join(f"{k} {list(s)}" for k, s in sorted(shapes.items()))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_peer_state_dicts_cover_every_pytorch_model():
  assert set(PEER_STATE_DICTS) == {n for n in ALL if not n.startswith("quick")}


@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith("quick")])
def test_layouts_match_the_peers_state_dicts(name):
  reference = {k: tuple(v.shape)
               for k, v in torch_models.build(name, num_classes(name)).state_dict().items()}
  assert (len(reference), state_dict_digest(reference)) == PEER_STATE_DICTS[name]
  flax_layout = {k: shape for k, (_, _, shape) in
                 torch_import.torch_layout(name, num_classes(name)).items()}
  assert flax_layout == {k: s for k, s in reference.items()
                         if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------------------
# Numerical parity with the PyTorch references (random weights and BN statistics).
# ------------------------------------------------------------------------------------------


def _input_shape(name):
  # The ImageNet ResNets run at 64x64 to keep the CPU time small (global pooling makes the
  # models size-agnostic); MobileNetV1 runs at the native 224x224.
  h, w, c = models.input_shape(name)
  if models.dataset_family(name) == "imagenet" and name != "mobilenetv1_imagenet":
    return (64, 64, c)
  return (h, w, c)


def standard_batch_norm(variables):
  """`variables` with every BatchNorm as after init: scale 1, bias 0, mean 0, var 1."""
  params = flax.traverse_util.flatten_dict(variables["params"])
  for path in [p for p in params if p[-1] == "scale"]:
    params[path] = jnp.ones_like(params[path])
    params[path[:-1] + ("bias",)] = jnp.zeros_like(params[path[:-1] + ("bias",)])
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "mean" else jnp.ones_like(x),
      variables["batch_stats"])
  return {"params": flax.traverse_util.unflatten_dict(params), "batch_stats": stats}


# Models made of repeated blocks run op by op: each distinct op shape compiles once and serves
# every block (and the family's other depths), while one XLA compile of the whole net grows
# with its depth. The others (many distinct shapes) are cheaper as one jit.
_EAGER = {n for n in ALL if re.fullmatch(r"resnet\d+(x4)?|wrn_\d+_\d", n)}


def flax_outputs(name, variables, images):
  """Everything the parity tests compare, from one jit (or one eager pass) per model."""
  model = models.create(name, num_classes(name))
  model_bf16 = models.create(name, num_classes(name), dtype=jnp.bfloat16)

  def compute(variables, standard, images):
    logits, features = model.apply(variables, images, train=False, return_features=True)
    train_logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return {"logits": logits, "features": features, "train_logits": train_logits,
            "batch_stats": updates["batch_stats"],
            "standard_f32": model.apply(standard, images),
            "standard_bf16": model_bf16.apply(standard, images)}

  if name not in _EAGER:
    compute = jax.jit(compute)
  return compute(variables, standard_batch_norm(variables), images)


@dataclasses.dataclass
class Reference:
  name: str
  images: np.ndarray       # [B, H, W, C]
  variables: dict          # imported from the PyTorch module
  torch_logits: np.ndarray
  torch_train_logits: np.ndarray
  torch_batch_stats: dict  # the module's running statistics after its train-mode forward
  flax: dict               # flax_outputs()


@pytest.fixture(scope="module", params=ALL)
def reference(request):
  """A random PyTorch reference (random weights and BN statistics), its outputs in eval and
  train mode, its weights imported into Flax, and the Flax outputs."""
  name = request.param
  images = np.random.default_rng(0).standard_normal((4, *_input_shape(name)), np.float32)
  x = nhwc_to_torch(images)
  module = torch_models.build(name, num_classes(name))
  torch_models.randomize_(module, seed=0, images=x)
  variables = torch_import.from_state_dict(name, module.state_dict(), num_classes(name))
  with torch.no_grad():
    torch_logits = module.eval()(x).numpy()
    torch_train_logits = module.train()(x).numpy()
  after = torch_import.from_state_dict(name, module.state_dict(), num_classes(name))
  return Reference(name, images, variables, torch_logits, torch_train_logits,
                   after["batch_stats"], flax_outputs(name, variables, images))


def test_eval_logits_and_features_match_pytorch(reference):
  ref, out = reference, reference.flax
  assert out["logits"].dtype == jnp.float32
  assert rel_err(out["logits"], ref.torch_logits) < 1e-4
  # The features are the pooled classifier input: logits = features @ W + b.
  assert out["features"].shape == (4, models.feature_dim(ref.name))
  (head,) = [v for v in ref.variables["params"].values()
             if "kernel" in v and v["kernel"].ndim == 2]
  assert rel_err(out["features"] @ head["kernel"] + head["bias"], out["logits"]) < 1e-5


def test_train_forward_and_batch_stats_match_pytorch(reference):
  ref, out = reference, reference.flax
  assert rel_err(out["train_logits"], ref.torch_train_logits) < 1e-4
  ours = flax.traverse_util.flatten_dict(out["batch_stats"], sep="/")
  theirs = flax.traverse_util.flatten_dict(ref.torch_batch_stats, sep="/")
  assert ours.keys() == theirs.keys()
  for key in ours:  # running_var with the unbiased batch variance, as PyTorch
    np.testing.assert_allclose(ours[key], theirs[key], rtol=2e-3, atol=1e-4, err_msg=key)


def test_bfloat16_forward_close_to_float32(reference):
  # With BatchNorm in its init state: the randomised statistics make the deepest random nets
  # chaotic (a 1e-3 perturbation of the input grows to 20% of the logits), which would test
  # the random net rather than the bf16 path.
  f32, bf16 = reference.flax["standard_f32"], reference.flax["standard_bf16"]
  assert bf16.dtype == jnp.float32
  assert np.all(np.isfinite(bf16))
  assert np.linalg.norm(bf16 - f32) / np.linalg.norm(f32) < 0.05


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_computes_every_conv_and_matmul_in_bfloat16(name):
  # A layer that forgot `dtype` would still give close logits; the traced program shows it.
  module = models.create(name, num_classes(name), dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((2, *models.input_shape(name)), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x))(abstract_variables(name), images)

  def equations(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from equations(sub)

  heavy = [e for e in equations(jaxpr.jaxpr)
           if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert heavy
  for e in heavy:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e


# ------------------------------------------------------------------------------------------
# Grouped convolutions: both lowerings against a float64 NumPy convolution.
# ------------------------------------------------------------------------------------------


def numpy_conv2d(x, kernel, stride, padding, groups):
  """float64 reference of torch's Conv2d(groups=...) in NHWC / HWIO, from its definition:
  out[b, i, j, o] = sum over u, v and the input channels c of o's group of
  x_pad[b, s i + u, s j + v, c] * kernel[u, v, c - first channel of the group, o]."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  k, _, group_in, c_out = kernel.shape
  group_out = c_out // groups
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h_out = (xp.shape[1] - k) // stride + 1
  w_out = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], h_out, w_out, c_out))
  for u in range(k):
    for v in range(k):
      window = xp[:, u:u + stride * (h_out - 1) + 1:stride,
                  v:v + stride * (w_out - 1) + 1:stride]
      for g in range(groups):
        cin = slice(g * group_in, (g + 1) * group_in)
        cout = slice(g * group_out, (g + 1) * group_out)
        out[..., cout] += window[..., cin] @ kernel[u, v, :, cout]
  return out


GROUPED_CASES = {  # (input shape, k, stride, padding, groups, out channels)
    "depthwise 3x3": ((2, 7, 7, 6), 3, 1, 1, 6, 6),
    "depthwise 3x3 stride 2": ((2, 8, 8, 6), 3, 2, 1, 6, 6),
    "depthwise multiplier 2": ((2, 5, 5, 4), 3, 1, 1, 4, 8),
    "grouped 1x1 (ShuffleV1)": ((2, 4, 4, 12), 1, 1, 0, 3, 9),
    "grouped 3x3 stride 2": ((2, 7, 7, 8), 3, 2, 1, 2, 6),
    "ungrouped": ((2, 5, 5, 3), 3, 1, 1, 1, 4),
}


@pytest.mark.parametrize("case", GROUPED_CASES)
@pytest.mark.parametrize("lowering", ["xla", "split"])
def test_grouped_conv_lowerings_match_numpy(case, lowering):
  shape, k, stride, padding, groups, c_out = GROUPED_CASES[case]
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = rng.standard_normal((k, k, shape[-1] // groups, c_out)).astype(np.float32)
  conv = lambda x, w: layers.conv2d(x, w, stride, padding, groups, lowering=lowering)
  expected = numpy_conv2d(x, kernel, stride, padding, groups)
  assert rel_err(jax.jit(conv)(x, kernel), expected) < 1e-5
  # Gradients: the NumPy conv is linear in each argument, so <dy, conv(dx, w)> = <grad_x, dx>.
  dy = rng.standard_normal(expected.shape)
  grad_x, grad_w = jax.grad(lambda x, w: jnp.sum(conv(x, w) * dy), argnums=(0, 1))(x, kernel)
  for _ in range(3):
    dx, dw = rng.standard_normal(shape), rng.standard_normal(kernel.shape)
    np.testing.assert_allclose(
        np.sum(grad_x * dx), np.sum(numpy_conv2d(dx, kernel, stride, padding, groups) * dy),
        rtol=1e-4)
    np.testing.assert_allclose(
        np.sum(grad_w * dw), np.sum(numpy_conv2d(x, dw, stride, padding, groups) * dy),
        rtol=1e-4)


def numpy_depthwise_kernel_grad(x_pad, d_out, k, stride):
  """float64: d kernel[u, v, 0, c] = sum_{b,i,j} x_pad[b, s i + u, s j + v, c] d_out[b, i, j, c]."""
  h_out, w_out = d_out.shape[1:3]
  grad = np.zeros((k, k, 1, x_pad.shape[-1]))
  for u in range(k):
    for v in range(k):
      window = x_pad[:, u::stride, v::stride][:, :h_out, :w_out]
      grad[u, v, 0] = np.einsum("bijc,bijc->c", window.astype(np.float64), d_out)
  return grad


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_kernel_grad_in_batch_chunks(stride):
  """The chunked kernel gradient (chunk j = examples j, j + n, ...) sums the whole batch."""
  rng = np.random.default_rng(1)
  x_pad = rng.standard_normal((6, 7, 7, 5)).astype(np.float32)
  h_out = (7 - 3) // stride + 1
  d_out = rng.standard_normal((6, h_out, h_out, 5)).astype(np.float32)
  expected = numpy_depthwise_kernel_grad(x_pad, d_out, 3, stride)
  one_example = 7 * 7 * 5 * 4
  for chunk_bytes in (one_example, 2 * one_example, 3 * one_example, 2 ** 21):  # 6, 3, 2, 1 chunks
    grad = jax.jit(functools.partial(cpu_conv.depthwise_kernel_grad, k=3, stride=stride,
                                     chunk_bytes=chunk_bytes, shards=1))(x_pad, d_out)
    assert rel_err(grad, expected) < 1e-5, chunk_bytes


@pytest.mark.parametrize("mesh_size, batch", [(8, 64), (4, 12), (2, 6)])
def test_depthwise_kernel_grad_keeps_a_sharded_batch_sharded(mesh_size, batch):
  """A batch sharded over all 8 devices or over a smaller mesh, one example per device per
  chunk (8, 3, 3 chunks): every chunk is spread over the mesh, so XLA never gathers the batch,
  and the devices' partial sums are added once (one all-reduce, after the loop)."""
  rng = np.random.default_rng(2)
  x_pad = rng.standard_normal((batch, 6, 6, 3)).astype(np.float32)
  d_out = rng.standard_normal((batch, 4, 4, 3)).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()[:mesh_size]), ("data",))
  args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x_pad, d_out)]
  grad_fn = jax.jit(functools.partial(cpu_conv.depthwise_kernel_grad, k=3, stride=1,
                                      chunk_bytes=6 * 6 * 3 * 4))
  assert rel_err(grad_fn(*args), numpy_depthwise_kernel_grad(x_pad, d_out, 3, 1)) < 1e-5
  hlo = grad_fn.lower(*args).compile().as_text()
  assert "all-gather" not in hlo
  assert hlo.count("all-reduce(") == 1


def numpy_depthwise_input_grad(d_out, kernel, x_shape, stride, padding):
  """float64 adjoint of the depthwise conv (multiplier 1) in x: d x_pad[b, s i + u, s j + v, c]
  += kernel[u, v, 0, c] * d_out[b, i, j, c], then the padding cropped."""
  d_out, kernel = np.asarray(d_out, np.float64), np.asarray(kernel, np.float64)
  b, h, w, c = x_shape
  k, (h_out, w_out) = kernel.shape[0], d_out.shape[1:3]
  d_pad = np.zeros((b, h + 2 * padding, w + 2 * padding, c))
  for u in range(k):
    for v in range(k):
      d_pad[:, u:u + stride * (h_out - 1) + 1:stride,
            v:v + stride * (w_out - 1) + 1:stride] += d_out * kernel[u, v, 0]
  return d_pad[:, padding:padding + h, padding:padding + w]


def depthwise_grads(x, kernel, dy, stride, padding):
  """Gradients in (x, kernel) of sum(conv2d(x, kernel, split lowering) * dy)."""
  conv = lambda x, w: layers.conv2d(x, w, stride, padding, x.shape[-1], lowering="split")
  return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) * dy), argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_split_bfloat16_gradients_round_once(k):
  """bf16 inputs: the k * k taps' contributions to d x are summed in float32 and rounded once,
  as a bf16 convolution's gradient is (summed in bf16, 5x5 was 3.5x less accurate)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 9, 9, 8)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((k, k, 1, 8)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((4, 9, 9, 8)), jnp.bfloat16)
  grad_x, grad_w = depthwise_grads(x, kernel, dy, 1, k // 2)
  assert grad_x.dtype == grad_w.dtype == jnp.bfloat16
  x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  expected_x = numpy_depthwise_input_grad(dy64, kernel, x.shape, 1, k // 2)
  x_pad = np.pad(x64, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  expected_w = numpy_depthwise_kernel_grad(x_pad, dy64, k, 1)
  rms = lambda a, ref: np.sqrt(np.mean((np.asarray(a, np.float64) - ref) ** 2 / np.mean(ref ** 2)))
  # One rounding to bf16 (8 significant bits) gives a relative RMS error of about 1.7e-3.
  assert rms(grad_x, expected_x) < 2.5e-3
  assert rms(grad_w, expected_w) < 2.5e-3


def test_depthwise_split_gradients_in_several_batch_chunks(monkeypatch):
  """Through conv2d, with chunks of one example per shard (batch 6: 3 chunks of 2)."""
  monkeypatch.setattr(cpu_conv, "depthwise_kernel_grad",
                      functools.partial(cpu_conv.depthwise_kernel_grad, chunk_bytes=1))
  rng = np.random.default_rng(4)
  x = rng.standard_normal((6, 8, 7, 5)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 1, 5)).astype(np.float32)
  dy = rng.standard_normal((6, 4, 4, 5)).astype(np.float32)
  grad_x, grad_w = depthwise_grads(x, kernel, dy, 2, 1)
  x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  assert rel_err(grad_w, numpy_depthwise_kernel_grad(x_pad, dy, 3, 2)) < 1e-5
  assert rel_err(grad_x, numpy_depthwise_input_grad(dy, kernel, x.shape, 2, 1)) < 1e-5


def test_depthwise_split_computes_float64_in_float64():
  rng = np.random.default_rng(5)
  x, kernel = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 1, 3))
  dy = rng.standard_normal((2, 5, 5, 3))
  with jax.enable_x64(True):
    y = layers.conv2d(jnp.asarray(x), jnp.asarray(kernel), 1, 1, 3, lowering="split")
    grad_x, grad_w = depthwise_grads(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy), 1, 1)
  assert y.dtype == grad_x.dtype == grad_w.dtype == jnp.float64
  x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_allclose(y, numpy_conv2d(x, kernel, 1, 1, 3), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(grad_w, numpy_depthwise_kernel_grad(x_pad, dy, 3, 1), rtol=1e-12)
  np.testing.assert_allclose(grad_x, numpy_depthwise_input_grad(dy, kernel, x.shape, 1, 1),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, kernel_shape, stride, padding", [
    ((2, 5, 5, 3), (3, 3, 1, 3), 1, 1),
    ((2, 6, 6, 2), (3, 3, 1, 2), 2, 1),
    ((3, 4, 5, 2), (3, 3, 1, 4), 1, 0),  # channel multiplier 2
])
def test_depthwise_split_custom_vjp_against_numerical_gradients(shape, kernel_shape, stride,
                                                                padding):
  """The custom VJP against finite differences of the conv itself (float64, reverse mode:
  the custom VJP has no forward mode), with several batch chunks."""
  rng = np.random.default_rng(6)
  groups = shape[-1]
  conv = lambda x, w: layers.conv2d(x, w, stride, padding, groups, lowering="split")
  with jax.enable_x64(True):
    x, kernel = jnp.asarray(rng.standard_normal(shape)), jnp.asarray(
        rng.standard_normal(kernel_shape))
    jax.test_util.check_grads(conv, (x, kernel), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    chunked = functools.partial(cpu_conv.depthwise_kernel_grad, chunk_bytes=1, shards=1)
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(cpu_conv, "depthwise_kernel_grad", chunked)
      jax.test_util.check_grads(conv, (x, kernel), order=1, modes=["rev"], atol=1e-6,
                                rtol=1e-6)


def test_grouped_conv_split_keeps_bfloat16():
  x = jnp.ones((1, 4, 4, 6), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 1, 6), jnp.bfloat16)
  y = layers.conv2d(x, kernel, 1, 1, 6, lowering="split")
  assert y.dtype == jnp.bfloat16 and float(y[0, 1, 1, 0]) == 9.0
  with pytest.raises(ValueError, match="lowering"):
    layers.conv2d(x, kernel, 1, 1, 6, lowering="grouped")
  with pytest.raises(ValueError, match="input channels 6 must be groups"):
    layers.conv2d(x, kernel, 1, 1, 3, lowering="split")


# ------------------------------------------------------------------------------------------
# BatchNorm semantics, initialisation, sharding.
# ------------------------------------------------------------------------------------------


def test_batch_norm_is_pytorch_batch_norm():
  x = np.random.default_rng(0).standard_normal((4, 3, 3, 5), np.float32) * 2 + 1
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  scale = np.linspace(0.5, 1.5, 5, dtype=np.float32)
  bias = np.linspace(-1, 1, 5, dtype=np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": np.full(5, 0.3, np.float32),
                               "var": np.full(5, 2.0, np.float32)}}
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])

  n = 4 * 3 * 3
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))  # biased
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * 0.3 + 0.1 * mean, rtol=1e-6)
  # running_var takes the *unbiased* batch variance.
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 * 2.0 + 0.1 * var * n / (n - 1), rtol=1e-6)

  reference = torch.nn.BatchNorm2d(5)
  with torch.no_grad():
    reference.weight.copy_(torch.from_numpy(scale))
    reference.bias.copy_(torch.from_numpy(bias))
    reference.running_mean.fill_(0.3)
    reference.running_var.fill_(2.0)
    expected = reference(nhwc_to_torch(x)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], reference.running_var, rtol=1e-6)

  # Eval mode: the running statistics, nothing mutated.
  y_eval = bn.apply(variables, x, train=False)
  np.testing.assert_allclose(y_eval, (x - 0.3) / np.sqrt(2.0 + 1e-5) * scale + bias, atol=1e-5)

  # bf16 compute: bf16 out, float32 statistics.
  y16, updates16 = layers.BatchNorm(dtype=jnp.bfloat16).apply(
      variables, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
  assert y16.dtype == jnp.bfloat16
  assert updates16["batch_stats"]["var"].dtype == jnp.float32


def test_initialisation_follows_the_reference_models():
  x = jnp.zeros((1, 32, 32, 3))
  # ResNet: conv Kaiming-normal fan_out, BN 1 / 0, classifier PyTorch default.
  v = models.create("resnet8", 100).init(jax.random.key(0), x)
  kernel = v["params"]["layer3_0"]["conv2"]["kernel"]  # 3x3, 64 -> 64
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / (9 * 64)), rtol=0.03)
  bn, stats = v["params"]["bn1"], v["batch_stats"]["bn1"]
  assert np.all(bn["scale"] == 1) and np.all(bn["bias"] == 0)
  assert np.all(stats["mean"] == 0) and np.all(stats["var"] == 1)
  fc, bound = v["params"]["fc"], 1 / math.sqrt(64)
  assert np.max(np.abs(fc["kernel"])) <= bound and np.max(np.abs(fc["kernel"])) > 0.95 * bound
  assert np.max(np.abs(fc["bias"])) <= bound and np.std(fc["bias"]) > 0.4 * bound
  # VGG: conv bias 0, classifier N(0, 0.01) with bias 0.
  v = models.create("vgg8", 100).init(jax.random.key(0), x)
  assert np.all(v["params"]["block0_0"]["bias"] == 0)
  np.testing.assert_allclose(np.std(v["params"]["classifier"]["kernel"]), 0.01, rtol=0.05)
  assert np.all(v["params"]["classifier"]["bias"] == 0)
  # WRN: classifier bias 0.
  v = models.create("wrn_16_1", 100).init(jax.random.key(0), x)
  assert np.all(v["params"]["fc"]["bias"] == 0)
  # PyTorch default (ShuffleNets): U(+-1/sqrt(fan_in)), fan_in counting the groups.
  conv = layers.Conv(240, 1, groups=3)
  k = conv.init(jax.random.key(0), jnp.zeros((1, 4, 4, 480)))["params"]["kernel"]
  assert k.shape == (1, 1, 160, 240)
  bound = 1 / math.sqrt(160)
  assert np.max(np.abs(k)) <= bound and np.max(np.abs(k)) > 0.99 * bound


def test_sharded_train_forward_matches_single_device():
  # BatchNorm's batch statistics under jit over a globally sharded batch are the global
  # batch's: the sharded forward equals the unsharded one.
  model = models.create("resnet8", 10)
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  variables = model.init(jax.random.key(0), images[:1])

  def forward(v, x):
    return model.apply(v, x, train=True, return_features=True, mutable=["batch_stats"])

  (logits, features), updates = jax.jit(forward)(variables, images)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  sharded = jax.jit(forward, in_shardings=(replicated, batch),
                    out_shardings=((batch, batch), replicated))
  x = jax.device_put(images, batch)
  assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape[0] == 2
  (logits8, features8), updates8 = sharded(jax.device_put(variables, replicated), x)

  np.testing.assert_allclose(logits8, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features8, features, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(updates8), jax.tree.leaves(updates)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Per-device statistics (2 images each) would differ from the global ones by far more.
  per_device = jax.jit(forward)(variables, images[:2])[1]
  assert not np.allclose(jax.tree.leaves(per_device)[0], jax.tree.leaves(updates)[0], atol=1e-3)
