#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, torch 2.11, Triton 3.6, no DALI): build the
# extension there, run the GPU tests, run every benchmark; everything lands under $OUT
# (logs + one tarball of bench/results/*.json). Budget: under 8 minutes in all.
#
#   bash bench/device_check.sh [quick]     # quick: tests + attention/token-op benchmarks only
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
# The copy sent to the device has no .git: the caller passes the commit (bench/common.py reads it).
export VIDEOPRISM_COMMIT=${VIDEOPRISM_COMMIT:-unknown}
LOG="$OUT/device_check.log"
exec > >(tee "$LOG") 2>&1

step() {  # step NAME SECONDS CMD...: time-boxed, never stops the script
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# sm_90 only here: the H100/H200 are Hopper; CI builds sm_80 + sm_90.
step build 180 env TORCH_CUDA_ARCH_LIST=9.0 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e .
# The GPU machines lack PyAV and DALI: modules that need them fail collection there, the rest run.
step gpu-tests 150 $PY -m pytest -q -ra -m gpu -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT/gpu_tests.xml" tests/
step bench-attention 130 $PY -m bench.attention --device cuda --budget-s 100 --out bench/results/attention_gpu.json
step bench-token-ops 60 $PY -m bench.token_ops --device cuda --out bench/results/token_ops_gpu.json
if [ "${1:-}" != quick ]; then
  step bench-encoder 90 $PY -m bench.encoder --device cuda --dtype bfloat16 --batch 8 \
    --backends sdpa,triton,flex --modes eager,compile --out bench/results/encoder_gpu.json
  step bench-train-step 150 $PY -m bench.train_step --device cuda --out bench/results/train_step_gpu.json
fi
tar czf "$OUT/results.tgz" bench/results
ls -la "$OUT"
