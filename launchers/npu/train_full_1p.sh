#!/usr/bin/env bash
# The full recipe (the experiment's epochs), then its final evaluation on 1 Ascend NPU.
#
#   launchers/npu/train_full_1p.sh experiments/vit_b32.py --config.data.path=/data/imagenet
#
# Environment: see launchers/npu/run.sh and docs/distributed.md.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" full 1 "$@"
