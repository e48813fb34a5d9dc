#!/usr/bin/env python3
"""Merge `bench --json` files of several runs into one results file (schema 1).

Usage: merge-runs.py OUT RUN.json...  Each run's results and NCCL rows are kept, tagged
with `run` (the file's name without .json) and the run's layout, so rows of different
runs stay apart; the header (machine, commit, date) is the first run's.
"""
import json
import os
import sys

out, paths = sys.argv[1], sys.argv[2:]
runs = [(os.path.basename(p)[: -len(".json")], json.load(open(p))) for p in sorted(paths)]
if not runs:
    sys.exit("merge-runs.py: no runs")
report = {k: v for k, v in runs[0][1].items() if k not in ("results", "nccl_sendrecv")}
report["runs"] = [{"run": name, "commit": r.get("commit"), "date": r.get("date")} for name, r in runs]
report["results"] = [dict(res, run=name) for name, r in runs for res in r["results"]]
report["nccl_sendrecv"] = [
    dict(n, run=name, topology=r["results"][0]["topology"]) for name, r in runs for n in r.get("nccl_sendrecv", [])
]
json.dump(report, open(out, "w"), indent=1)
print(f"wrote {out}: {len(runs)} runs, {len(report['results'])} results, {len(report['nccl_sendrecv'])} NCCL rows")
