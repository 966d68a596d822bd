#!/usr/bin/env bash
# N processes on the N devices of one host (torchrun --standalone). config.batch_size is
# the global batch: each of the N ranks trains on batch_size / N images per step.
#
#   launchers/multi_gpu.sh experiments/mae_base.py --config.data.path=/data/imagenet \
#       --config.batch_size=4096
#   NPROC=4 launchers/multi_gpu.sh experiments/vit_b32.py --config.data.path=/data/imagenet
#
# Environment: NPROC (default: all NPUs/GPUs of the host), WORKDIR, PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAUNCHER_ENV_HELP="  NPROC: processes (default: the host's NPUs/GPUs)"
# shellcheck source=launchers/common.sh
source "${ROOT}/launchers/common.sh"
mim_setup "$@"

NPROC="${NPROC:-$(local_devices)}"
run_exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m mim.main --config="$EXPERIMENT" --workdir="$WORKDIR" "${OVERRIDES[@]}"
