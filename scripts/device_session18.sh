#!/usr/bin/env bash
# Session 18's one device call (15 minutes of GPU for the whole session, machine start included):
#   1. issue 10: `device_frame_path.sh trims` (the host share beside session 8's code, the compiled
#      paper_student rows at this code), its three outputs packed into $OUT/issue10.tgz;
#   2. issue 12: training throughput (lite student and distillation step, batch 8 and 32, bf16);
#   3. issue 12: a lite teacher pilot in what is left of CALL_S, its steps sized from step 2's
#      distillation rate so that its lr schedule runs to the end inside the budget.
# Carry .whl and .before (see device_frame_path.sh). At most 7 files come back. A CPU dry run of
# steps 2-3: FRAME_PATH=0 DEVICE=cpu AMP=none BENCH_ARGS="--batch 2 --steps 2 --warmup 1 --frames 16" MIN_STEPS=2 \
#     TEACHER_BATCH=2 OUT=/tmp/dry CALL_S=400 bash scripts/device_session18.sh --scenes 3 --data /tmp/dry_synth
set -uo pipefail
out=${OUT:?}
call_s=${CALL_S:-540}  # the tool's limit is 600 s; the teacher may overrun its budget by up to 60 s
fp=/tmp/issue10
mkdir -p "$fp"
[ "${FRAME_PATH:-1}" = 0 ] || OUT=$fp bash scripts/device_frame_path.sh trims
tar czf "$out/issue10.tgz" -C "$fp" .

export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
timeout --signal=INT --kill-after=15 120 python3 benchmarks/bench_train_throughput.py --device "${DEVICE:-cuda}" \
    ${BENCH_ARGS:---batch 8 32 --steps 30 --warmup 5 --frames 256} --amp bf16 --workers 12 --synth-workers 16 \
    --threads 4 --json "$out/train_throughput_cuda.json"

budget=$((call_s - SECONDS - 20))
if [ "$budget" -lt 120 ]; then
    echo "teacher pilot skipped: ${budget}s left"
    exit 0
fi
# samples/s of a teacher step ~ 0.7 x the distillation step (which runs the teacher forward only);
# training seconds = budget - 45 s kept for eval and saving - ~25 s of data and start-up
steps=$(python3 - "$out/train_throughput_cuda.json" "$budget" "${MIN_STEPS:-50}" "${TEACHER_BATCH:-32}" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
sps = [r["samples_per_s"] for r in rows if r["mode"] == "distill"][-1:] or [50.0]  # the largest batch
print(max(int(sys.argv[3]), int(0.7 * sps[0] * (int(sys.argv[2]) - 70) / int(sys.argv[4]))))
PY
) || steps=300
echo "teacher pilot: ${budget}s budget, ${steps} steps"
OUT=$out BUDGET_S=$budget scripts/device_train.sh teacher training/configs/lite_teacher.yaml \
    --steps "$steps" --batch "${TEACHER_BATCH:-32}" --workers 12 --eval-each-call --set data.frequency_frames=200 \
    --set log_every=50 --set progress=false "$@"
