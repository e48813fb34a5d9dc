#!/usr/bin/env bash
# World 1 (one GPU): what the separate sy_advance launch costs per call, and the fold (the last
# block of a call's kernel raises the call count; scratch build) checked and timed against it.
export NCCL_NVLS_ENABLE=0 SWITCHYARD_CACHE_DIR=/tmp/sycache
nvidia-smi -L
echo "== fold: cuda_intranode (world 2 on one GPU)"; timeout 300 .carry/cuda_intranode-fold 2>&1 | tail -3
echo "== fold: mpirun -np 2 check --backend cuda"; bash scripts/mpirun.sh -n 2 --bin .carry/switchyard-fold -- check --backend cuda 2>&1 | tail -2
echo "== fold: check --backend cuda (world 1)"; .carry/switchyard-fold check --backend cuda 2>&1 | tail -1
run() { local label=$1; shift; for tok in 128 4096; do for d in bf16 fp8; do
  "$1" bench "${@:2}" --backend cuda --tokens $tok --hidden 7168 --topk 8 --experts 256 --warmup 3 --iters 40 --check --dtype $d --channels 12 2>&1 \
   | grep -E "^ +(dispatch-cached|combine)" | sed "s|^|$label t=$tok |"; done; done; }
for round in 1 2; do
  run "launch      " .carry/switchyard
  export SY_EXPERIMENT_NO_ADVANCE=1; run "no-advance  " .carry/switchyard-noadv; unset SY_EXPERIMENT_NO_ADVANCE
  run "fold        " .carry/switchyard-fold


done
