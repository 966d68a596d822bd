#!/usr/bin/env bash
# M hosts with NPROC devices each. Run the same command on every host, with its own
# NODE_RANK; they meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT
# (a host all of them reach, normally node 0). WORKDIR must be on a file system every
# host sees: rank 0 writes the checkpoints, and every rank reads them to resume.
#
#   # on host 0 (10.0.0.1) and host 1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/multi_node.sh experiments/mae_large.py \
#       --config.data.path=/data/imagenet
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launchers/multi_node.sh experiments/mae_large.py \
#       --config.data.path=/data/imagenet
#
# Environment: NNODES (required), NODE_RANK (required), MASTER_ADDR (required),
# MASTER_PORT (default 29500), NPROC (devices per host, default all), RDZV_ID (default
# mim; a new id per job when several share MASTER_ADDR:MASTER_PORT), WORKDIR, PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAUNCHER_ENV_HELP="  NNODES, NODE_RANK, MASTER_ADDR (required), MASTER_PORT (29500), NPROC, RDZV_ID"
# shellcheck source=launchers/common.sh
source "${ROOT}/launchers/common.sh"
mim_setup "$@"

: "${NNODES:?set NNODES, the number of hosts}"
: "${NODE_RANK:?set NODE_RANK, the index of this host, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of the rendezvous host (node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-$(local_devices)}"
run_exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
  --rdzv_id="${RDZV_ID:-mim}" \
  -m mim.main --config="$EXPERIMENT" --workdir="$WORKDIR" "${OVERRIDES[@]}"
