#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, torch 2.11, Triton 3.6, no PyAV/DALI): build the
# extension there, then the GPU benchmarks and tests in order of importance. The log and results
# land under $OUT as they are written (a call cut short still returns what it measured).
#
#   VIDEOPRISM_COMMIT=$(git describe --always --dirty) bash bench/device_check.sh build attention train-step token-ops
#   VIDEOPRISM_COMMIT=... bash bench/device_check.sh token-tests dali-gpu gpu-tests   # the second call, at once
#
# One call may run at most 10 minutes and a session has 15 minutes of device time, the machine's
# start (a minute or more) and idle time included, so the steps are time-boxed and ordered:
#   call 1 (timeout_s=600): build, attention, train-step, token-ops: boxes of 110 + 80 + 280 + 70 s
#          (9 minutes, 9.7 with each box's 10 s kill grace) answer the open benchmark targets;
#   call 2 at once (a machine idle for 30 s is given back, and the build with it; on a fresh machine
#          add `build`): token-tests dali-gpu gpu-tests (45 + 90 + 120 s; timeout_s = what the budget
#          leaves, most valuable first), carrying DALI's pack, its deps, the clip set and the goldens
#          (`bash bench/dali_wheel.sh prepare` prints the carry list; ~57 MiB with the tree); a cut
#          call still returns what ran;
#   checkpoint, optimizer: a later session.
# Every step writes its results straight under $OUT as it goes (rows saved one by one), so a
# step cut by its box, or a call cut by the run tool, still returns what it measured; except
# checkpoint, whose two rows are medians over all its rounds: its JSON comes at its end.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The copy sent to the device has no .git: the caller passes the commit (bench/common.py reads it).
export VIDEOPRISM_COMMIT=${VIDEOPRISM_COMMIT:-unknown}
PY=${PY:-python3}
exec > >(tee -a "$OUT/device_check.log") 2>&1

ALL_STEPS=(build attention train-step token-ops token-tests dali-gpu gpu-tests checkpoint optimizer)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "device_check: unknown step '$s'; steps: ${ALL_STEPS[*]}"; exit 2; }
done
wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

