#!/usr/bin/env bash
# Every GPU-only check of the open FP8 and performance work, in two parts that each fit one device
# call with time left to rerun (a session has 15 minutes of device time, the machine's start included):
#   run(command="bash bench/gpu_check.sh fp8", carry=[".whl"], timeout_s=450)    # about 6.5 minutes
#   run(command="bash bench/gpu_check.sh perf", carry=[".whl"], timeout_s=360)   # about 5 minutes
# `bash bench/gpu_check.sh` (no part) runs both, about 11.5 minutes.
# fp8:  1. the Triton FP8 kernels (GEMM, fused quantization) against the reference (tests that skip without CUDA)
#       2. FP8 GEMM TFLOPS against BF16 torch.matmul at the report's shapes (goal >= 1.4x), the experts'
#          K-grouped Wgrad against the per-expert loop; fused quantization against the PyTorch operations
#       3. training MFU of +conf=small, BF16 and FP8, and the FP8 / BF16 step ratio (goals 40%, 1.3x)
# perf: 4. a training step against HF transformers, ours eager and with train.compile's treatment
#       5. the benchmark harness on the GPU: MoE experts, the optimizer
#       6. the planner's activation table against what autograd keeps with the GPU's attention kernels
#       7. where a training step makes the host wait for the GPU (BF16 and FP8); the EP dispatch's sync-free index lists
# Logs under ${OUT:-/tmp/gpu_out}. Needs hydra wheels in .whl/ where hydra is not installed.
set -uo pipefail
PART=${1:-all}
case "$PART" in fp8|perf|all) ;; *) echo "usage: bash bench/gpu_check.sh [fp8|perf]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$PART" != perf ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_triton.py tests/unit/test_fp8_wgrad.py \
    tests/unit/test_fp8_triton_quant.py tests/unit/test_fp8_experts.py 2>&1 | tail -15 | tee "$OUT/fp8_tests.txt"
  timeout 100 python3 bench/fp8_gemm.py --device cuda 2>&1 | tee "$OUT/fp8_gemm.txt"
  timeout 60 python3 bench/fp8_quant.py --device cuda 2>&1 | tee "$OUT/fp8_quant.txt"
  timeout 160 python3 bench/mfu.py --device cuda --preset small --steps 25 --warmup 10 --set data.max_bytes=6000000 \
    2>&1 | tee "$OUT/mfu_small.txt"
fi
if [ "$PART" != fp8 ]; then
  timeout 130 python3 bench/train_throughput.py --device cuda --shape small --batch 8 --seq 1024 --rounds 3 \
    --hf-experts default,grouped_mm --compile-ours 2>&1 | tail -12 | tee "$OUT/train_vs_hf.txt"
  timeout 60 python3 -m bench --device cuda moe optimizer 2>&1 | tee "$OUT/harness.txt"
  timeout 40 python3 bench/memory.py --plan-only --device cuda --shape small 2>&1 | tee "$OUT/memory_plan.txt"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_host_reads.py 2>&1 | tail -5 | tee "$OUT/host_reads.txt"
  for extra in fp8.enabled=false fp8.enabled=true; do
    timeout 40 python3 bench/host_syncs.py --device cuda --set "$extra" 2>&1 | tail -25
  done | tee "$OUT/host_syncs.txt"
fi
