#!/usr/bin/env bash
# One GPU session's checks in one call (device tool): training throughput against HF, eager and
# compiled, and a tiny pretraining run with bf16 autocast and grouped-GEMM experts.
# Writes logs under ${OUT:-/tmp/gpu_out}. Needs hydra wheels in .whl/ where hydra is not installed.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for shape in small bench; do
  timeout 150 python3 bench/train_throughput.py --device cuda --shape $shape --batch 8 --seq 1024 --rounds 5 \
    --hf-experts default,grouped_mm 2>&1 | tee "$OUT/bench_$shape.txt"
done
timeout 240 python3 bench/train_throughput.py --device cuda --shape small --batch 8 --seq 1024 --rounds 5 \
  --hf-experts default --compile 2>&1 | tail -8 | tee "$OUT/bench_small_compiled.txt"
timeout 90 python3 launch/pretrain.py +conf=tiny train.steps=20 logging.every=10 run.dir=/tmp/run_tiny \
  data.cache_dir=/tmp/dcache 2>&1 | tee "$OUT/tiny.txt"
