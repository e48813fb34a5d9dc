#!/usr/bin/env bash
# Launch switchyard under OpenMPI's mpirun: one rank per GPU (or per CPU rank), ranks
# placed node by node, and the environment a cluster run needs forwarded to every rank.
#
# usage: scripts/mpirun.sh [-n RANKS] [--hostfile FILE] [--per-node N] [--bin PATH] [--dry-run] -- SWITCHYARD_ARGS...
#
#   -n RANKS         ranks in all (default: the slots of the hostfile, else 4)
#   --hostfile FILE  one line per node: "HOST slots=N" (see scripts/hostfile.example);
#                    without it every rank runs on this host
#   --per-node N     ranks per host (mpirun --map-by ppr:N:node); default: fill each host's slots
#   --bin PATH       the switchyard binary (default: $SWITCHYARD_BIN, else target/release/switchyard,
#                    else switchyard on PATH); it must exist at that path on every host
#   --dry-run        print the mpirun command instead of running it
#
# Examples:
#   scripts/mpirun.sh -n 4 -- bench --backend cpu --ranks-per-node 2 --check     # 2 emulated nodes on this host
#   scripts/mpirun.sh --hostfile hosts --per-node 8 -- bench --backend cuda --nccl --json out.json
#
# Forwarded to every rank when set here: the NCCL network knobs (NCCL_IB_HCA, NCCL_SOCKET_IFNAME,
# NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, NCCL_DEBUG, NCCL_P2P_DISABLE, NCCL_SHM_DISABLE, ...),
# NCCL_NVLS_ENABLE (default 0 here), every SWITCHYARD_* variable, RUST_LOG, LD_LIBRARY_PATH,
# CUDA_VISIBLE_DEVICES. Ranks meet through MPI when switchyard was built with `--features mpi`,
# otherwise over TCP at MASTER_ADDR:MASTER_PORT (set MASTER_ADDR to rank 0's host on a cluster).
set -euo pipefail

ranks="" hostfile="" per_node="" bin="${SWITCHYARD_BIN:-}" dry=0
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | -np) ranks="${2:?-n needs a number}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    --per-node) per_node="${2:?--per-node needs a number}"; shift 2 ;;
    --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "mpirun.sh: unknown option $1 (switchyard's arguments go after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "mpirun.sh: give switchyard's arguments after --" >&2; usage; }

here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "$bin" ]]; then
  if [[ -x "$here/target/release/switchyard" ]]; then bin="$here/target/release/switchyard"; else bin="$(command -v switchyard || true)"; fi
fi
[[ -n "$bin" && -x "$bin" ]] || { echo "mpirun.sh: no switchyard binary (cargo build --release, or --bin PATH)" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "mpirun.sh: mpirun not found (Debian: apt-get install openmpi-bin)" >&2; exit 2; }

args=()
if [[ -n "$hostfile" ]]; then
  [[ -r "$hostfile" ]] || { echo "mpirun.sh: cannot read hostfile $hostfile" >&2; exit 2; }
  args+=(--hostfile "$hostfile")
  if [[ -z "$ranks" ]]; then
    ranks="$(sed -n 's/^[^#]*slots=\([0-9]*\).*/\1/p' "$hostfile" | awk '{s += $1} END {print s + 0}')"
  fi
else
  ranks="${ranks:-4}"
  # One host: as many ranks as asked, whatever its core count.
  args+=(--oversubscribe)
fi
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: bad rank count '$ranks'" >&2; exit 2; }
args+=(-np "$ranks")
# Consecutive ranks on one host form a node (switchyard finds the nodes from the host names).
if [[ -n "$per_node" ]]; then args+=(--map-by "ppr:${per_node}:node"); else args+=(--map-by slot); fi
args+=(--bind-to none)
[[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)

export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
for v in $(compgen -e); do
  case "$v" in
    NCCL_* | SWITCHYARD_* | RUST_LOG | LD_LIBRARY_PATH | CUDA_VISIBLE_DEVICES | MASTER_ADDR | MASTER_PORT) args+=(-x "$v") ;;
  esac
done

cmd=(mpirun "${args[@]}" "$bin" "$@")
if [[ "$dry" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
