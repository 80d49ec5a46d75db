"""Model-zoo throughput: Flax (jitted) against the same PyTorch reference, in one run.

  python benchmarks/bench_models.py                  # a representative subset
  python benchmarks/bench_models.py --models resnet8x4,resnet32x4 --steps 10
  python benchmarks/bench_models.py --models MobileNetV2 --steps 10 --tag mobilenetv2

For each model, images/s of
  * forward: eval mode (what a teacher costs in distillation);
  * forward+backward: train mode, cross-entropy, gradients w.r.t. all parameters and the new
    BatchNorm statistics (no optimizer update: that is the trainer's, not the model's);
at the recipe batch sizes (CIFAR 64; ImageNet --imagenet_batch, small by default on a CPU),
median over --steps timed calls after warm-up (the first call, with the compile, is reported
apart). PyTorch runs eager, NCHW and channels_last (and bf16 autocast on CUDA; and with one
thread on a CPU, see `torch_variants`); Flax in float32 (and bfloat16 on accelerators). Both
get the same weights and images.

Results: benchmarks/results/models-<device>[-<tag>].json and .md. The load average of the machine is
recorded too: on a shared CPU other processes change the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_common import device_name, device_slug, load_torch_models, RESULTS
import jaxkd.models as models
from jaxkd.models import layers, torch_import

# The usual CIFAR teacher/student pair, the depthwise and grouped-conv students, an ImageNet
# ResNet and the quick teacher: about 5 minutes on a shared 2-core CPU.
DEFAULT_MODELS = ("resnet8x4", "resnet32x4", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                  "resnet18_imagenet", "quick_teacher")
NUM_CLASSES = {"cifar": 100, "imagenet": 1000, "quick": 10}


def median_time(fn, warmup: int, steps: int) -> tuple[float, float]:
  """(first call seconds, median seconds of `steps` calls after `warmup` more calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def has_grouped_conv(name, variables, images) -> bool:
  """Whether the model has a convolution with groups > 1 (traced with the 'xla' lowering)."""
  model = models.create(name, NUM_CLASSES[models.dataset_family(name)])
  with grouped_conv_lowering("xla"):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images[:1])
  return any(e.primitive.name == "conv_general_dilated" and e.params["feature_group_count"] > 1
             for e in jaxpr.eqns)


@contextlib.contextmanager
def grouped_conv_lowering(lowering: str):
  """Traces inside use `lowering` for grouped convolutions instead of the library's 'auto'."""
  original = layers.conv2d
  layers.conv2d = functools.partial(original, lowering=lowering)
  try:
    yield
  finally:
    layers.conv2d = original


