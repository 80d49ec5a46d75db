"""One language-model distillation training step, fused loss against materialised logits.

Tokens per second and peak memory of a whole AdamW step of a student distilled from a frozen
teacher (teacher forward, student forward + backward, loss, optimizer update), two ways, in
the same run and on the same parameters, batch and optimizer:

  fused         `jaxkd.train.lm_step.train_step`: the student's loss is `jaxkd.lm.distill_loss`
                on hidden states and lm_head kernels, in chunks of C tokens, so no [B, L, V]
                logits exist in the forward or the backward pass;
  materialised  the same step with dense logits: student and teacher `method="logits"`
                (float32 [B, L, V]), `jaxkd.losses.kd_loss` with the weights of
                `jaxkd.weighting` (erkd: `teacher_entropy_weights`, eakd:
                `adaptive_entropy_weights`) plus ce_weight · `weighted_mean(cross_entropy)`,
                differentiated by autodiff; the same `tx.update`.

Loss: ce_weight = kd_weight = 0.5, τ = τ′ = 1 (configs/lm.py's defaults). Setups (`--setups`):
  cpu    lm_teacher_cpu (4 × 256) -> lm_student_cpu (2 × 128), V = 8192, L = 128, batch 16,
         float32, chunk 512 (the CPU preset's shapes);
  gpt2   gpt2_small (12 × 768) -> gpt2_mini (6 × 384), V = 32768, L = 1024, batch 2, bf16
         compute (float32 parameters), chunk 1024;  gpt2-50k: the same at V = 50257.
Rounds interleave every (method, implementation) so that a busy machine slows all alike; the
median step time is reported (compile excluded: each program is compiled once, then run once
to warm up). tokens/s = B · L / median step time. Memory: the compiled program's
`memory_analysis()`: temporaries (the step's working memory, where the two differ) and the
total live at once, arguments + outputs − donated aliases + temporaries (arguments: the
state, i.e. parameters and AdamW moments, the teacher's parameters and the batch).

  python benchmarks/bench_lm_train.py                        # cpu and gpt2, to results/
  python benchmarks/bench_lm_train.py --setups gpt2-50k --rounds 2 --tag v50k
  python benchmarks/bench_lm_train.py --quick --out /tmp/x    # tiny shapes, for the tests
"""

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_common import busy_core_seconds, busy_cores, device_name, device_slug, RESULTS
from jaxkd import losses, weighting
from jaxkd.models import transformer
from jaxkd.train import lm_step


@dataclasses.dataclass(frozen=True)
class Setup:
  name: str
  teacher: str
  student: str
  vocab: int
  seq_len: int
  batch: int
  dtype: str
  chunk: int
  rounds: int


SETUPS = {s.name: s for s in (
    Setup("cpu", "lm_teacher_cpu", "lm_student_cpu", 8192, 128, 16, "float32", 512, 5),
    Setup("gpt2", "gpt2_small", "gpt2_mini", 32768, 1024, 2, "bfloat16", 1024, 3),
    Setup("gpt2-50k", "gpt2_small", "gpt2_mini", 50257, 1024, 2, "bfloat16", 1024, 2),
    Setup("quick", "lm_tiny", "lm_tiny", 512, 32, 2, "float32", 32, 2),
)}
DEFAULT_SETUPS = ("cpu", "gpt2")
METHODS = ("kd", "erkd", "eakd")
IMPLS = ("fused", "materialised")


# --------------------------------------------------------------------------------------------
# The materialised baseline: the same step, its student loss on dense [B, L, V] logits.


def dense_member_loss(params, teacher_logits, batch, *, student, cfg):
  """`lm_step.member_loss` of the kd-family methods, computed on materialised logits."""
  zs = student.apply({"params": params["model"]}, batch["tokens"], method="logits")
  zt = teacher_logits
  keep, labels = batch["mask"], batch["targets"]
  tau = cfg.temperature
  tau_w = tau if cfg.weighting_temperature is None else cfg.weighting_temperature
  w = None
  if cfg.weighting == "entropy":
    w = weighting.teacher_entropy_weights(zt, temperature=tau_w, where=keep)
  elif cfg.weighting == "adaptive_entropy":
    w = weighting.adaptive_entropy_weights(zt, jax.lax.stop_gradient(zs), temperature=tau_w,
                                           where=keep)
  elif cfg.weighting is not None:
    raise ValueError(f"no materialised baseline for method {cfg.method!r}.")
  ce = losses.weighted_mean(losses.cross_entropy(zs, labels, where=keep), where=keep)
  kd = losses.kd_loss(zs, zt, temperature=tau, weights=w, where=keep)
  return cfg.ce_weight * ce + cfg.kd_weight * kd


