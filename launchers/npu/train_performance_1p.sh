#!/usr/bin/env bash
# A short run (PERF_STEPS=200 steps, no evaluation before the end) that prints
# images/s per device and in total on 1 Ascend NPU.
#
#   launchers/npu/train_performance_1p.sh experiments/vit_b32.py --config.data.path=/data/imagenet
#
# Environment: see launchers/npu/run.sh and docs/distributed.md.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" performance 1 "$@"
