"""Full training-step throughput: jaxkd against PyTorch eager doing the same work.

One step = the frozen teacher's inference forward + the student's forward, backward and SGD
update (momentum 0.9, weight decay 5e-4), under each objective's loss. jaxkd runs the jitted
`jaxkd.train.step.train_step` (or `seeds_train_step` for several seeds) built from a config's
`jaxkd.config.resolve`, without a dataset; PyTorch runs the reference models of
`tests/torch_models.py` in eager mode, channels-last, with bf16 autocast when --dtype is
bfloat16 (the AMP of the peers), and the peers' loss formulas (`torch_objectives` of
benchmarks/bench_losses.py). Both run on the same device in the same process, row by row, on
the same random normalised images (the input pipeline is benchmarked apart, in
benchmarks/bench_input_pipeline.py). Step time is the median of
--repeats steps after --warmup steps, compile excluded, each step synchronised
(`jax.block_until_ready` / `torch.cuda.synchronize`).

Reported per row: ms/step and images/s of both, the ratio jaxkd/PyTorch in images/s, the step
time of each reweighting (and DKD) against plain KD, XLA's FLOP count of the step and the
achieved FLOP/s against the device's peak, and the projected wall-clock of the recipe (CIFAR:
240 epochs of 50,000 // batch steps; ImageNet: 100 epochs of 1,281,167 // batch steps; step
time only: no input pipeline, evaluation or checkpoints). Each objective other than CE and KD
is timed alternating step by step with plain KD, so that its overhead is a paired estimate that
a varying machine load does not bias. With --seeds, the KD step again with num_seeds = S
students in one program, once per --seeds-per-vmap strategy (all S vectorised in one vmap,
or a loop of single students); images/s counts all S students' images.

  python benchmarks/bench_train_step.py                 # default matrix for this device
  python benchmarks/bench_train_step.py --pairs resnet32x4-resnet8x4 --objectives kd,erkd \\
      --batch 64,512 --repeats 50
  python benchmarks/bench_train_step.py --pairs resnet34_imagenet-resnet18_imagenet \\
      --imagenet-batch 8 --objectives kd --seeds 1 --repeats 3 --out /tmp/bench   # CPU smoke
  python benchmarks/bench_train_step.py --no-torch --dtype bfloat16
  taskset -c 0 python benchmarks/bench_train_step.py  # a CPU shared with other jobs: one
                                        # core, one thread per framework (see warn_if_loaded)

Defaults: on a GPU the full matrix (all pairs, batch 64 and 512, ImageNet at 256, all six
objectives, bf16, seeds 1 and 5 for KD); on CPU a subset that finishes in about 20 minutes on 2
cores (resnet56-resnet20 and resnet32x4-resnet8x4 at batch 64, float32). Writes
benchmarks/results/train-<device>.{json,md}.
"""

import os

# JAX would otherwise reserve 75% of the GPU's memory at start-up and leave PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import busy_cores, device_name, device_slug, load_torch_models  # noqa: E402
from bench_common import median_time, RESULTS  # noqa: E402
from bench_losses import torch_objectives  # noqa: E402

from jaxkd import config as jconfig  # noqa: E402
from jaxkd import models  # noqa: E402
from jaxkd.models import layers  # noqa: E402
from jaxkd.train import step as jstep  # noqa: E402

# name -> (teacher, student); the CIFAR-100 pairs of the peers' tables and one ImageNet pair.
PAIRS = {
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "vgg13-vgg8": ("vgg13", "vgg8"),
    "resnet32x4-ShuffleV2": ("resnet32x4", "ShuffleV2"),
    "ResNet50-MobileNetV2": ("ResNet50", "MobileNetV2"),
    "resnet34_imagenet-resnet18_imagenet": ("resnet34_imagenet", "resnet18_imagenet"),
    "resnet14-resnet8": ("resnet14", "resnet8"),
}
CPU_PAIRS = ("resnet56-resnet20", "resnet32x4-resnet8x4")
# The smallest CIFAR pair, for smoke runs (tests/test_benchmarks.py): the mechanics of every
# script at a fraction of the compile time; in no default matrix.
SMOKE_PAIRS = ("resnet14-resnet8",)