step() {  # step NAME SECONDS CMD...: time-boxed, never stops the script; results copied out after
  local name=$1 secs=$2; shift 2
  wanted "$name" || return 0
  echo "=== $name ($(date +%T), limit ${secs}s)"
  local t0=$SECONDS
  timeout -k 10 "$secs" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s"
  # A later call on this warm machine starts with an empty $OUT: keep a copy where it can read it
  # (dali-gpu compares its clips/s with the training step's).
  mkdir -p .device/results && cp "$OUT"/*.json .device/results/ 2>/dev/null || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# sm_90 only here: the H100/H200 are Hopper; CI builds sm_80 + sm_90 (+ PTX). ~45 s on 16 cores.
step build 110 env TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
# The attention kernels' tile search at base shapes, SDPA/flex/ours side by side (the eager
# reference, slow and measured before, left out); the picks stay in Triton's cache directory, so
# the training step below runs with searched tiles without compiling the candidates again (a key
# it did not see here is searched there: ~15 compiles).
step attention 80 "$PY" -m bench.attention --device cuda --backends sdpa,flex,triton --budget-s 65 --out "$OUT/attention_gpu.json"
# Issues 6 and 7: stage 1 eager vs compiled+triton, then stage 2 (compiled+triton first), base,
# 16 frames. Each compiled row spends most of its time in Inductor; the JSON is saved per row.
# The attention tile search is on, as in a training run (recorded in the JSON meta), its picks
# mostly read from the attention step's (stage 1's text tower, K <= 64, takes fixed tiles).
# --profile: each row's kernel time by kind and the GPU's busy share, to say why a row misses its target.
step train-step 280 "$PY" -m bench.train_step --device cuda --frames 16 --modes eager,compiled+triton \
  --profile --budget-s 260 --out "$OUT/train_step_gpu.json"
step token-ops 70 "$PY" -m bench.token_ops --device cuda --out "$OUT/token_ops_gpu.json"
# The GPU tests, most valuable first, in three processes (a device assert or an illegal address
# poisons the CUDA context for the rest of its process); -v: each test's name and result as it
# ends (a cut run prints no summary and writes no XML). The official goldens travel when the
# call carries .device/shared/golden/visible (here: `ln -sfn ../../shared .device/shared`, a link
# the call resolves); without them the golden test skips. DALI's GPU tests are dali-gpu's.
PYTEST=("$PY" -m pytest -v -ra -m gpu -p no:cacheprovider)
A=tests/test_factorized_attention.py T=tests/test_token_ops.py
[ -d .device/shared/golden/visible ] && export VIDEOPRISM_SHARED=$PWD/.device/shared
# token-tests (issue 4): the CUDA C++ token ops (reworked since they last ran on a GPU) against Triton and the
# reference, and the masks; the 14 GB test last.
step token-tests 45 "${PYTEST[@]}" --junitxml="$OUT/gpu_tests_1.xml" $T::test_gpu_cuda_odd_shapes \
  $T::test_gpu_cuda_patchify_staging $T::test_gpu_subnormal_sums_are_kept $T::test_gpu_backends_agree \
  $T::test_gpu_patchify_backends_agree tests/test_masking.py $T::test_gpu_cuda_offsets_beyond_int32
# Issue 5: DALI on the GPU once its pack is here (carried by this call or an earlier one on this warm machine:
# `bash bench/dali_wheel.sh prepare` prints the carry list): install, GPU-vs-CPU graph test, DALI rows ->
# data_gpu.json (against this call's train_step_gpu.json when there is one). Needs no build.
if wanted dali-gpu && ! bash bench/dali_wheel.sh status >/dev/null 2>&1; then
  echo "=== dali-gpu: skipped: $(bash bench/dali_wheel.sh status 2>&1 >/dev/null | head -1)"
else
  step dali-gpu 90 env PY="$PY" OUT="$OUT" bash bench/dali_wheel.sh gpu
fi
gpu_tests() {  # run by `bash -c` (so that the box's timeout ends it): arrays do not cross, strings do
  local rc=0 PYTEST=("$PY" -m pytest -v -ra -m gpu -p no:cacheprovider)
  # 2. The training steps queue without a host sync; the attention kernels (bf16/fp16, then fp32).
  "${PYTEST[@]}" --junitxml="$OUT/gpu_tests_2.xml" tests/test_bench_args.py \
    tests/test_train_stage1.py::test_gpu_stage1_step_is_queued_without_a_host_sync \
    tests/test_stage2.py::test_gpu_stage2_step_is_queued_without_a_host_sync \
    $A::test_math_helpers_meet_their_documented_error $A::test_gpu_triton_matches_reference || rc=1
  # 3. Compiled steps and graphs (Inductor: the slowest), the goldens, flex.
  "${PYTEST[@]}" --junitxml="$OUT/gpu_tests_3.xml" $T::test_gpu_compile_inductor_no_graph_break \
    tests/test_train_stage1.py::test_gpu_compiled_triton_step_matches_eager \
    tests/test_stage2.py::test_compiled_triton_stage2_step_matches_eager \
    $A::test_gpu_inductor_fullgraph_forward_backward $A::test_encoder_with_triton_matches_golden \
    $A::test_gpu_other_backends_match_reference || rc=1
  return $rc
}
export -f gpu_tests
export PY OUT A T
step gpu-tests 120 bash -c gpu_tests
# The step's stall for an interval checkpoint, synchronous vs checkpoint.async_save (state on the GPU).
step checkpoint 60 "$PY" -m bench.checkpoint --device cuda --reps 2 --out "$OUT/checkpoint_gpu.json"
# The optimizer step: fused AdamW vs torch.optim.Adafactor vs ours (host syncs per step, time, floor).
step optimizer 45 "$PY" -m bench.optimizer --device cuda --out "$OUT/optimizer_gpu.json"
ls -la "$OUT"
