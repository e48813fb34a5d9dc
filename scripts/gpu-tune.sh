#!/usr/bin/env bash
# Tune, check the tuner against an exhaustive sweep, and measure GEMM interference on one
# multi-GPU host (issue 6). Usage: scripts/gpu-tune.sh BIN_DIR OUT_DIR
#   BIN_DIR holds the `switchyard` binary; OUT_DIR gets:
#   tuned.toml, tuned-curve.json            refine (the default strategy), HT-A and LL-B, bf16 + fp8
#   exhaustive.toml, exhaustive-curve.json  the whole grid, same shapes
#   interference.json                       bench HT-A with the tuned file, --interference (tuned + 24 SMs) --nccl
# GRID, ITERS, REMEASURE (env) shrink it for a quick check of the script itself.
# Plots: the GPU hosts have no fonts; draw them here with `switchyard plot OUT_DIR/tuned-curve.json`.
set -euo pipefail
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on shared hosts
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}   # libcublas for --interference
bin=$1/switchyard; out=$2
mkdir -p "$out"
export SWITCHYARD_CACHE_DIR="$out/cache"
grid=${GRID:-2,4,8,12,16,20,24,32}; iters=${ITERS:-20}; remeasure=${REMEASURE:-50}
"$bin" tune --backend cuda --shape ht-a,ll-b --dtype bf16,fp8 --channels $grid --strategy refine \
  --iters "$iters" --remeasure-iters "$remeasure" --out "$out/tuned.toml"
"$bin" tune --backend cuda --shape ht-a,ll-b --dtype bf16,fp8 --channels $grid --strategy exhaustive \
  --iters "$iters" --remeasure-iters "$remeasure" --out "$out/exhaustive.toml"
for dtype in bf16 fp8; do
  "$bin" bench --backend cuda --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype $dtype \
    --config "$out/tuned.toml" --warmup 3 --iters "$iters" --check --nccl --interference --interference-sms 24 \
    --json "$out/interference-$dtype.json"
done
