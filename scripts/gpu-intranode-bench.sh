#!/usr/bin/env bash
# Intra-node CUDA benchmark sweep on one multi-GPU host, with the NCCL baseline
# in the same run. Usage: scripts/gpu-intranode-bench.sh BIN_DIR OUT_JSON
#   BIN_DIR holds the `switchyard` binary and shared/baselines/nccl_a2a.py.
# Shapes: HT-A (4096 tokens) and LL-B (128 tokens), hidden 7168, top-8 of 256;
# BF16 and FP8 dispatch, BF16 combine; num_sms (= channels) 4 8 12 16 24.
# Each run also times the cudarc NCCL grouped send/recv of the same bytes (--nccl);
# libcublas is not needed here.
set -euo pipefail
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on shared hosts
bin_dir=$1; out=$2
gpus=$(nvidia-smi -L | wc -l)
tmp=$(mktemp -d)
for tokens in 4096 128; do
  for dtype in bf16 fp8; do
    for sms in 4 8 12 16 24; do
      f="$tmp/t${tokens}-${dtype}-s${sms}.json"
      "$bin_dir/switchyard" bench --backend cuda --nodes 1 --ranks-per-node "$gpus" --tokens "$tokens" \
        --hidden 7168 --topk 8 --experts 256 --dtype "$dtype" --channels "$sms" --warmup 3 --iters 20 \
        --check --nccl --json "$f" 2>"$tmp/err.log" | grep -E '^ +(dispatch|combine)' | sed "s/^/t=$tokens s=$sms /" \
        || { echo "bench failed: tokens $tokens $dtype sms $sms"; tail -5 "$tmp/err.log"; }
    done
  done
done
nccl_log="$tmp/nccl.log"
timeout 240 python3 "$bin_dir/nccl_a2a.py" 4096 128 >"$nccl_log" 2>&1 || echo "nccl baseline failed: $(tail -3 "$nccl_log")"
grep '^\[nccl\]' "$nccl_log" || true
python3 - "$tmp" "$nccl_log" "$out" <<'PY'
import glob, json, re, sys
tmp, nccl_log, out = sys.argv[1:]
runs = [json.load(open(f)) for f in sorted(glob.glob(f"{tmp}/t*.json"))]
report = dict(runs[0]) if runs else {"schema": 1}
report["results"] = [r for run in runs for r in run["results"]]
# The same-run cudarc NCCL exchange of each run, tagged with that run's shape and SMs.
report["nccl_sendrecv"] = [dict(n, tokens=run["results"][0]["shape"]["tokens"], num_sms=run["results"][0]["num_sms"])
                           for run in runs for n in run.get("nccl_sendrecv", [])]
report["time_source"] = "cuda: device time of the op's kernels (CUDA events), per iteration the max over ranks"
base, shape = [], None
for line in open(nccl_log):
    m = re.match(r"\[nccl\] world=(\d+) tokens=(\d+) hidden=(\d+) topk=(\d+) experts=(\d+) recv_rows=(\d+)", line)
    if m:
        shape = dict(zip(["world", "tokens", "hidden", "topk", "experts", "recv_rows"], map(int, m.groups())))
    m = re.match(r"\[nccl\] (.+?): ([\d.]+) us, ([\d.]+) GB/s", line)
    if m and shape:
        base.append({"op": m.group(1), "time_us": float(m.group(2)), "logical_gbps": float(m.group(3)), **shape,
                     "source": "shared/baselines/nccl_a2a.py (torch.distributed NCCL, same run)"})
report["nccl_baseline"] = base
json.dump(report, open(out, "w"), indent=1)
print(f"wrote {out}: {len(report['results'])} results, {len(base)} NCCL baseline rows")
PY
