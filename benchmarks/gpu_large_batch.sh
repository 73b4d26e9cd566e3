#!/usr/bin/env bash
# Large batches on one lent GPU (issue 18): ViT-B/16-like CLIP and 3T (h cached) at batch 256 and 1024
# and the largest batch that fits with activation checkpointing, with and without torch.compile,
# MFU against the H200's dense bf16 peak; then open_clip at identical shapes (bench_step.py). About
# 10 minutes on an H200. Carry the pure-Python packages as gpu_check.sh says (.bench_site), then
#   run(command="bash benchmarks/gpu_large_batch.sh", carry=[".bench_site"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench_out}
PEAK=${PEAK:-989e12}  # H100/H200 SXM, bf16 dense
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.bench_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY benchmarks/bench_memory.py --preset gpu --batches 256 1024 4096 --compile --peak-flops "$PEAK" \
  --out "$OUT/gpu_memory.json" 2>&1 | tee "$OUT/gpu_memory.log"
for b in 256 1024; do
  $PY benchmarks/bench_step.py --preset gpu --quick --batch "$b" --peak-flops "$PEAK" --out "$OUT/gpu_step_$b.json" \
    2>&1 | tee "$OUT/gpu_step_$b.log"
done