def bench_flax(name, variables, images, labels, dtype, warmup, steps, lowering="auto"):
  model = models.create(name, NUM_CLASSES[models.dataset_family(name)], dtype=dtype)

  @jax.jit
  def forward(v, x):
    return model.apply(v, x, train=False)

  @jax.jit
  def forward_backward(v, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                    train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
    (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
    return grads, updates

  x, y = jnp.asarray(images), jnp.asarray(labels)
  with grouped_conv_lowering(lowering):  # the first call of each traces and compiles
    fwd = median_time(lambda: forward(variables, x).block_until_ready(), warmup, steps)
    bwd = median_time(lambda: jax.block_until_ready(forward_backward(variables, x, y)),
                      warmup, steps)
  return fwd, bwd


def bench_torch(module, images, labels, channels_last, amp, warmup, steps):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  module = module.to(device=device, memory_format=memory_format)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  x = x.contiguous(memory_format=memory_format)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=amp)

  def forward():
    with torch.no_grad(), autocast():
      module(x)
    sync()

  def forward_backward():
    with autocast():
      loss = F.cross_entropy(module(x), y)
    loss.backward()
    module.zero_grad(set_to_none=True)
    sync()

  module.eval()
  fwd = median_time(forward, warmup, steps)
  module.train()
  bwd = median_time(forward_backward, warmup, steps)
  return fwd, bwd


def torch_variants(threads: int, nchw: bool) -> list[dict]:
  """The PyTorch configurations to time: eager; on CUDA NCHW, channels_last and bf16 AMP.

  On a CPU channels_last (faster than NCHW in every model we timed; NCHW with `nchw`) with
  `threads` threads and with one: with other processes on the machine, OpenMP's barriers make
  multi-threaded eager PyTorch up to 50x slower (every op waits for a thread that lost its
  core), while one thread is not affected. The best variant counts.
  """
  import torch  # pylint: disable=g-import-not-at-top
  v = lambda name, cl, amp=False, t=threads: {"name": name, "channels_last": cl, "amp": amp,
                                              "threads": t}
  if torch.cuda.is_available():
    return [v("eager NCHW fp32", False), v("eager channels_last fp32", True),
            v("eager channels_last bf16 AMP", True, True)]
  variants = [v(f"eager NCHW {threads}T", False)] if nchw else []
  variants.append(v(f"eager channels_last {threads}T", True))
  if threads > 1:
    variants.append(v("eager channels_last 1T", True, t=1))
  return variants


def run(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch_models = load_torch_models()
  # XLA's CPU backend flushes denormals to zero; eager PyTorch does not unless asked, and one
  # layer of denormals can make it 10x slower. Same arithmetic for both.
  torch.set_flush_denormal(True)
  on_accelerator = jax.devices()[0].platform != "cpu"
  flax_dtypes = [jnp.float32] + ([jnp.bfloat16] if on_accelerator else [])
  rows = []
  for name in args.models:
    spec = models.spec(name)
    family = spec.dataset_family
    batch = args.imagenet_batch if family == "imagenet" else args.batch
    classes = NUM_CLASSES[family]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *spec.input_shape), np.float32)
    labels = rng.integers(0, classes, batch)
    # Random weights, BatchNorm statistics calibrated on the batch: realistic activations.
    module = torch_models.randomize_(
        torch_models.build(spec.name, classes), seed=0,
        images=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    variables = torch_import.from_state_dict(spec.name, module.state_dict(), classes)
    params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    row = {"model": spec.name, "family": family, "batch": batch,
           "input": list(spec.input_shape), "params": int(params), "results": []}
    # Grouped convs: the default lowering ('split' on CPU, 'xla' elsewhere) and the other one.
    lowerings = ["auto"]
    if has_grouped_conv(spec.name, variables, images):
      lowerings.append("split" if on_accelerator else "xla")
    for dtype, lowering in itertools.product(flax_dtypes, lowerings):
      (c_f, t_f), (c_b, t_b) = bench_flax(spec.name, variables, images, labels, dtype,
                                          args.warmup, args.steps, lowering)
      variant = f"jit {jnp.dtype(dtype).name}" + (
          "" if lowering == "auto" else f", grouped conv {lowering}")
      row["results"].append({"framework": "flax", "variant": variant,
                             "forward_img_s": batch / t_f, "train_img_s": batch / t_b,
                             "forward_first_call_s": c_f, "train_first_call_s": c_b})
      print(f"{spec.name:20s} flax  {row['results'][-1]['variant']:22s} "
            f"fwd {batch / t_f:8.1f} img/s  fwd+bwd {batch / t_b:8.1f} img/s  "
            f"(compile+first {c_f:.1f}s / {c_b:.1f}s)", flush=True)
    if not args.no_torch:
      for variant in torch_variants(args.torch_threads, args.torch_nchw):
        torch.set_num_threads(variant["threads"])
        (_, t_f), (_, t_b) = bench_torch(module, images, labels, variant["channels_last"],
                                         variant["amp"], args.warmup, args.steps)
        row["results"].append({"framework": "torch", "variant": variant["name"],
                               "forward_img_s": batch / t_f, "train_img_s": batch / t_b})
        print(f"{spec.name:20s} torch {variant['name']:22s} fwd {batch / t_f:8.1f} img/s  "
              f"fwd+bwd {batch / t_b:8.1f} img/s", flush=True)
    rows.append(row)
  return rows


def markdown(report: dict) -> str:
  lines = [f"# Model zoo throughput on {report['device']}", "",
           f"{report['date']}; jax {report['versions']['jax']}, flax "
           f"{report['versions']['flax']}, torch {report['versions']['torch']}; median of "
           f"{report['steps']} calls after {report['warmup']} warm-up calls; load average "
           f"{report['load_average_before'][0]:.1f} before, "
           f"{report['load_average_after'][0]:.1f} after (this machine has "
           f"{os.cpu_count()} cores).", "",
           "images/s, higher is better. forward = eval mode; fwd+bwd = train-mode forward, "
           "cross-entropy and gradients (no optimizer update). Flax is jitted; PyTorch eager "
           "(nT = n intra-op threads). flax/torch = best Flax over best PyTorch variant. "
           "Grouped convolutions (jaxkd.models.layers.conv2d) are lowered 'split' on CPU "
           "(depthwise as fused multiply-adds, other groups as separate convolutions) and "
           "'xla' (one grouped convolution) elsewhere; 'grouped conv xla/split' rows time the "
           "other lowering.", "",
           "On a CPU shared with other jobs, multi-threaded eager PyTorch is slowed most "
           "(OpenMP barriers wait for descheduled threads): its 1-thread figure is the fair "
           "one then. XLA's thread pool is less affected.", "",
           "| model | batch | framework | variant | forward img/s | fwd+bwd img/s |",
           "|---|---|---|---|---|---|"]
  for row in report["rows"]:
    for r in row["results"]:
      lines.append(f"| {row['model']} | {row['batch']} | {r['framework']} | {r['variant']} | "
                   f"{r['forward_img_s']:.1f} | {r['train_img_s']:.1f} |")
    flax_rows = [r for r in row["results"] if r["framework"] == "flax"]
    torch_rows = [r for r in row["results"] if r["framework"] == "torch"]
    if flax_rows and torch_rows:
      f_best = max(r["forward_img_s"] for r in flax_rows)
      b_best = max(r["train_img_s"] for r in flax_rows)
      lines.append(f"| {row['model']} | | **flax/torch** | best vs best | "
                   f"**{f_best / max(r['forward_img_s'] for r in torch_rows):.2f}x** | "
                   f"**{b_best / max(r['train_img_s'] for r in torch_rows):.2f}x** |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                 help="comma-separated jaxkd model names, or 'all'")
  p.add_argument("--batch", type=int, default=64, help="CIFAR/quick batch (the recipe's 64)")
  p.add_argument("--imagenet_batch", type=int, default=None,
                 help="ImageNet batch (default 8 on CPU, 256 on an accelerator)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
  p.add_argument("--steps", type=int, default=None,
                 help="timed calls (default 3 on CPU, 20 on an accelerator)")
  p.add_argument("--no_torch", action="store_true", help="Flax only")
  p.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                 help="PyTorch intra-op threads (a one-thread variant is timed too on CPU)")
  p.add_argument("--torch_nchw", action="store_true", help="also time NCHW PyTorch on CPU")
  p.add_argument("--tag", default="", help="suffix of the result files: models-<device>-<tag>")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  on_cpu = jax.devices()[0].platform == "cpu"
  args.models = models.available() if args.models == "all" else [
      m.strip() for m in args.models.split(",") if m.strip()]
  for m in args.models:
    models.spec(m)  # fail before any work on an unknown name
  args.imagenet_batch = args.imagenet_batch or (8 if on_cpu else 256)
  args.steps = args.steps or (3 if on_cpu else 20)

  import torch  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()
  start = time.time()
  rows = run(args)
  report = {
      "device": device_name(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "torch": torch.__version__, "python": platform.python_version()},
      "warmup": args.warmup, "steps": args.steps,
      "load_average_before": load_before, "load_average_after": os.getloadavg(),
      "wall_s": round(time.time() - start, 1),
      "rows": rows,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = str(out / (f"models-{device_slug(report['device'])}"
                    + (f"-{args.tag}" if args.tag else "")))
  pathlib.Path(stem + ".json").write_text(json.dumps(report, indent=1) + "\n")
  pathlib.Path(stem + ".md").write_text(markdown(report))
  print(f"wrote {stem}.json and .md in {report['wall_s']} s")


if __name__ == "__main__":
  main()
