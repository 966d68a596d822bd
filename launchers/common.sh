# shellcheck shell=bash
# Shared by the launchers: sourced, not run. Sets ROOT, EXPERIMENT, WORKDIR, PYTHON
# and OVERRIDES from the command line "EXPERIMENT[:variant] [--config.x=y ...]".

usage() {
  cat >&2 <<USAGE
usage: $(basename "$0") EXPERIMENT[:variant] [--config.FIELD=VALUE ...]
  e.g. $(basename "$0") experiments/mae_base.py --config.data.path=/data/imagenet
environment: WORKDIR (default runs/<experiment>[-<variant>]), PYTHON (default python),
  DRY_RUN=1 (print the command, do not run it)
${LAUNCHER_ENV_HELP:-}
USAGE
  exit 2
}

mim_setup() {
  if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    usage
  fi
  EXPERIMENT="$1"
  shift
  # shellcheck disable=SC2034  # used by the launcher that sources this file
  OVERRIDES=("$@")
  local file="${EXPERIMENT%%:*}"
  if [[ ! -f "$file" ]]; then
    echo "$(basename "$0"): experiment file not found: $file" >&2
    exit 2
  fi
  local name variant=""
  name="$(basename "$file" .py)"
  if [[ "$EXPERIMENT" == *:* ]]; then
    variant="-${EXPERIMENT#*:}"
  fi
  # shellcheck disable=SC2034
  WORKDIR="${WORKDIR:-runs/${name}${variant//[^A-Za-z0-9_.=-]/_}}"
  PYTHON="${PYTHON:-python}"
  # The mim package of this checkout, also when it is not pip-installed.
  export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
  export PYTHONUNBUFFERED=1
}

# Number of accelerators on this host (NPUs, else GPUs, else 1).
local_devices() {
  "$PYTHON" - <<'PY' 2>/dev/null || echo 1
import importlib.util, torch
if importlib.util.find_spec("torch_npu"):
    import torch_npu  # noqa: F401
    print(max(torch.npu.device_count(), 1))
else:
    print(max(torch.cuda.device_count(), 1))
PY
}

# Print and run the launcher's command in place of the shell, so that signals (SIGTERM
# from a scheduler) reach torchrun / mim directly (DRY_RUN=1: print only).
run_exec() {
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    exec "$@"
  fi
}

# Print and run a command (DRY_RUN=1: print only).
run() {
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}
