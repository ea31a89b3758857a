#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, torch 2.11, Triton 3.6, no PyAV/DALI): build the
# extension there, run the GPU tests, run the GPU benchmarks. Logs and result files land
# under $OUT as each step ends (a call cut short still returns what finished).
# Budget: about 8 minutes in all.
#
#   VIDEOPRISM_COMMIT=$(git rev-parse --short HEAD) bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
# The copy sent to the device has no .git: the caller passes the commit (bench/common.py reads it).
export VIDEOPRISM_COMMIT=${VIDEOPRISM_COMMIT:-unknown}
PY=${PY:-python3}
exec > >(tee "$OUT/device_check.log") 2>&1

step() {  # step NAME SECONDS CMD...: time-boxed, never stops the script; results copied out after
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s"
  cp bench/results/*_gpu.* "$OUT/" 2>/dev/null || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# sm_90 only here: the H100/H200 are Hopper; CI builds sm_80 + sm_90.
step build 150 env TORCH_CUDA_ARCH_LIST=9.0 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e .
# Modules that need PyAV/DALI (absent there) fail collection; the rest run.
step gpu-tests 120 $PY -m pytest -q -ra -m gpu -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT/gpu_tests.xml" tests/
step bench-attention 85 $PY -m bench.attention --device cuda --budget-s 70 --out bench/results/attention_gpu.json
step bench-token-ops 70 $PY -m bench.token_ops --device cuda --out bench/results/token_ops_gpu.json
step bench-train-step 200 $PY -m bench.train_step --device cuda --frames 16 --modes eager,compiled+triton \
  --budget-s 170 --out bench/results/train_step_gpu.json
ls -la "$OUT"