# jaxkd method -> the table's label and the objective of `torch_objectives` (None: CE only).
OBJECTIVES = {
    "ce": ("CE", None),
    "kd": ("KD", "KD"),
    "erkd": ("ER-KD", "ER-KD"),
    "eakd": ("EA-KD", "EA-KD"),
    "ipwd": ("IPWD", "IPWD (likelihood_ratio)"),
    "dkd": ("DKD", "DKD"),
}

# family -> (classes, training images, epochs of the recipe).
RECIPES = {"cifar": (100, 50_000, 240), "imagenet": (1000, 1_281_167, 100)}

# Dense peak TFLOP/s by device kind (first match wins): (bfloat16, float32). float32 convs
# and matmuls run as TF32 on these GPUs under XLA's and cuDNN's default precision.
PEAK_TFLOPS = (("H100 PCIe", (756.0, 378.0)), ("H100", (989.0, 494.7)),
               ("H200", (989.0, 494.7)), ("A100", (312.0, 156.0)))


# ---------------------------------------------------------------------------------------------
# Shared pieces.


def recipe(student: str, batch: int) -> tuple[int, int, tuple[int, int, int], int]:
  """(classes, steps per epoch, image shape, epochs) of the student's dataset at `batch`."""
  classes, images, epochs = RECIPES[models.dataset_family(student)]
  return classes, images // batch, models.input_shape(student), epochs


def loss_constants(method: str) -> tuple[float, float]:
  """(CE weight, weight of the distillation term) of jaxkd's CIFAR preset at epoch 1.

  The ImageNet pair uses the same constants: they change no work, only numbers.
  """
  c = jconfig.apply_method(jconfig.default_config(), method)
  ramp = 1.0 / c.loss.dkd_warmup_epochs if c.loss.base == "dkd" else 1.0  # DKD's warm-up
  return c.loss.ce_weight, c.loss.kd_weight * ramp


def random_batch(shape, batch: int, classes: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch, *shape), np.float32),
          "label": rng.integers(0, classes, batch).astype(np.int32),
          "index": np.arange(batch, dtype=np.int32)}


def timed(fn, repeats: int, warmup: int) -> tuple[float, float]:
  """(median seconds, interquartile range / median) of `fn` over `repeats` runs."""
  durations = []

  def recorded():
    start = time.perf_counter()
    fn()
    durations.append(time.perf_counter() - start)

  median = median_time(recorded, repeats, warmup)
  q25, q75 = np.percentile(durations[warmup:], [25, 75])
  return median, (q75 - q25) / median


def timed_paired(fn, ref, repeats: int, warmup: int) -> tuple[float, float, float, float]:
  """`fn` timed alternating with `ref` (plain KD), so that both see the same load.

  Returns (median seconds of fn, its IQR / median, the median of the per-pair ratios
  fn / ref − 1 (the overhead), and the IQR of those ratios (its noise)). The order within
  a pair alternates, so that neither always runs right after the other.
  """
  for _ in range(warmup):
    fn()
    ref()
  mine, theirs = [], []
  for i in range(repeats):
    for f in ((fn, ref) if i % 2 == 0 else (ref, fn)):
      start = time.perf_counter()
      f()
      (mine if f is fn else theirs).append(time.perf_counter() - start)
  ratios = np.asarray(mine) / np.asarray(theirs)
  q = np.percentile(mine, [25, 75])
  r = np.percentile(ratios, [25, 75])
  median = float(np.median(mine))
  return median, (q[1] - q[0]) / median, float(np.median(ratios)) - 1, float(r[1] - r[0])


def peak_tflops(device: str, dtype: str) -> float | None:
  for kind, peaks in PEAK_TFLOPS:
    if kind.lower() in device.lower():
      return peaks[0] if dtype == "bfloat16" else peaks[1]
  return None  # CPUs and unlisted accelerators


