#!/usr/bin/env bash
# The body of the train_{performance,full}_{1p,8p}.sh scripts:
#   launchers/npu/run.sh performance|full NDEVICES EXPERIMENT [--config.x=y ...]
# Environment: WORKDIR, PYTHON, DRY_RUN; ASCEND_DEVICE_ID (1 device: which, default 0);
# PERF_STEPS (default 200) and PERF_LOG_EVERY (default 20) for performance runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -lt 3 || ( "$1" != performance && "$1" != full ) ]]; then
  echo "usage: $(basename "$0") performance|full NDEVICES EXPERIMENT[:variant] [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
MODE="$1"
NDEV="$2"
shift 2
USER_WORKDIR="${WORKDIR:-}"
# shellcheck source=launchers/common.sh
source "${ROOT}/launchers/common.sh"
mim_setup "$@"
# shellcheck source=launchers/npu/env.sh
source "${ROOT}/launchers/npu/env.sh"

if [[ -z "$USER_WORKDIR" ]]; then
  WORKDIR="${WORKDIR}-${MODE}-${NDEV}p"
  # a performance run always starts from scratch: a new directory per run
  if [[ "$MODE" == performance ]]; then
    WORKDIR="${WORKDIR}-$(date +%Y%m%d-%H%M%S)"
  fi
fi
ARGS=(--config.device=npu)
if [[ "$MODE" == performance ]]; then
  # No evaluation or checkpoint before the last step (both run once at the end).
  ARGS+=(--config.steps="${PERF_STEPS:-200}" --config.log_every="${PERF_LOG_EVERY:-20}"
         --config.eval_every=1000000000 --config.checkpoint_every=1000000000)
fi
if [[ "$NDEV" == 1 ]]; then
  export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_DEVICE_ID:-0}"
  CMD=("$PYTHON" -m mim.main)
else
  CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NDEV" -m mim.main)
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  run "${CMD[@]}" --config="$EXPERIMENT" --workdir="$WORKDIR" "${ARGS[@]}" "${OVERRIDES[@]}"
  exit 0
fi
mkdir -p "$WORKDIR"
LOG="${WORKDIR}/train_${MODE}_${NDEV}p.log"
start=$(date +%s)
set +e
run "${CMD[@]}" --config="$EXPERIMENT" --workdir="$WORKDIR" "${ARGS[@]}" "${OVERRIDES[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
end=$(date +%s)
echo "E2E training duration: $((end - start)) s (log: $LOG)"
if [[ $rc -ne 0 ]]; then
  echo "training failed with exit status $rc" >&2
  exit "$rc"
fi
"$PYTHON" "${ROOT}/launchers/report.py" --workdir="$WORKDIR" --devices="$NDEV" --mode="$MODE"
