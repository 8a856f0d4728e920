#!/usr/bin/env bash
# One-GPU smoke run of the trainer (device tool): tiny with a checkpoint and a resume, then small, with
# bf16 autocast, NCCL (one rank), ZeRO-1 and DTensor checkpoints, small profiled at steps 10-11
# (logging.profile_steps: the CUDA branch of train/profiling.py). Logs under ${OUT:-/tmp/gpu_out}.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
run() { python3 launch/pretrain.py "$@" data.cache_dir=/tmp/dcache 2>&1 | grep -v Warning; }
run +conf=tiny train.steps=10 checkpoint.every=5 logging.every=5 run.dir=/tmp/r_tiny | tee "$OUT/tiny.txt"
run +conf=tiny train.steps=15 logging.every=5 run.dir=/tmp/r_tiny | tee -a "$OUT/tiny.txt"
cp /tmp/r_tiny/metrics.jsonl "$OUT/tiny_metrics.jsonl"
run +conf=small train.steps=12 logging.every=3 run.dir=/tmp/r_small data.max_bytes=6000000 \
  'logging.profile_steps=[10,11]' | tee "$OUT/small.txt"
cp /tmp/r_small/profile/steps_10-11/rank0.txt "$OUT/small_profile.txt"  # the profiler's CUDA table