def xla_flops(compiled) -> float | None:
  """FLOPs of one call from XLA's cost analysis (a dict, or a list of one, by version)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops", -1) >= 0 else None


# ---------------------------------------------------------------------------------------------
# jaxkd.


def jax_config(teacher: str, student: str, method: str, batch: int, dtype: str, seeds: int):
  c = jconfig.default_config()
  jconfig.apply_method(c, method)
  c.mode = "teacher" if method == "ce" else "distill"   # CE: the student alone, no teacher
  c.model, c.teacher.model = student, teacher
  c.batch_size, c.dtype, c.num_seeds = batch, dtype, seeds
  return c


def calibrated_teacher(teacher, images: jax.Array, key: jax.Array) -> dict:
  """Random teacher variables whose BN running statistics are `images`' batch statistics.

  With unit statistics a randomly initialised deep teacher gives logits in the thousands in
  eval mode, the students diverge within a few steps and the benchmark would time NaN math.
  One train-mode pass gives new = old + m · (batch − old) for every layer; solve for batch.
  """
  variables = teacher.init(key, images[:1], train=False)
  _, updates = jax.jit(functools.partial(teacher.apply, train=True, mutable=["batch_stats"]))(
      variables, images)
  m = layers.BatchNorm.momentum
  stats = jax.tree.map(lambda new, old: old + (new - old) / m, updates["batch_stats"],
                       variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


def jax_step(teacher: str, student: str, method: str, batch: int, dtype: str, seeds: int,
             seeds_per_vmap: int | None = None):
  """The compiled jaxkd step: (run, compile seconds, FLOPs, last metrics, compiled).

  `run()` takes one synchronised step, feeding each step's state to the next.

  With seeds > 1, `seeds_per_vmap` of the students are vectorised together (None: all).
  """
  spec = jconfig.resolve(jax_config(teacher, student, method, batch, dtype, seeds))
  classes, steps_per_epoch, shape, _ = recipe(student, batch)
  cfg = jstep.make_step_config(
      model=spec.model, num_classes=classes, objective=spec.objective,
      optimizer=spec.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=spec.num_epochs,
      teacher_model=spec.teacher_model, dtype=spec.dtype)
  init = functools.partial(jstep.init_train_state, cfg, image_shape=shape,
                           feature_dim=models.feature_dim(student))
  batches = [random_batch(shape, batch, classes, seed=s) for s in range(seeds)]
  if seeds == 1:
    state = jax.jit(init)(jax.random.PRNGKey(0))
    data = jax.device_put(batches[0])
    step_fn = jstep.train_step
  else:  # S independent students, each its own initialisation and batch; one shared teacher
    state = jax.jit(jax.vmap(init))(jax.random.split(jax.random.PRNGKey(0), seeds))
    data = jax.device_put(jax.tree.map(lambda *x: np.stack(x), *batches))
    step_fn = functools.partial(jstep.seeds_train_step, seeds_per_vmap=seeds_per_vmap)
  teacher_vars = None
  if cfg.teacher is not None:
    teacher_vars = calibrated_teacher(cfg.teacher, jnp.asarray(batches[0]["image"]),
                                      jax.random.PRNGKey(1))
  start = time.perf_counter()
  compiled = jax.jit(functools.partial(step_fn, cfg), donate_argnums=(0,)).lower(
      state, data, teacher_vars).compile()
  compile_s = time.perf_counter() - start
  carry = {"state": state, "metrics": None}

  def run():  # the state is donated: each step consumes the previous one
    carry["state"], carry["metrics"] = compiled(carry["state"], data, teacher_vars)
    jax.block_until_ready(carry)

  return run, compile_s, xla_flops(compiled), lambda: carry["metrics"], compiled


# ---------------------------------------------------------------------------------------------
# PyTorch eager.


def import_torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch, load_torch_models()


def torch_device(torch):
  on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
  if on_gpu:
    torch.backends.cudnn.benchmark = True  # as the peers' training scripts set it
  return torch.device("cuda" if on_gpu else "cpu")


def penultimate_hook(torch, model) -> dict:
  """Captures the input of the model's last linear layer (the pooled features) each forward:
  the reference models have no features output, and IPWD's auxiliary head needs them."""
  head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
  store = {}
  head.register_forward_pre_hook(lambda module, args: store.__setitem__("features", args[0]))
  return store


