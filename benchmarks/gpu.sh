#!/usr/bin/env bash
# Every GPU figure of the benchmarks, in a few calls on a GPU machine (docs/ENVIRONMENT.md#gpu).
#
# Run from anywhere; results land in $OUT/results when $OUT is set, else in benchmarks/results:
#     bash benchmarks/gpu.sh check      # ~2 min: GPU sanity, one train-step row
#     bash benchmarks/gpu.sh targets    # ~8 min: KD vs PyTorch at batch 64 and ImageNet 256,
#                                       # reweighting vs KD, num_seeds 5 vs 1
#     bash benchmarks/gpu.sh matrix [bench_train_step.py options]   # the full matrix (long:
#                                       # split it with --pairs if one call is limited)
#     bash benchmarks/gpu.sh profile    # where the time goes, the loss-level benchmark and
#                                       # the model zoo (grouped convs: 'xla' vs 'split')
#     bash benchmarks/gpu.sh sweep      # ~6 min: 6 methods x 1 and 5 seeds in one program
#                                       # against 6 and 30 separate runs (bench_sweep.py)
#     bash benchmarks/gpu.sh lm         # ~6 min: the fused LM loss against dense logits
#                                       # (bench_lm_loss.py) and one LM distillation step,
#                                       # fused vs materialised, GPT-2-small shapes (bench_lm_train.py)
# Each stage writes its own files (named after the GPU), so stages can run in separate calls.
#
# The machine needs JAX with CUDA, flax, optax, orbax-checkpoint and torch (`pip install -e
# ".[bench]"` after JAX's CUDA install gives all of it). A GPU machine without a package index
# but with those: on a machine that has one, download the rest of jaxkd's dependencies for
# the GPU machine's Python and platform into .whl/ at the repository root (git ignores it;
# docs/ENVIRONMENT.md#gpu has the same command and what to do if an import still fails):
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#         --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#         tensorflow-datasets ml-collections grain array-record immutabledict simple-parsing \
#         tensorflow-metadata termcolor toml dm-tree docstring-parser importlib-resources \
#         tensorboardx
# then copy the repository with .whl/ to the GPU machine. When those imports are missing there,
# this script installs the wheels into .site/ without an index (--no-deps: the machine's own
# JAX and torch stay) and puts .site/ and the repository on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-check}
out=${OUT:+$OUT/results}
out=${out:-benchmarks/results}
mkdir -p "$out"

export PYTHONPATH=$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import ml_collections, tensorflow_datasets, grain" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and PyTorch share the GPU in one process

python3 - <<'EOF'
import jax
d = jax.devices()[0]
assert d.platform == "gpu", f"no GPU visible to JAX: {jax.devices()}"
print("JAX", jax.__version__, "on", d.device_kind, "x", jax.device_count())
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv

bench() { python3 benchmarks/bench_train_step.py --out "$out" "$@"; }
case "$stage" in
  check)
    bench --pairs resnet56-resnet20 --batch 64 --objectives kd --seeds 1 --repeats 20 --tag check
    ;;
  targets)
    # KD vs PyTorch at the CIFAR recipe's batch 64 (target 3x) and ImageNet at 256 (1.3x);
    # every reweighting against KD (within 2%); num_seeds=5 against one seed (3x); the
    # resnet32x4->resnet8x4 recipe projection (under 15 minutes).
    bench --pairs resnet56-resnet20,resnet32x4-resnet8x4 --batch 64 --seeds 1,5 \
      --seeds-per-vmap 0,1 --tag cifar-b64
    bench --pairs resnet34_imagenet-resnet18_imagenet --imagenet-batch 256 --objectives kd,erkd \
      --seeds 1 --tag imagenet-b256
    ;;
  matrix)
    shift || true
    bench "$@"
    ;;
  profile)
    python3 benchmarks/bench_profile_step.py --pair resnet32x4-resnet8x4 --method kd --dtype bfloat16 --out "$out"
    python3 benchmarks/bench_profile_step.py --pair resnet32x4-resnet8x4 --method ipwd --dtype bfloat16 --out "$out"
    python3 benchmarks/bench_profile_step.py --pair resnet56-resnet20 --method kd --dtype bfloat16 \
      --seeds 5 --seeds-per-vmap 5 --out "$out"
    python3 benchmarks/bench_losses.py --out "$out"
    python3 benchmarks/bench_models.py --out "$out"
    ;;
  sweep)
    # Members unrolled, each member's seeds in one vmap (the GPU default); batch 64 and 512.
    python3 benchmarks/bench_sweep.py --pairs resnet56-resnet20,resnet32x4-resnet8x4 \
      --batch 64,512 --seeds 1,5 --repeats 20 --out "$out"
    ;;
  lm)
    python3 benchmarks/bench_lm_loss.py --sizes 8192x32000x512 8192x128256x2048 \
      --memory-sizes 8192x128256x2048 --out "$out"
    python3 benchmarks/bench_lm_train.py --max-load 1000 --out "$out"
    ;;
  *)
    echo "unknown stage $stage: check | targets | matrix [bench_train_step.py args] | profile | sweep | lm" >&2
    exit 2
    ;;
esac
ls -l "$out"
