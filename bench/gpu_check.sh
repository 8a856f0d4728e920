#!/usr/bin/env bash
# Every GPU-only check of the open FP8 and performance work, most valuable first, under one deadline, so a
# single device call (a session has 15 minutes of device time, the machine's start included) brings back
# as much as fits:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)   # GPU_CHECK_BUDGET=580 s; the fp8
#   half alone fills it since +conf=1gpu was added (2026-11-29): run "fp8" first, "perf" in a second call
#   run(command="bash bench/gpu_check.sh fp8", ...)  /  "... perf"          # one half each
# fp8:  1. the Triton FP8 kernels (GEMM, fused quantization, experts) against the reference (tests that skip
#          without CUDA), the Triton AdamW compiled; the torch backend's operands for torch._scaled_mm's blockwise scales
#       2. FP8 GEMM TFLOPS against BF16 torch.matmul at the report's shapes (goal >= 1.4x), the experts'
#          K-grouped Wgrad against the per-expert loop
#       3. training MFU of +conf=1gpu (the largest that fits one 80 GB GPU) and +conf=small, BF16 and FP8,
#          and the FP8 / BF16 step ratio (goals 40%, 1.3x); each small step split by kernel and its memory
#          peak by allocation site (bench/profile_step.py)
#       4. fused quantization against the PyTorch operations; Triton tile configurations
# perf: 5. where a training step makes the host wait for the GPU (BF16 and FP8); the EP dispatch's sync-free
#          index lists (tests/unit/test_host_reads.py)
#       6. the planner's activation table against what autograd keeps with the GPU's attention kernels; MLA's
#          attention with v padded (the model's call) against the native call and each SDPA backend
#       7. a training step against HF transformers, ours eager and compiled; the harness (experts, optimizer)
# Each step has its own limit, cut to what is left of GPU_CHECK_BUDGET; what does not fit is skipped and
# says so. At most 8 files under ${OUT:-/tmp/gpu_out} (what a device call brings back).
# Needs hydra wheels in .whl/ where hydra is not installed.
set -uo pipefail
PART=${1:-all}
case "$PART" in fp8|perf|all) ;; *) echo "usage: bash bench/gpu_check.sh [fp8|perf]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-580} ))
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

# step LIMIT_S LOGFILE COMMAND...: run COMMAND for at most LIMIT_S seconds (less if the budget is shorter),
# appending its output to $OUT/LOGFILE and to stdout.
step() {
  local limit=$1 log=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 3 ))
  if [ "$left" -lt 15 ]; then
    echo "== skipped (budget spent): $*" | tee -a "$OUT/$log"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== [${limit}s] $*" | tee -a "$OUT/$log"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "== rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/$log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader \
  | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
PYTEST="python3 -m pytest -q -p no:cacheprovider -rs"
if [ "$PART" != perf ]; then
  step 110 fp8_tests.txt $PYTEST tests/unit/test_fp8_triton.py tests/unit/test_fp8_wgrad.py \
    tests/unit/test_fp8_triton_quant.py tests/unit/test_fp8_experts.py tests/unit/test_optim_triton.py
  step 40 fp8_gemm.txt python3 bench/scaled_mm_layouts.py
  step 100 fp8_gemm.txt python3 bench/fp8_gemm.py --device cuda --tokens 4096,16384
  step 280 mfu.txt python3 bench/mfu.py --device cuda --preset 1gpu --steps 7 --warmup 3 --fp8-backends auto,torch \
    --set data.max_bytes=6000000 --set train.batch_size_start=16
  step 120 mfu.txt python3 bench/mfu.py --device cuda --preset small --steps 25 --warmup 10 \
    --set data.max_bytes=6000000
  for extra in fp8.enabled=false fp8.enabled=true; do
    step 60 mfu.txt python3 bench/profile_step.py --device cuda --set "$extra" --rows 25
  done
  step 40 mfu.txt python3 bench/profile_step.py --device cuda --memory
  step 40 fp8_quant.txt python3 bench/fp8_quant.py --device cuda
  step 60 fp8_gemm.txt python3 bench/fp8_gemm.py --device cuda --tokens 16384 --only dense --backends triton \
    --sweep --repeats 10
fi
if [ "$PART" != fp8 ]; then
  for extra in fp8.enabled=false fp8.enabled=true; do
    step 45 host_syncs.txt python3 bench/host_syncs.py --device cuda --set "$extra"
  done
  step 45 host_syncs.txt $PYTEST tests/unit/test_host_reads.py
  step 40 memory_plan.txt python3 bench/memory.py --plan-only --device cuda --shape small
  step 60 memory_plan.txt python3 bench/attention.py --device cuda
  step 120 perf_rest.txt python3 bench/train_throughput.py --device cuda --shape small --batch 8 --seq 1024 \
    --rounds 3 --hf-experts default,grouped_mm --compile-ours
  step 60 perf_rest.txt python3 -m bench --device cuda moe optimizer
fi
echo "== gpu_check done, $(( DEADLINE - $(date +%s) ))s of the budget left"