def torch_step(torch, torch_models, device, teacher: str, student: str, method: str,
               batch: int, dtype: str):
  """One PyTorch eager training step of the same work: (run, whether the last loss was finite)."""
  F = torch.nn.functional
  classes, _, shape, _ = recipe(student, batch)
  cl = torch.channels_last
  data = random_batch(shape, batch, classes, seed=0)
  images = torch.from_numpy(data["image"].transpose(0, 3, 1, 2)).to(device).contiguous(
      memory_format=cl)
  labels = torch.from_numpy(data["label"]).long().to(device)
  ce_w, kd_w = loss_constants(method)
  label, objective = OBJECTIVES[method]
  distill = torch_objectives(torch)[objective] if objective else None

  tnet = None
  if distill is not None:
    # Sane eval-mode BN statistics from a few images; on the CPU, where randomize_ draws
    # its numbers, before the move to the device.
    tnet = torch_models.randomize_(torch_models.build(teacher, classes), seed=1,
                                   images=images[:32].cpu())
    tnet = tnet.to(device).to(memory_format=cl).eval()
  snet = torch_models.build(student, classes).to(device).to(memory_format=cl).train()
  params = list(snet.parameters())
  aux = store = None
  if label == "IPWD":
    aux = torch.nn.Linear(models.feature_dim(student), classes).to(device)
    store = penultimate_hook(torch, snet)
    params += list(aux.parameters())
  opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
  amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  last = {}

  def run():
    with torch.autocast(**amp):
      with torch.no_grad():
        t_logits = tnet(images).float() if tnet is not None else None
      logits = snet(images).float()
    loss = ce_w * F.cross_entropy(logits, labels)
    aux_logits = None
    if aux is not None:  # trained by CE on detached features; its logits feed the weights
      aux_logits = aux(store["features"].detach().float())
      loss = loss + F.cross_entropy(aux_logits, labels)
    if distill is not None:
      loss = loss + kd_w * distill(logits, t_logits, aux_logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync()
    last["loss"] = loss.detach()

  return run, lambda: bool(torch.isfinite(last["loss"]).item())


# ---------------------------------------------------------------------------------------------
# Rows.


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def measure(side: str, build, ref, args, row: dict) -> Any:
  """Times one side ("jax" or "torch") of a row into `row`; returns its run for reuse.

  With `ref` (plain KD's run), the row is timed alternating with it and its overhead
  against KD is the paired estimate. Failures (e.g. out of memory at a large batch) are
  recorded in the row and the benchmark goes on.
  """
  try:
    run, extra = build()
    if ref is None:
      sec, spread = timed(run, args.repeats, args.warmup)
    else:
      sec, spread, over, over_spread = timed_paired(run, ref, args.repeats, args.warmup)
      row.update({f"{side}_overhead_vs_kd": over, f"{side}_overhead_spread": over_spread})
    row.update({f"{side}_ms": sec * 1e3, f"{side}_img_s": row["num_seeds"] * row["batch"] / sec,
                f"{side}_spread": spread}, **extra())
    return run
  except Exception as e:  # pylint: disable=broad-except
    row[f"{side}_error"] = _error(e)
    return None


def measure_group(args, device, torch_env, pair: str, batch: int, methods, seeds: int,
                  seeds_per_vmap: int | None = None):
  """The rows of one pair, batch and seed count (and, for several seeds, how many are
  vectorised together); plain KD first, kept as the reference."""
  teacher, student = PAIRS[pair]
  methods = sorted(methods, key=lambda m: m != "kd")
  torch_dev = None if torch_env is None else torch_device(torch_env[0])
  refs, rows = {}, []
  for method in methods:
    row = dict(pair=pair, teacher=teacher, student=student, batch=batch,
               objective=OBJECTIVES[method][0], method=method, dtype=args.dtype,
               num_seeds=seeds, seeds_per_vmap=seeds_per_vmap)
    paired = method not in ("kd", "ce")

    def build_jax(method=method, row=row):
      run, compile_s, flops, metrics, _ = jax_step(teacher, student, method, batch, args.dtype,
                                                seeds, seeds_per_vmap)
      row.update(jax_compile_s=compile_s,
                 gflop_per_step=None if flops is None else flops / 1e9)
      finite = lambda: dict(jax_finite=bool(np.all(np.isfinite(np.asarray(metrics()["loss"])))))
      return run, finite

    run = measure("jax", build_jax, refs.get("jax") if paired else None, args, row)
    if method == "kd":
      refs["jax"] = run
    del run  # frees this row's state before the next one allocates
    if torch_env is not None and seeds == 1:
      def build_torch(method=method):
        run, finite = torch_step(*torch_env, torch_dev, teacher, student, method, batch,
                                 args.dtype)
        return run, lambda: dict(torch_finite=finite())
      run = measure("torch", build_torch, refs.get("torch") if paired else None, args, row)
      if method == "kd":
        refs["torch"] = run
      del run
      if torch_dev.type == "cuda":
        torch_env[0].cuda.empty_cache()
    derive(row, device)
    print(format_line(row), flush=True)
    rows.append(row)
  return sorted(rows, key=lambda r: list(OBJECTIVES).index(r["method"]))


def derive(row: dict, device: str) -> None:
  """Ratio, FLOP/s and the recipe projection of a measured row, in place."""
  if "jax_ms" not in row:
    return
  if row.get("torch_img_s"):
    row["ratio"] = row["jax_img_s"] / row["torch_img_s"]
  sec = row["jax_ms"] / 1e3
  if row.get("gflop_per_step"):
    row["achieved_tflops"] = row["gflop_per_step"] / 1e3 / sec
    peak = peak_tflops(device, row["dtype"])
    row["peak_tflops"] = peak
    row["mfu"] = None if peak is None else row["achieved_tflops"] / peak
  _, steps_per_epoch, _, epochs = recipe(row["student"], row["batch"])
  row["recipe"] = f"{epochs} epochs x {steps_per_epoch} steps"
  row["projected_recipe_h"] = epochs * steps_per_epoch * sec / 3600


def format_line(r: dict) -> str:
  head = f"{r['pair']:>36} b{r['batch']:<4} {r['objective']:>6} S={r['num_seeds']}"
  if r.get("seeds_per_vmap"):
    head += f" ({_strategy(r)})"
  if "jax_ms" not in r:
    return f"{head}: jaxkd failed: {r.get('jax_error')}"
  line = f"{head}: jaxkd {r['jax_ms']:9.1f} ms {r['jax_img_s']:8.1f} img/s"
  if "torch_ms" in r:
    line += f" | torch {r['torch_ms']:9.1f} ms {r['torch_img_s']:8.1f} img/s x{r['ratio']:.2f}"
  elif "torch_error" in r:
    line += f" | torch failed: {r['torch_error']}"
  return line


# ---------------------------------------------------------------------------------------------
# Output.


def load_average() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def cpu_affinity() -> list[int] | None:
  """The cores this process may run on (fewer than all under `taskset`)."""
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return None


def warn_if_loaded(busy: float | None, cores: list[int] | None) -> None:
  """On a CPU shared with other jobs, a framework whose threads wait at a barrier for a
  descheduled sibling (PyTorch's OpenMP pool) slows down by an order of magnitude; one thread
  per framework, pinned, gives stable and comparable figures."""
  n = len(cores) if cores else os.cpu_count()
  if jax.devices()[0].platform == "cpu" and busy is not None and busy > 0.25 * n and n > 1:
    print(f"warning: other jobs keep {busy} of {n} cores busy; for "
          f"stable figures run under `taskset -c 0` (one core, one thread per framework).",
          file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def _fmt(x, spec: str, none: str = "-") -> str:
  return none if x is None else format(x, spec)


def _duration(hours: float | None) -> str:
  if hours is None:
    return "-"
  return f"{hours * 60:.1f} min" if hours < 2 else f"{hours:.1f} h"


def _overhead(r: dict, side: str) -> str:
  over = r.get(f"{side}_overhead_vs_kd")
  return "-" if over is None else f"{over:+.1%} ±{r[f'{side}_overhead_spread'] / 2:.1%}"


def markdown(rows: list[dict], meta: dict) -> str:
  busy = meta.get("busy_cores_before")
  under_load = busy is not None and busy > 0.25 * meta["cpu_count"]
  lines = [
      f"# Training-step benchmark on {meta['device']}", "",
      f"{meta['date']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
      + ("; no PyTorch baseline." if meta["torch_device"] is None else
         f"; PyTorch on {meta['torch_device']}, torch.get_num_threads() = "
         f"{meta['torch_threads']}."), "",
      "One step = teacher inference forward + student forward/backward/SGD update on random "
      f"normalised images (no input pipeline). Median of {meta['repeats']} steps after "
      f"{meta['warmup']} warm-up steps, compile excluded, every step synchronised. "
      "jaxkd: the jitted `jaxkd.train.step.train_step`; PyTorch: eager, the reference models of "
      "`tests/torch_models.py`, channels-last, bf16 autocast when the dtype is bfloat16, the "
      "peers' loss formulas. CE = the student alone (no teacher).", "",
      "Columns: *ms* = step time; *img/s* = images per second (all students' images for "
      "S > 1); *spread* = interquartile range / median of jaxkd's steps (the timing noise); "
      "*jaxkd/torch* = ratio of images/s (> 1: jaxkd faster); *vs KD* = step time against "
      "plain KD of the same pair and batch, timed alternating with it step by step (so that "
      "both see the same load): the median of the per-step ratios − 1, ± half their "
      "interquartile range (the noise); *TFLOP/s* = XLA's "
      "cost-analysis FLOPs of the jaxkd step / its step time, with the fraction of the "
      "device's dense peak where known (None on CPU); *recipe* = projected wall-clock of the "
      "recipe from the step time alone (CIFAR: 240 epochs x 50,000 // batch steps; ImageNet: "
      "100 epochs x 1,281,167 // batch steps; no input pipeline, evaluation or checkpoints).",
      "",
      f"Other jobs kept {busy} of {meta['cpu_count']} cores busy just before the run "
      f"(/proc/stat over 1 s); 1-minute load average {meta['load_before']} before, "
      f"{meta['load_after']} after (it lingers, and counts this run); the process ran on "
      f"cores {meta['cpu_affinity']}."
      + (" **Other jobs were running on this machine: the timings were taken under load and "
         "are noisy.**" if under_load else ""), ""]
  lines += ["| pair | batch | objective | dtype | jaxkd ms | jaxkd img/s | spread | torch ms | "
            "torch img/s | jaxkd/torch | jaxkd vs KD | torch vs KD | GFLOP/step | "
            "TFLOP/s (peak) | recipe |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in (r for r in rows if r["num_seeds"] == 1):
    if "jax_ms" not in r:
      lines.append(f"| {r['pair']} | {r['batch']} | {r['objective']} | {r['dtype']} | "
                   f"failed: {r.get('jax_error')} |" + " |" * 10)
      continue
    mfu = r.get("mfu")
    tflops = _fmt(r.get("achieved_tflops"), ".3f") + (
        f" ({mfu:.1%})" if mfu is not None else " (None)")
    lines.append(
        f"| {r['pair']} | {r['batch']} | {r['objective']} | {r['dtype']} | {r['jax_ms']:.1f} | "
        f"{r['jax_img_s']:.1f} | {r['jax_spread']:.1%} | {_fmt(r.get('torch_ms'), '.1f')} | "
        f"{_fmt(r.get('torch_img_s'), '.1f')} | {_fmt(r.get('ratio'), '.2f')} | "
        f"{_overhead(r, 'jax')} | {_overhead(r, 'torch')} | "
        f"{_fmt(r.get('gflop_per_step'), '.1f')} | {tflops} | "
        f"{_duration(r.get('projected_recipe_h'))} |")
  bad = [f"{r['pair']} b{r['batch']} {r['objective']} S={r['num_seeds']}" for r in rows
         if r.get("jax_finite") is False or r.get("torch_finite") is False]
  if bad:
    lines += ["", "Rows whose last loss was not finite: " + ", ".join(bad) + "."]
  lines += seeds_table(rows)
  if meta.get("notes"):
    lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
  return "\n".join(lines) + "\n"


def seeds_table(rows: list[dict]) -> list[str]:
  """num_seeds: images/s of S students in one program against one student."""
  multi = [r for r in rows if r["num_seeds"] > 1 and "jax_img_s" in r]
  if not multi:
    return []
  single = {(r["pair"], r["batch"], r["method"]): r for r in rows if r["num_seeds"] == 1}
  out = ["", "## num_seeds: S students in one jitted step", "",
         "*seeds vectorised*: how many students share one `jax.vmap` (their convolutions "
         "become one grouped convolution); the groups are unrolled one after another in the "
         "same program. *speed-up* = S students' images/s over one student's.", "",
         "| pair | batch | objective | S | seeds vectorised | S=1 img/s (ms) | S img/s (ms) | "
         "speed-up in img/s |",
         "|---|---|---|---|---|---|---|---|"]
  for r in multi:
    one = single.get((r["pair"], r["batch"], r["method"]))
    if one is None or "jax_img_s" not in one:
      continue
    out.append(f"| {r['pair']} | {r['batch']} | {r['objective']} | {r['num_seeds']} | "
               f"{_strategy(r)} | {one['jax_img_s']:.1f} ({one['jax_ms']:.0f}) | {r['jax_img_s']:.1f} "
               f"({r['jax_ms']:.0f}) | {r['jax_img_s'] / one['jax_img_s']:.2f}x |")
  return out


def _strategy(r: dict) -> str:
  k = r.get("seeds_per_vmap") or r["num_seeds"]
  return f"{k} (vmap)" if k >= r["num_seeds"] else ("1 (loop)" if k == 1 else f"{k} x vmap")


def write_results(rows: list[dict], meta: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, f"train-{device_slug(meta['device'])}"
                      + (f"-{meta['tag']}" if meta.get("tag") else ""))
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(rows, meta))
  print("wrote", stem + ".json", stem + ".md")


# ---------------------------------------------------------------------------------------------
# Main.


def parse_args(argv, on_gpu: bool):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", default=",".join(
      [x for x in PAIRS if x not in SMOKE_PAIRS] if on_gpu else CPU_PAIRS),
                 help="comma list of " + ", ".join(PAIRS))
  p.add_argument("--objectives", default=",".join(OBJECTIVES),
                 help="comma list of " + ", ".join(OBJECTIVES))
  p.add_argument("--batch", default="64,512" if on_gpu else "64",
                 help="comma list of batch sizes for the CIFAR pairs")
  p.add_argument("--imagenet-batch", default="256" if on_gpu else "8",
                 help="comma list of batch sizes for the ImageNet pair")
  p.add_argument("--seeds", default="1,5",
                 help="num_seeds values; S > 1 runs the --seed-objectives only")
  p.add_argument("--seed-objectives", default="kd")
  p.add_argument("--seeds-per-vmap", default="0,1",
                 help="for S > 1: comma list of how many students are vectorised together "
                      "(0: all S in one vmap; 1: a loop of single students)")
  p.add_argument("--repeats", type=int, default=50 if on_gpu else 10)
  p.add_argument("--warmup", type=int, default=5 if on_gpu else 2)
  p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32",
                 choices=jconfig.DTYPES)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--note", action="append", default=[], help="a line for the .md's notes")
  p.add_argument("--tag", default="", help="suffix of the result files: train-<device>-<tag>")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  ints = lambda s: [int(x) for x in s.split(",") if x]
  args.pairs = [x for x in args.pairs.split(",") if x]
  args.objectives = [x for x in args.objectives.split(",") if x]
  args.seed_objectives = [x for x in args.seed_objectives.split(",") if x]
  args.batch, args.imagenet_batch, args.seeds = (ints(args.batch), ints(args.imagenet_batch),
                                                  ints(args.seeds))
  args.seeds_per_vmap = ints(args.seeds_per_vmap)
  for name, known in (("pair", PAIRS), ("objective", OBJECTIVES)):
    for x in getattr(args, name + "s") if name == "pair" else args.objectives:
      if x not in known:
        p.error(f"unknown {name} {x!r}; known: {', '.join(known)}")
  return args


