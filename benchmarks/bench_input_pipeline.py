"""Input pipeline throughput: host pipeline (grain) per worker count, and the device path.

    python benchmarks/bench_input_pipeline.py [--out benchmarks/results] [--quick]

Measures images/s of
  * the host pipeline on CIFAR-style data (32x32 PNG records: decode, pad-crop-flip,
    normalise) and on ImageNet-style data (generated JPEGs of ImageNet's typical size:
    decode at reduced size, random-resized-crop 224, flip, normalise), for 0, 1 and 2
    grain worker processes;
  * the device-resident path (jitted gather + crop + flip + normalise) at batch 64 and 512;
from datasets prepared here with jaxkd's own builders (generated archives, array_record).
Throughput excludes the first batches (worker start-up, compilation; the time to the
first batch is reported apart).
Writes benchmarks/results/input-<device>.{json,md}; the notes compare against the training
step of benchmarks/results/train-<device>.json (bench_train_step.py) where that file exists.
"""

import argparse
import datetime
import functools
import io
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np


def _generate_cifar(root: str, n: int, seed: int = 0) -> str:
  """cifar-100-binary.tar.gz with n random train images (and a token test split)."""
  import tarfile  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  with tarfile.open(os.path.join(root, "cifar-100-binary.tar.gz"), "w:gz") as tar:
    files = {"fine_label_names.txt": "\n".join(f"c{i}" for i in range(100)).encode(),
             "coarse_label_names.txt": "\n".join(f"s{i}" for i in range(20)).encode()}
    for split, count in (("train", n), ("test", 16)):
      rec = rng.integers(0, 256, (count, 3074), dtype=np.uint8)
      rec[:, 0] %= 20
      rec[:, 1] %= 100
      files[f"{split}.bin"] = rec.tobytes()
    for name, data in files.items():
      info = tarfile.TarInfo(f"cifar-100-binary/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return root


def _generate_imagenet(root: str, n: int, seed: int = 0) -> str:
  """ILSVRC2012-style tars of n photo-like JPEGs (smooth content, ~500x375, q90)."""
  import tarfile  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  synsets = ["n01440764", "n01443537", "n01484850", "n01491361"]

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  os.makedirs(root, exist_ok=True)
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_train.tar"), "w") as outer:
    for s, syn in enumerate(synsets):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        for i in range(n // len(synsets)):
          w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
          small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
          img = np.asarray(PIL.Image.fromarray(small).resize((w, h), PIL.Image.BICUBIC))
          img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
          out = io.BytesIO()
          PIL.Image.fromarray(img).save(out, format="JPEG", quality=90)
          add(inner, f"{syn}_{i}.JPEG", out.getvalue())
      add(outer, f"{syn}.tar", buf.getvalue())
  return root


def _time_iterator(it, batches: int, warmup: int, repeats: int = 3):
  """(seconds to the first batch, [images/s of `repeats` windows of `batches` batches]).

  With grain workers each worker's first batch pays its start-up: warm up past them. Other
  jobs on the machine make single windows vary, so each figure is the median of several.
  """
  t0 = time.perf_counter()
  next(it)
  first_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    next(it)
  rates = []
  for _ in range(repeats):
    n = 0
    t1 = time.perf_counter()
    for _ in range(batches):
      n += len(next(it)["label"])
    rates.append(n / (time.perf_counter() - t1))
  return first_s, rates


def bench_host(name: str, data_dir: str, global_batch: int, batches: int,
               workers: list[int]) -> list[dict]:
  import jaxkd.data as jd  # pylint: disable=g-import-not-at-top
  rows = []
  for w in workers:
    with jd.host_iterator(name, data_dir=data_dir, global_batch=global_batch, seed=0,
                          worker_count=w, process_index=0, process_count=1) as it:
      first_s, rates = _time_iterator(it, batches, warmup=max(1, 2 * w))
    rows.append({"path": "host", "dataset": name, "batch": global_batch, "workers": w,
                 "images_per_s": round(float(np.median(rates)), 1),
                 "windows_images_per_s": [round(r, 1) for r in rates],
                 "first_batch_s": round(first_s, 2)})
    print(rows[-1], flush=True)
  return rows


def _batches_per_s(args) -> float:
  """images/s of building batches synchronously in this process (no grain)."""
  import jaxkd.data as jd  # pylint: disable=g-import-not-at-top
  name, data_dir, batch, steps = args
  it = jd.host_iterator(name, data_dir=data_dir, global_batch=batch, seed=0,
                        process_index=0, process_count=1)
  it.batch_at(0)
  rates = []
  for r in range(3):
    t = time.perf_counter()
    for s in range(1, steps + 1):
      it.batch_at(r * steps + s)
    rates.append(steps * batch / (time.perf_counter() - t))
  return float(np.median(rates))


def bench_side_by_side(name: str, data_dir: str, global_batch: int, steps: int) -> dict:
  """Batch building in 1 process, then in 2 processes at once: how the cores scale."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  one = _batches_per_s((name, data_dir, global_batch, steps))
  with multiprocessing.get_context("spawn").Pool(2) as pool:
    two = pool.map(_batches_per_s, [(name, data_dir, global_batch, steps)] * 2)
  row = {"path": "host, BatchFn without grain", "dataset": name, "batch": global_batch,
         "one_process_images_per_s": round(one, 1),
         "two_processes_images_per_s": [round(x, 1) for x in two]}
  print(row, flush=True)
  return row


def bench_device(batches: list[int], steps: int, n: int = 50_000) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import jaxkd.data as jd  # pylint: disable=g-import-not-at-top
  from jaxkd import sharding as jsharding  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(0)
  arrays = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 100, n).astype(np.int32),
            "index": np.arange(n, dtype=np.int32)}
  data = jsharding.put_replicated(arrays, mesh)
  perm = jnp.asarray(jd.epoch_permutation(0, 0, n))
  sharding = NamedSharding(mesh, P("data"))
  rows = []
  for b in batches:
    fn = jax.jit(functools.partial(jd.device_batch, ds_spec=jd.spec("cifar100"),
                                   global_batch=b, batch_sharding=sharding),
                 out_shardings=sharding)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(data, perm, jnp.int32(0), jnp.int32(0), seed=jnp.int32(0)))
    first_s = time.perf_counter() - t0
    spe = n // b
    rates = []
    for _ in range(3):
      t1 = time.perf_counter()
      for s in range(1, steps + 1):
        out = fn(data, perm, jnp.int32(s % spe), jnp.int32(0), seed=jnp.int32(0))
      jax.block_until_ready(out)
      rates.append(steps * b / (time.perf_counter() - t1))
    ips = float(np.median(rates))
    rows.append({"path": "device", "dataset": "cifar100-shaped", "batch": b,
                 "devices": len(jax.devices()), "images_per_s": round(ips, 1),
                 "first_batch_s": round(first_s, 2)})
    print(rows[-1], flush=True)
  return rows


def _step_rates(slug: str) -> tuple[float, float] | None:
  """(ResNet-20 alone, resnet56->resnet20 KD) training-step images/s at batch 64 from this
  device's train-step results, or None where they were not measured."""
  path = pathlib.Path(__file__).resolve().parent / "results" / f"train-{slug}.json"
  try:
    rows = json.loads(path.read_text())["rows"]
  except (OSError, ValueError, KeyError):
    return None
  rate = {r["objective"]: r.get("jax_img_s") for r in rows
          if r.get("pair") == "resnet56-resnet20" and r.get("batch") == 64
          and r.get("num_seeds") == 1}
  if not rate.get("CE") or not rate.get("KD"):
    return None
  return rate["CE"], rate["KD"]


def _notes(results: list[dict], scaling: list[dict], slug: str) -> list[str]:
  """What the figures mean for the training step they feed."""
  def best(path, dataset):
    return max(r["images_per_s"] for r in results
               if r["path"] == path and r["dataset"] == dataset)

  cifar_host, in_host = best("host", "cifar100"), best("host", "imagenet2012")
  dev = best("device", "cifar100-shaped")
  per_proc = {r["dataset"]: r for r in scaling}
  rates = _step_rates(slug)
  if rates is None:
    notes = [f"CIFAR host pipeline, best worker count: {cifar_host:.0f} img/s; device-resident "
             f"path: {dev:.0f} img/s, which also costs the host nothing per step; "
             f"ImageNet-style host pipeline (JPEG ~500x375 decode + random-resized-crop 224): "
             f"{in_host:.0f} img/s (no train-step results for this device to compare with)."]
  else:
    ce, kd = rates
    notes = [
        f"CIFAR host pipeline, best worker count: {cifar_host:.0f} img/s = "
        f"{cifar_host / ce:.0f}x the ResNet-20 train step ({ce:.0f} img/s) and "
        f"{cifar_host / kd:.0f}x the resnet56->resnet20 KD step ({kd:.0f} img/s) on this "
        f"device (train-{slug}.md, batch 64).",
        f"Device-resident path: {dev:.0f} img/s = {dev / kd:.0f}x the KD step; it also "
        "costs the host nothing per step.",
        f"ImageNet-style host pipeline (JPEG ~500x375 decode + random-resized-crop 224): "
        f"{in_host:.0f} img/s here, {in_host / kd:.1f}x even the 32x32 CIFAR KD step; a "
        "224x224 ResNet step on this device is far slower still."]
  notes.append(
      "Worker processes on this machine: "
      + "; ".join(f"{k}: 0/1/2 workers give "
                  + "/".join(f"{r['images_per_s']:.0f}" for r in results
                             if r["path"] == "host" and r["dataset"] == k)
                  + f" img/s; one process building batches alone "
                  f"{v['one_process_images_per_s']:.0f} img/s, two side by side "
                  f"{' + '.join(f'{x:.0f}' for x in v['two_processes_images_per_s'])}"
                  for k, v in per_proc.items())
      + ". Where two processes side by side do not double one's throughput, decoding does not "
      "scale with this machine's cores and the in-process figure is the cost of all of them. "
      "On a GPU host with real cores, if workers scale with cores, feeding a step of S img/s "
      f"takes about S / {per_proc['imagenet2012']['one_process_images_per_s']:.0f} ImageNet "
      "workers; normalize=False (uint8 batches) moves 4x fewer bytes to the accelerator.")
  return notes


def _markdown(result: dict) -> str:
  lines = [f"# Input pipeline throughput on {result['device']}", "",
           f"{result['date']}; {result['machine']}; jax {result['versions']['jax']}, "
           f"grain {result['versions']['grain']}, tfds {result['versions']['tfds']}.",
           "Images/s after warm-up (time to the first batch, i.e. worker start-up or "
           "compilation, shown apart).", "",
           "| path | data | batch | workers / devices | images/s | first batch (s) |",
           "|---|---|---|---|---|---|"]
  for r in result["results"]:
    who = r.get("workers", r.get("devices"))
    lines.append(f"| {r['path']} | {r['dataset']} | {r['batch']} | {who} | "
                 f"{r['images_per_s']:.0f} | {r['first_batch_s']} |")
  lines += ["", "## Against the training step", ""]
  lines += [f"- {line}" for line in result["notes"]]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--quick", action="store_true", help="fewer batches (smoke run)")
  args = parser.parse_args(argv)
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import jaxkd.data as jd  # pylint: disable=g-import-not-at-top
  import bench_common  # pylint: disable=g-import-not-at-top  (imports jax: kept out of workers)

  scale = 0.25 if args.quick else 1.0
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    cifar = _generate_cifar(os.path.join(tmp, "cifar"), 8192)
    jd.prepare("cifar100", os.path.join(tmp, "dd"), manual_dir=cifar)
    results += bench_host("cifar100", os.path.join(tmp, "dd"), 256,
                          max(2, int(24 * scale)), [0, 1, 2])
    scaling = [bench_side_by_side("cifar100", os.path.join(tmp, "dd"), 256,
                                  max(2, int(12 * scale)))]
    imagenet = _generate_imagenet(os.path.join(tmp, "imagenet"), 256)
    jd.prepare("imagenet2012", os.path.join(tmp, "dd"), manual_dir=imagenet)
    results += bench_host("imagenet2012", os.path.join(tmp, "dd"), 32,
                          max(2, int(24 * scale)), [0, 1, 2])
    scaling.append(bench_side_by_side("imagenet2012", os.path.join(tmp, "dd"), 32,
                                      max(2, int(12 * scale))))
  results += bench_device([64, 512], max(5, int(50 * scale)))

  device = bench_common.device_name()
  result = {
      "device": device, "date": datetime.date.today().isoformat(),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"{len(jax.devices())} {jax.devices()[0].platform} device(s)",
      "versions": {"jax": jax.__version__, "grain": grain.__version__,
                   "tfds": tfds.__version__},
      "results": results, "scaling": scaling,
      "notes": _notes(results, scaling, bench_common.device_slug(device))}
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"input-{bench_common.device_slug(device)}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(_markdown(result))
  print(_markdown(result))


if __name__ == "__main__":
  main()
