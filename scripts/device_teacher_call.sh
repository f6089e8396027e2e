#!/usr/bin/env bash
# Issue 12's first call of a GPU session: the training throughput at this code (lite student,
# distillation step, teacher step; batch 32, bf16), then the lite teacher trained in what is left of
# CALL_S seconds, its --steps sized from the teacher row just measured so that its lr schedule ends
# inside the budget (docs/results/README.md, "Running on the device machine"). At most 6 files come
# back: the throughput JSON, teacher.log and teacher/ (final.pt in parts, runs.jsonl).
# CPU dry run: DEVICE=cpu AMP=none SIZE="--batch 2 --frames 8 --steps 2 --warmup 1" TEACHER_BATCH=2 \
#     OUT=/tmp/dry CALL_S=300 bash scripts/device_teacher_call.sh --scenes 3 --data /tmp/dry_synth --work /tmp/dry_work
set -uo pipefail
out=${OUT:?}
call_s=${CALL_S:-540}  # the tool's limit is 600 s; device_train.sh may overrun its budget by up to 60 s
batch=${TEACHER_BATCH:-32}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
# shellcheck disable=SC2086  # $SIZE: options
timeout --signal=INT --kill-after=15 150 python3 benchmarks/bench_train_throughput.py --device "${DEVICE:-cuda}" \
    --modes student distill teacher ${SIZE:---batch 32 --frames 256 --steps 20 --warmup 5} --amp bf16 \
    --workers 12 --synth-workers 16 --threads 4 --json "$out/train_throughput_cuda.json"
budget=$((call_s - SECONDS - 20))
if [ "$budget" -lt 120 ]; then
    echo "teacher not started: ${budget}s left"
    exit 0
fi
# training seconds = budget - 45 s kept for eval and saving - ~30 s of data generation and start-up
steps=$(python3 - "$out/train_throughput_cuda.json" "$budget" "$batch" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["mode"] == "teacher"]
budget, batch = int(sys.argv[2]), int(sys.argv[3])
print(max(10, int(0.9 * rows[-1]["samples_per_s"] * (budget - 75) / batch)))
PY
) || { echo "no teacher row: teacher not started"; exit 1; }
echo "teacher: ${budget}s budget, ${steps} steps of ${batch}"
OUT=$out BUDGET_S=$budget scripts/device_train.sh teacher training/configs/lite_teacher.yaml \
    --steps "$steps" --batch "$batch" --workers 12 --set data.frequency_frames=200 --set progress=false "$@"
