"""The fused lm_head + KD loss against materialised logits: time, peak memory, FLOP/s.

Forward + backward (gradients with respect to the student's hidden states and lm_head kernel)
of one distillation loss over N tokens and a vocabulary of V, three ways, in the same run:

  dense   jnp with materialised logits: z = h W in float32, `jaxkd.losses.kd_loss` with the
          weights of `jaxkd.weighting`, jitted, differentiated by autodiff;
  fused   `jaxkd.lm.distill_loss` (chunks of --chunk-size tokens);
  torch   the same formulas in PyTorch eager with materialised logits, as the PyTorch KD
          recipes write them (bf16 matmul, float32 softmax), `loss.backward()`.

Rounds interleave the three (and every weighting) so that a busy machine slows all alike; the
median over rounds is reported. Memory: for JAX the compiled program's temporaries plus its
outputs (`memory_analysis()`); for torch the allocator's peak on a GPU, and on the CPU the
growth of the peak resident set (VmHWM) of a fresh process running one step (inputs
excluded). FLOP/s
count the matmul floor of the loss, 2·N·V·(Ht + 3·Hs) (teacher logits, student logits, and
the two student gradients), whatever an implementation actually does.

  python benchmarks/bench_lm_loss.py                       # the default sizes, to results/
  python benchmarks/bench_lm_loss.py --sizes 2048x32000x512 --rounds 2 --no-torch --tag small
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import busy_cores, device_name, device_slug, RESULTS
from jaxkd import lm, losses, weighting

DEFAULT_SIZES = ("2048x32000x512", "8192x32000x512", "2048x128256x512", "2048x32000x2048")
WEIGHTINGS = ("none", "entropy", "adaptive_entropy")


def parse_size(text):
  n, v, h = (int(x) for x in text.split("x"))
  return n, v, h


def floor_flops(n, v, h):
  return 2 * n * v * (h + 3 * h)


def make_inputs(n, v, h, dtype, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  scale = h ** -0.5
  kernel = lambda key: (scale * jax.random.normal(key, (h, v))).astype(dtype)
  return (jax.random.normal(k[0], (n, h), dtype), kernel(k[1]),
          jax.random.normal(k[2], (n, h), dtype), kernel(k[3]))


def jax_loss(kind, weighting_name, chunk_size, temperature):
  w = None if weighting_name == "none" else weighting_name

  def fused(hs, ws, ht, wt):
    return lm.distill_loss(hs, ws, ht, wt, temperature=temperature, weighting=w,
                           chunk_size=chunk_size)

  def dense(hs, ws, ht, wt):
    zs = jnp.dot(hs, ws, preferred_element_type=jnp.float32)
    zt = jnp.dot(ht, wt, preferred_element_type=jnp.float32)
    weights = None
    if w == "entropy":
      weights = weighting.teacher_entropy_weights(zt, temperature=temperature)
    elif w == "adaptive_entropy":
      weights = weighting.adaptive_entropy_weights(zt, zs, temperature=temperature)
    return losses.kd_loss(zs, zt, temperature=temperature, weights=weights)
  f = fused if kind == "fused" else dense
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def jax_memory(step, args):
  m = step.lower(*args).compile().memory_analysis()
  return m.temp_size_in_bytes + m.output_size_in_bytes


# --------------------------------------------------------------------------------------------
# PyTorch eager, materialised logits.


def torch_loss(torch, weighting_name, temperature):
  def step(hs, ws, ht, wt):
    zs = (hs @ ws).float()
    with torch.no_grad():
      zt = (ht @ wt).float()
    ls = torch.log_softmax(zs / temperature, -1)
    lt = torch.log_softmax(zt / temperature, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    if weighting_name == "none":
      w = torch.ones_like(kl)
    else:
      with torch.no_grad():
        h_t = -(lt.exp() * lt).sum(-1)
        w = h_t
        if weighting_name == "adaptive_entropy":
          h_s = -(ls.exp() * ls).sum(-1)
          w = 0.5 * h_t * (1 + h_s / np.log(zs.shape[-1]))
    loss = temperature**2 * (w * kl).mean()
    loss.backward()
    return loss
  return step


def torch_inputs(torch, args, device):
  hs, ws, ht, wt = (torch.from_numpy(np.array(a.astype(jnp.float32))).to(device).bfloat16()
                    for a in args)
  return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def torch_sync(torch, device):
  if device != "cpu":
    torch.cuda.synchronize()


def torch_peak_worker(size, weighting_name, temperature):
  """One step in this fresh process; prints the peak memory it added, in bytes."""
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  n, v, h = parse_size(size)
  # Inputs straight from torch: a peak-RSS baseline taken after building them through JAX
  # and NumPy would already exceed the step's own peak at small N.
  shapes = ((n, h), (h, v), (n, h), (h, v))
  args = [torch.randn(s, dtype=torch.bfloat16, device=device) * (h ** -0.5 if s[0] == h else 1)
          for s in shapes]
  args[0].requires_grad_()
  args[1].requires_grad_()
  step = torch_loss(torch, weighting_name, temperature)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(*args)
    print(torch.cuda.max_memory_allocated() - base)
  else:
    # VmHWM, not ru_maxrss: the latter survives exec, so a child of a big benchmark process
    # would start with its parent's high-water mark.
    base = _peak_rss()
    step(*args)
    print(_peak_rss() - base)


def _peak_rss() -> int:
  """This process's peak resident set (VmHWM), in bytes."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def torch_peak(size, weighting_name, temperature):
  out = subprocess.run([sys.executable, __file__, "--torch-peak-worker", size,
                        "--weightings", weighting_name, "--temperature", str(temperature)],
                       capture_output=True, text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def run_size(size, opts, torch):
  n, v, h = parse_size(size)
  args = make_inputs(n, v, h, jnp.bfloat16)
  impls = {}
  for w in opts.weightings:
    for kind in ("dense", "fused"):
      step = jax_loss(kind, w, opts.chunk_size, opts.temperature)
      impls[(kind, w)] = dict(run=lambda s=step: jax.block_until_ready(s(*args)),
                              memory=jax_memory(step, args))
    if torch is not None:
      device = "cuda" if torch.cuda.is_available() else "cpu"
      t_args = torch_inputs(torch, args, device)
      t_step = torch_loss(torch, w, opts.temperature)

      def run(t_step=t_step, t_args=t_args, device=device):
        for a in t_args[:2]:
          a.grad = None
        t_step(*t_args)
        torch_sync(torch, device)
      impls[("torch", w)] = dict(run=run, memory=torch_peak(size, w, opts.temperature))
  for impl in impls.values():  # compile and warm up
    impl["run"]()
  times = {key: [] for key in impls}
  cpu = {key: [] for key in impls}
  for _ in range(opts.rounds):
    for key, impl in impls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      impl["run"]()
      times[key].append(time.perf_counter() - start)
      cpu[key].append(time.process_time() - start_cpu)
  rows = []
  for (kind, w), impl in impls.items():
    t = statistics.median(times[(kind, w)])
    rows.append(dict(size=size, n=n, v=v, h=h, impl=kind, weighting=w, seconds=t,
                     seconds_all=times[(kind, w)], cpu_seconds=statistics.median(cpu[(kind, w)]),
                     peak_bytes=int(impl["memory"]),
                     floor_flop_per_s=floor_flops(n, v, h) / t))
  for r in rows:
    dense = next(x for x in rows if x["impl"] == "dense" and x["weighting"] == r["weighting"])
    plain = next(x for x in rows if x["impl"] == r["impl"] and x["weighting"] == "none")
    r["time_vs_dense"] = r["seconds"] / dense["seconds"]
    r["memory_vs_dense"] = r["peak_bytes"] / dense["peak_bytes"]
    r["time_vs_unweighted"] = r["seconds"] / plain["seconds"]
    r["cpu_vs_dense"] = r["cpu_seconds"] / dense["cpu_seconds"]
    r["cpu_vs_unweighted"] = r["cpu_seconds"] / plain["cpu_seconds"]
  return rows


def memory_by_chunk(size, chunks, weightings):
  """Compiled memory (temporaries + outputs) of the fused loss per chunk size, and of dense:
  compiled only, never run, so it is cheap at any size."""
  n, v, h = parse_size(size)
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((n, h), (h, v), (n, h), (h, v))]
  rows = []
  for w in weightings:
    dense = jax_memory(jax_loss("dense", w, 1, 1.0), args)
    for c in chunks:
      fused = jax_memory(jax_loss("fused", w, c, 1.0), args)
      rows.append(dict(size=size, weighting=w, chunk=c, fused_bytes=fused, dense_bytes=dense))
  return rows