def dense_train_step(states, teacher_params, batch, *, student, teacher, tx, cfgs):
  """`lm_step.train_step` with `dense_member_loss`: teacher logits once, then each student."""
  zt = jax.lax.stop_gradient(
      teacher.apply({"params": teacher_params}, batch["tokens"], method="logits"))
  new_states, metrics = [], []
  for state, cfg in zip(states, cfgs):
    fn = functools.partial(dense_member_loss, teacher_logits=zt, batch=batch, student=student,
                           cfg=cfg)
    loss, grads = jax.value_and_grad(fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_states.append(lm_step.LMState(state.step + 1,
                                      optax.apply_updates(state.params, updates), opt_state))
    metrics.append({"loss": loss, "grad_norm": optax.tree.norm(grads)})
  return tuple(new_states), tuple(metrics)


# --------------------------------------------------------------------------------------------


def make_batch(setup, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  shape = (setup.batch, setup.seq_len)
  tokens = jax.random.randint(k1, shape, 0, setup.vocab, jnp.int32)
  # Next-token targets of a random stream; the last position of every row padded out.
  targets = jnp.concatenate([tokens[:, 1:], jax.random.randint(
      k2, (setup.batch, 1), 0, setup.vocab, jnp.int32)], axis=1)
  mask = jnp.ones(shape, bool).at[:, -1].set(False)
  return {"tokens": tokens, "targets": targets, "mask": mask}


def memory(compiled):
  m = compiled.memory_analysis()
  parts = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes)
  parts["total_bytes"] = (parts["argument_bytes"] + parts["output_bytes"]
                          - parts["alias_bytes"] + parts["temp_bytes"])
  return {k: int(v) for k, v in parts.items()}


def build(setup, methods):
  """{(method, impl): {step (compiled), states, memory, loss0}}, teacher params, batch."""
  dtype = jnp.dtype(setup.dtype)
  teacher = transformer.create_lm(setup.teacher, setup.vocab, dtype=dtype)
  student = transformer.create_lm(setup.student, setup.vocab, dtype=dtype)
  tx, _ = lm_step.make_optimizer(3e-4, warmup_steps=10, total_steps=1000)
  teacher_params = teacher.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  batch = make_batch(setup)
  impls = {}
  for method in methods:
    cfg = lm_step.DistillConfig(method, temperature=1.0, ce_weight=0.5, kd_weight=0.5,
                                chunk_size=setup.chunk)
    for impl in IMPLS:
      fn = lm_step.train_step if impl == "fused" else dense_train_step
      step = jax.jit(functools.partial(fn, student=student, teacher=teacher, tx=tx,
                                       cfgs=(cfg,)), donate_argnums=0)
      # The same initial parameters for both implementations (the same key).
      states = (lm_step.init_state(student, tx, jax.random.key(2), 8, cfg),)
      start = time.perf_counter()
      compiled = step.lower(states, teacher_params, batch).compile()
      compile_s = time.perf_counter() - start
      states, metrics = compiled(states, teacher_params, batch)  # warm-up, step 0's loss
      impls[(method, impl)] = dict(step=compiled, states=states, memory=memory(compiled),
                                   compile_s=compile_s,
                                   loss0=float(jax.block_until_ready(metrics[0]["loss"])))
  return impls, teacher_params, batch


def run_setup(setup, methods, rounds):
  impls, teacher_params, batch = build(setup, methods)
  times = {key: [] for key in impls}
  cpu = {key: [] for key in impls}
  load_start, busy_start = os.getloadavg(), busy_core_seconds()
  wall_start, own_start = time.perf_counter(), time.process_time()
  for _ in range(rounds):
    for key, impl in impls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      states, _ = impl["step"](impl["states"], teacher_params, batch)
      impl["states"] = jax.block_until_ready(states)
      times[key].append(time.perf_counter() - start)
      cpu[key].append(time.process_time() - start_cpu)
  wall, own = time.perf_counter() - wall_start, time.process_time() - own_start
  busy_end = busy_core_seconds()
  # Other jobs' cores kept busy, on average over the rounds: all the machine's busy
  # core-seconds less this process's own CPU time.
  others = None if busy_start is None else round((busy_end - busy_start - own) / wall, 2)
  during = dict(load_start=load_start, load_end=os.getloadavg(),
                other_busy_cores=others, rounds_wall_s=wall)
  tokens = setup.batch * setup.seq_len
  rows = []
  for (method, impl), x in impls.items():
    t = statistics.median(times[(method, impl)])
    finite = all(bool(np.isfinite(np.asarray(l)).all())
                 for l in jax.tree.leaves(x["states"][0].params))
    rows.append(dict(setup=setup.name, teacher=setup.teacher, student=setup.student,
                     vocab=setup.vocab, seq_len=setup.seq_len, batch=setup.batch,
                     dtype=setup.dtype, chunk=setup.chunk, method=method, impl=impl,
                     rounds=rounds, tokens=tokens, seconds=t, seconds_all=times[(method, impl)],
                     cpu_seconds=statistics.median(cpu[(method, impl)]),
                     tokens_per_s=tokens / t, compile_s=x["compile_s"], loss_step0=x["loss0"],
                     params_finite=finite, **during, **x["memory"]))
  for r in rows:
    dense = next(d for d in rows if d["method"] == r["method"] and d["impl"] == "materialised")
    r["time_vs_materialised"] = r["seconds"] / dense["seconds"]
    r["cpu_vs_materialised"] = r["cpu_seconds"] / dense["cpu_seconds"]
    r["temp_vs_materialised"] = r["temp_bytes"] / dense["temp_bytes"]
    r["total_vs_materialised"] = r["total_bytes"] / dense["total_bytes"]
    r["loss_step0_diff"] = abs(r["loss_step0"] - dense["loss_step0"])
  return rows


def wait_for_load(max_load, max_wait_s, step_s=60):
  """Sleep in `step_s` steps while the 1-minute load exceeds `max_load`, at most `max_wait_s`;
  returns (seconds waited, the load average when it stopped waiting)."""
  waited = 0
  while os.getloadavg()[0] > max_load and waited + step_s <= max_wait_s:
    print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting {step_s} s", flush=True)
    time.sleep(step_s)
    waited += step_s
  return waited, os.getloadavg()


def mib(b):
  return b / 2**20


def markdown(rows, meta):
  setups = list(dict.fromkeys(r["setup"] for r in rows))
  out = [f"# One LM distillation training step: fused loss vs materialised logits, "
         f"{meta['device']}", "",
         f"A whole step (teacher forward, student forward + backward, AdamW update with "
         f"clipping) of one student; loss 0.5 · CE + 0.5 · τ² · mean(w · KL), τ = τ′ = 1, "
         f"the last position of every row masked out. **fused**: `jaxkd.train.lm_step."
         f"train_step` (`jaxkd.lm.distill_loss`, chunked, no [B, L, V] logits); "
         f"**materialised**: the same step on float32 [B, L, V] student and teacher logits "
         f"with `jaxkd.losses.kd_loss` + `cross_entropy` and the weights of "
         f"`jaxkd.weighting`. Median of the interleaved rounds, compile and one warm-up step "
         f"excluded; tokens/s = B · L / step time; CPU s: the process's CPU time (all "
         f"threads). Memory from the compiled program (`memory_analysis()`): temp = its "
         f"temporaries, total = arguments + outputs − donated aliases + temporaries "
         f"(arguments: parameters, AdamW moments, the teacher's parameters, the batch). "
         f"loss Δ: |fused − materialised| of step 0's loss (same parameters and batch).", "",
         f"Machine: {meta['device']}, {os.cpu_count()} cores shared with other jobs. "
         f"Load average (1, 5, 15 min) before: {fmt_load(meta['load_before'])}, after: "
         f"{fmt_load(meta['load_after'])}; waited {meta['waited_s']} s for the 1-minute load "
         f"to fall to ≤ {meta['max_load']}. Busy cores (other jobs, /proc/stat over 1 s) "
         f"before / after: {meta['busy_cores_before']} / {meta['busy_cores_after']}. "
         f"GPU: {meta['gpu']}.", ""]
  for name in setups:
    rs = [r for r in rows if r["setup"] == name]
    r0 = rs[0]
    out += [f"## {name}: {r0['teacher']} -> {r0['student']}, V = {r0['vocab']}, "
            f"L = {r0['seq_len']}, batch {r0['batch']} ({r0['tokens']} tokens), "
            f"{r0['dtype']}, chunk {r0['chunk']}; {r0['rounds']} rounds", "",
            f"During its rounds ({r0['rounds_wall_s']:.0f} s): 1-minute load "
            f"{r0['load_start'][0]:.2f} -> {r0['load_end'][0]:.2f}; other jobs kept "
            f"{r0['other_busy_cores']} of {os.cpu_count()} cores busy on average.", "",
            "| method | impl | step s | tokens/s | time vs mat. | CPU s | CPU vs mat. | "
            "temp MiB | vs mat. | total MiB | vs mat. | compile s | loss Δ |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
      out.append(f"| {r['method']} | {r['impl']} | {r['seconds']:.3f} | "
                 f"{r['tokens_per_s']:.0f} | {r['time_vs_materialised']:.2f} | "
                 f"{r['cpu_seconds']:.2f} | {r['cpu_vs_materialised']:.2f} | "
                 f"{mib(r['temp_bytes']):.0f} | {r['temp_vs_materialised']:.3f} | "
                 f"{mib(r['total_bytes']):.0f} | {r['total_vs_materialised']:.3f} | "
                 f"{r['compile_s']:.1f} | {r['loss_step0_diff']:.1e} |")
    out.append("")
  return "\n".join(out)


def fmt_load(load):
  return ", ".join(f"{x:.2f}" for x in load)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setups", nargs="+", default=list(DEFAULT_SETUPS),
                 choices=sorted(SETUPS))
  p.add_argument("--methods", nargs="+", default=["kd", "erkd"], choices=METHODS)
  p.add_argument("--rounds", type=int, default=None, help="every setup's (default: its own)")
  p.add_argument("--batch", type=int, default=None, help="every setup's (default: its own)")
  p.add_argument("--max-load", type=float, default=1.5,
                 help="wait while the 1-minute load average is above this")
  p.add_argument("--max-wait", type=int, default=900, help="seconds, at most")
  p.add_argument("--quick", action="store_true", help="tiny shapes, no waiting: for tests")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--tag", default="", help="suffix of the result files' names")
  opts = p.parse_args()
  if opts.quick:
    opts.setups, opts.max_wait = ["quick"], 0
  load_first = os.getloadavg()
  waited, load_before = wait_for_load(opts.max_load, opts.max_wait)
  before = busy_cores()
  rows = []
  for name in opts.setups:
    setup = SETUPS[name]
    if opts.batch:
      setup = dataclasses.replace(setup, batch=opts.batch)
    rows += run_setup(setup, opts.methods, opts.rounds or setup.rounds)
    for r in rows[-2 * len(opts.methods):]:
      print(f"{name} {r['method']:5s} {r['impl']:12s} {r['seconds']:.3f} s "
            f"{r['tokens_per_s']:.0f} tok/s temp {mib(r['temp_bytes']):.0f} MiB", flush=True)
  platform = jax.devices()[0].platform
  meta = dict(device=device_name(), platform=platform, jax=jax.__version__,
              load_at_start=load_first, load_before=load_before, load_after=os.getloadavg(),
              waited_s=waited, max_load=opts.max_load, busy_cores_before=before,
              busy_cores_after=busy_cores(), methods=opts.methods,
              loss=dict(temperature=1.0, weighting_temperature=1.0, ce_weight=0.5,
                        kd_weight=0.5),
              gpu="none available in this session; no GPU figures are given"
              if platform == "cpu" else platform)
  os.makedirs(opts.out, exist_ok=True)
  stem = os.path.join(opts.out, f"lm-train-{device_slug()}" + (f"-{opts.tag}" if opts.tag else ""))
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  text = markdown(rows, meta)
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
