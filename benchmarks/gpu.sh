#!/usr/bin/env bash
# Every GPU figure of the throughput issue, for a session that is lent a GPU machine.
#
# That machine's image has jax (CUDA), flax, optax, orbax-checkpoint and torch but not
# tensorflow-datasets, ml-collections, grain or array-record, and no network. So, first on
# the development machine:
#     ../shared/scripts/device-wheels          # downloads those wheels into .whl/
# then, on the GPU machine, from the repository root (results land in $OUT/results, or in
# benchmarks/results when $OUT is unset):
#     bash benchmarks/gpu.sh check      # ~2 min: installs, GPU sanity, one train-step row
#     bash benchmarks/gpu.sh targets    # ~8 min: the rows the issue's GPU targets name
#     bash benchmarks/gpu.sh matrix     # the full matrix of benchmarks/train_step.py (long:
#                                       # split it with --pairs if one call is limited)
#     bash benchmarks/gpu.sh profile    # where the time goes, the loss-level benchmark and
#                                       # the model zoo (grouped convs: 'xla' vs 'split')
# Each stage writes its own files (named after the GPU), so stages can run in separate calls.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-check}
out=${OUT:+$OUT/results}
out=${out:-benchmarks/results}
mkdir -p "$out"

if [ -d .whl ] && ! python3 -c "import ml_collections, tensorflow_datasets, grain" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl
fi
export PYTHONPATH=$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and PyTorch share the GPU in one process

python3 - <<'EOF'
import jax
d = jax.devices()[0]
assert d.platform == "gpu", f"no GPU visible to JAX: {jax.devices()}"
print("JAX", jax.__version__, "on", d.device_kind, "x", jax.device_count())
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv

bench() { python3 benchmarks/train_step.py --out "$out" "$@"; }
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
    python3 benchmarks/profile_step.py --pair resnet32x4-resnet8x4 --method kd --dtype bfloat16 --out "$out"
    python3 benchmarks/profile_step.py --pair resnet32x4-resnet8x4 --method ipwd --dtype bfloat16 --out "$out"
    python3 benchmarks/profile_step.py --pair resnet56-resnet20 --method kd --dtype bfloat16 \
      --seeds 5 --seeds-per-vmap 5 --out "$out"
    python3 benchmarks/losses.py --out "$out"
    python3 benchmarks/models.py --out "$out"
    ;;
  *)
    echo "unknown stage $stage: check | targets | matrix [train_step.py args] | profile" >&2
    exit 2
    ;;
esac
ls -l "$out"
