#!/usr/bin/env bash
# One call of a training run on the lent GPU machine (training/device_run.py; docs/results/README.md).
#
#   scripts/device_train.sh NAME CONFIG [device_run options...]
#
# Generates the synthetic set (fixed seed, all cores) under runs/device/synth, resumes from
# runs/device/NAME when a previous call's hand-back was copied there (carry that folder), trains
# with bf16 on CUDA until the run ends or BUDGET_S seconds (default 500) are spent, and writes
# $OUT/NAME: last.pt / final.pt in parts of <= 15 MiB and runs.jsonl (one record per call), and
# the log $OUT/NAME.log (so at most 7 files go under $OUT/NAME: the tool returns 8 in all).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NAME CONFIG [device_run options...]" >&2
    exit 2
fi
name=$1
config=$2
shift 2
out=${OUT:-runs/device/out}
resume=()
if [ -f "runs/device/$name/last.pt.parts.json" ] || [ -f "runs/device/$name/last.pt" ]; then
    resume=(--resume "runs/device/$name")
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$out"
# SIGINT a minute after the budget: a stuck call still ends inside the tool's 10-minute limit.
timeout --signal=INT $(( ${BUDGET_S:-500} + 60 )) \
    python3 -m training.device_run --config "$config" --name "$name" --out "$out" \
    --device "${DEVICE:-cuda}" --amp "${AMP:-bf16}" --budget-s "${BUDGET_S:-500}" --max-files 7 "${resume[@]}" "$@" \
    2>&1 | tee "$out/$name.log"
