#!/usr/bin/env bash
# One process on one device (NPU, GPU or CPU, whichever mim.backend finds).
#
#   launchers/single.sh experiments/vit_b32.py:tiny
#   WORKDIR=runs/mae launchers/single.sh experiments/mae_base.py \
#       --config.data.path=/data/imagenet --config.batch_size=256 --config.grad_accum=16
#
# Environment: WORKDIR, PYTHON; DEVICE (e.g. 0) restricts CUDA/NPU to that device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launchers/common.sh
source "${ROOT}/launchers/common.sh"
mim_setup "$@"

if [[ -n "${DEVICE:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$DEVICE" ASCEND_RT_VISIBLE_DEVICES="$DEVICE"
fi
run_exec "$PYTHON" -m mim.main --config="$EXPERIMENT" --workdir="$WORKDIR" "${OVERRIDES[@]}"
