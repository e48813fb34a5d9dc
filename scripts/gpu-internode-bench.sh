#!/usr/bin/env bash
# Several CUDA nodes emulated on one multi-GPU host (issue 5): the conformance cases of
# 2 and 4 processes, then bench --check --nccl of HT-A-like rows in the layouts 2x1 (one
# process per GPU: timings) and 2x2 (two processes per GPU: correctness and ratios), merged
# into one results file. Usage: scripts/gpu-internode-bench.sh BIN OUT_JSON
#   BIN: a switchyard binary built with --features mpi; mpirun on the PATH.
# The rail goes through NCCL's socket transport (NCCL_P2P_DISABLE, NCCL_SHM_DISABLE), as it
# would through a NIC; one more 2x1 run puts it on NCCL's shared-memory transport (one NCCL
# host id for all processes), a rail nearer IB speed.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 NCCL_DEBUG=WARN   # never NVLink multicast on shared hosts
bin=$1; out=$2
tmp=$(mktemp -d)
M="mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x NCCL_DEBUG -x NCCL_P2P_DISABLE -x NCCL_SHM_DISABLE"
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
for np in 2 4; do
  echo "== mpirun -np $np check --backend cuda"
  $M -np $np "$bin" check --backend cuda 2>&1 | grep -E "PASS|FAIL|passed"
done
S="--backend cuda --nodes 2 --tokens 4096 --hidden 7168 --topk 8 --experts 256 --routing node-limited --max-nodes 2 --warmup 2 --iters 10 --check --nccl"
run() {  # NP NAME FLAGS...
  local np=$1 name=$2; shift 2
  echo "== $name"
  $M -np "$np" "$bin" bench $S "$@" --json "$tmp/$name.json" 2>"$tmp/$name.err" | grep -E "^ +(dispatch|combine)" \
    || { echo "bench failed: $name"; tail -5 "$tmp/$name.err"; }
}
run 2 2x1-bf16 --dtype bf16
run 2 2x1-fp8 --dtype fp8
run 2 2x1-bf16-wire8 --dtype bf16 --fp8-on-wire
run 4 2x2-bf16 --dtype bf16
run 4 2x2-bf16-wire8 --dtype bf16 --fp8-on-wire
unset NCCL_SHM_DISABLE; export NCCL_HOSTID=switchyard-one-host
M="mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x NCCL_DEBUG -x NCCL_P2P_DISABLE -x NCCL_HOSTID"
run 2 2x1-bf16-shm-rail --dtype bf16
python3 "$(dirname "$0")/merge-runs.py" "$out" "$tmp"/*.json
