#!/usr/bin/env bash
# The accelerator rows of BENCHMARKS.md in one go: each `mim.bench` command writes its
# figures to OUT/<name>.json (with the command itself), then the table rows are printed,
# ready to paste. Runs what is cheap first, so a short session still gets the main rows.
#
#   launchers/benchmarks.sh                   # OUT=runs/bench
#   OUT=runs/h200 DATA_DIR=/data/imagenet ONLY="mae_base vit_b16_finetune" launchers/benchmarks.sh
#
# Environment: OUT, PYTHON, DATA_DIR (ImageNet-layout JPEGs for the input-pipeline rows;
# skipped without it), ONLY (a subset of the names below), STEPS (timed steps, 30).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-runs/bench}"
STEPS="${STEPS:-30}"
mkdir -p "$OUT"

bench() {  # name, then mim.bench flags
  local name=$1
  shift
  if [[ -n "${ONLY:-}" && " ${ONLY} " != *" ${name} "* ]]; then
    return 0
  fi
  echo "== ${name}" >&2
  "$PYTHON" -m mim.bench "$@" --json="${OUT}/${name}.json"
}

T=(--steps="$STEPS" --warmup=10)
bench mae_base          --config=experiments/mae_base.py:perf --config.batch_size=256 "${T[@]}"
bench vit_b16_finetune  --config=experiments/mae_base_finetune.py:perf --config.batch_size=128 "${T[@]}"
bench vit_b32           --config=experiments/vit_b32.py:perf --config.batch_size=256 "${T[@]}"
bench vit_b32_graphs    --config=experiments/vit_b32.py:perf --config.batch_size=256 --config.cuda_graphs=True --peer=none "${T[@]}"
bench simmim_vit_base   --config=experiments/simmim_vit_base.py:perf --config.batch_size=128 "${T[@]}"
bench simmim_swin_base  --config=experiments/simmim_swin_base.py:perf --config.batch_size=128 "${T[@]}"
bench mae_linprobe      --config=experiments/mae_base_linprobe.py:perf --config.batch_size=1024 "${T[@]}"
# BEiT pretraining (the tokenizer's share of the FLOPs printed apart; a random tokenizer
# costs what the released one does), BEiT fine-tuning, MoBY (momentum branch apart), and
# MoBY's linear evaluation
bench beit_base         --config=experiments/beit_base.py:perf --config.batch_size=128 "${T[@]}"
bench beit_finetune     --config=experiments/beit_base_finetune.py:perf --config.batch_size=128 "${T[@]}"
bench moby_swin_tiny    --config=experiments/moby_swin_tiny.py:perf --config.batch_size=128 "${T[@]}"
bench moby_linear       --config=experiments/moby_swin_tiny_linear.py:perf --config.batch_size=256 "${T[@]}"
if [[ -n "${DATA_DIR:-}" ]]; then
  D=(--config=experiments/mae_base.py --mode=data --data_dir="$DATA_DIR" --steps=50
     --config.data.num_workers="$(nproc)")
  bench data_worker     "${D[@]}"
  bench data_uint8      "${D[@]}" --config.data.device_normalize=True
  bench data_nvjpeg     "${D[@]}" --config.data.device_normalize=True --config.data.decode=device
fi

shopt -s nullglob
files=("$OUT"/*.json)
if (( ${#files[@]} )); then
  "$PYTHON" -m mim.bench --rows="$(IFS=,; echo "${files[*]}")"
fi
