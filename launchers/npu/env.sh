# shellcheck shell=bash
# Ascend environment for the NPU launchers: sourced, not run. Every variable can be
# preset by the caller; these are the defaults of Ascend's PyTorch model-zoo scripts.

# CANN toolkit: libraries, ops and tools on the paths (set_env.sh of the toolkit).
for f in "${ASCEND_SET_ENV:-}" /usr/local/Ascend/ascend-toolkit/set_env.sh \
         "${HOME}/Ascend/ascend-toolkit/set_env.sh"; do
  if [[ -n "$f" && -f "$f" ]]; then
    set +u  # set_env.sh reads variables that may be unset
    # shellcheck disable=SC1090
    source "$f"
    set -u
    break
  fi
done

# HCCL: generous timeouts for the first (graph-compiling) steps of large models, and
# no trust-list of peer addresses.
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
export HCCL_WHITELIST_DISABLE="${HCCL_WHITELIST_DISABLE:-1}"
# torch_npu: asynchronous operator queue, fused copies of non-contiguous tensors.
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-1}"
export COMBINED_ENABLE="${COMBINED_ENABLE:-1}"
# CANN logs: errors only, to files under ~/ascend/log rather than the console.
export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"
export ASCEND_SLOG_PRINT_TO_STDOUT="${ASCEND_SLOG_PRINT_TO_STDOUT:-0}"