def memory_markdown(rows):
  out = ["", "Compiled memory by chunk size (temporaries + outputs; compiled, not run):", "",
         "| N × V × H | weighting | chunk | fused MiB | dense MiB | fused / dense |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['size']} | {r['weighting']} | {r['chunk']} | "
               f"{r['fused_bytes'] / 2**20:.0f} | {r['dense_bytes'] / 2**20:.0f} | "
               f"{r['fused_bytes'] / r['dense_bytes']:.3f} |")
  return "\n".join(out) + "\n"


def markdown(rows, meta):
  out = [f"# Fused lm_head + KD loss vs materialised logits, {meta['device']}", "",
         f"bf16 inputs, float32 loss math, forward + backward (grads w.r.t. student hidden and "
         f"kernel), Hs = Ht = H, τ = {meta['temperature']}, fused chunk = {meta['chunk_size']} "
         f"tokens; median of {meta['rounds']} interleaved rounds. Busy cores (other jobs) "
         f"before / after: {meta['busy_cores_before']} / {meta['busy_cores_after']} of "
         f"{os.cpu_count()}. CPU s: the process's CPU time (all threads), less sensitive "
         f"than the wall-clock to other jobs. Floor FLOP/s: 2·N·V·(Ht + 3·Hs) / time. "
         f"Memory: JAX compiled temporaries + outputs; torch: {meta['torch_memory']}.", "",
         "| N × V × H | weighting | impl | time s | vs dense | vs unweighted | CPU s | "
         "vs dense | vs unweighted | peak MiB | vs dense | floor GFLOP/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['size']} | {r['weighting']} | {r['impl']} | {r['seconds']:.3f} | "
               f"{r['time_vs_dense']:.2f} | {r['time_vs_unweighted']:.2f} | "
               f"{r['cpu_seconds']:.2f} | {r['cpu_vs_dense']:.2f} | "
               f"{r['cpu_vs_unweighted']:.2f} | "
               f"{r['peak_bytes'] / 2**20:.0f} | {r['memory_vs_dense']:.3f} | "
               f"{r['floor_flop_per_s'] / 1e9:.1f} |")
  return "\n".join(out) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="N x V x H")
  p.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=WEIGHTINGS)
  p.add_argument("--chunk-size", type=int, default=1024)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--memory-sizes", nargs="*", default=["8192x32000x512", "32768x32000x512"],
                 help="N x V x H of the memory-by-chunk table (none to skip)")
  p.add_argument("--memory-chunks", nargs="+", type=int, default=[128, 256, 512, 1024])
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--tag", default="", help="suffix of the result files' names")
  p.add_argument("--torch-peak-worker", metavar="SIZE", help=argparse.SUPPRESS)
  opts = p.parse_args()
  if opts.torch_peak_worker:
    return torch_peak_worker(opts.torch_peak_worker, opts.weightings[0], opts.temperature)
  torch = None
  if not opts.no_torch:
    import torch
  before = busy_cores()
  rows = []
  for size in opts.sizes:
    new = run_size(size, opts, torch)
    rows += new
    table = markdown(new, dict(device=device_name(), temperature=opts.temperature,
                               chunk_size=opts.chunk_size, rounds=opts.rounds,
                               busy_cores_before=before, busy_cores_after="(running)",
                               torch_memory=""))
    print("\n".join(table.splitlines()[-len(new):]), flush=True)
  meta = dict(device=device_name(), temperature=opts.temperature, chunk_size=opts.chunk_size,
              rounds=opts.rounds, busy_cores_before=before, busy_cores_after=busy_cores(),
              load_average=os.getloadavg(), jax=jax.__version__,
              torch=None if torch is None else torch.__version__,
              torch_memory="allocator peak (GPU) or peak RSS growth of a fresh process (CPU)")
  memory = [r for size in opts.memory_sizes
            for r in memory_by_chunk(size, opts.memory_chunks, opts.weightings)]
  os.makedirs(opts.out, exist_ok=True)
  stem = os.path.join(opts.out, f"lm-loss-{device_slug()}" + (f"-{opts.tag}" if opts.tag else ""))
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows, memory_by_chunk=memory), f, indent=1)
  text = markdown(rows, meta) + (memory_markdown(memory) if memory else "")
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