def plan(args) -> list[tuple[str, int, list[str], int, int | None]]:
  """(pair, batch, methods, seeds, seeds_per_vmap) of every group of rows timed against
  one plain KD."""
  groups = []
  for pair in args.pairs:
    imagenet = models.dataset_family(PAIRS[pair][1]) == "imagenet"
    for batch in args.imagenet_batch if imagenet else args.batch:
      groups.append((pair, batch, args.objectives, 1, None))
      groups += [(pair, batch, args.seed_objectives, s, min(k or s, s))
                 for s in args.seeds if s > 1 for k in args.seeds_per_vmap]
  return groups


def main(argv=None):
  on_gpu = jax.devices()[0].platform == "gpu"
  args = parse_args(argv, on_gpu)
  device = device_name()
  torch_env = None if args.no_torch else import_torch()
  meta = dict(device=device, versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
              python=sys.version.split()[0], cpu_count=os.cpu_count(),
              cpu_affinity=cpu_affinity(), load_before=load_average(), busy_cores_before=busy_cores(),
              repeats=args.repeats, warmup=args.warmup,
              argv=sys.argv[1:] if argv is None else list(argv),
              torch_device=None if torch_env is None else str(torch_device(torch_env[0])),
              torch_threads=None if torch_env is None else torch_env[0].get_num_threads(),
              notes=list(args.note), tag=args.tag)
  warn_if_loaded(meta["busy_cores_before"], meta["cpu_affinity"])
  start = time.perf_counter()
  rows = [row for group in plan(args)
          for row in measure_group(args, device, torch_env, *group)]
  meta.update(load_after=load_average(), wall_s=round(time.perf_counter() - start, 1))
  write_results(rows, meta, args.out)


if __name__ == "__main__":
  main()
