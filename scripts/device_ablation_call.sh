#!/usr/bin/env bash
# Issue 12's ablation call of a GPU session, once call 1 has trained the teacher (its handed-back folder
# copied to runs/device/teacher and carried). Every Table III row but the teacher (student, TGI and full
# DiScene for seeds 0 and 1, the three one-level rows for seed 0) and the two depth rows (student and
# full DiScene with the depth branch fed by the dataset's depth, seed 0) train side by side on the one
# GPU, one process each (benchmarks/reproduce_ablation.py --jobs; all 11 on an H200, 6 at a time on an
# H100): a lite step is bound by the host, so the processes fill each other's gaps. A calibration wave
# of CAL_STEPS steps per row picks the steps per row that end inside FIT_S seconds (data generation and
# the teacher's evaluation included); the rows then train from scratch. --publish replaces the table
# and the shipped models only when every row ran.
# Comes back (5 files): ablation.md, ablation.json, lite_distilled.pt and lite_distilled_depth.pt (if
# published), ablation_logs.txt.
#   run: bash scripts/device_ablation_call.sh    carry: ["runs/device/teacher"]    timeout_s: 600
# CPU dry run (TEACHER: the teacher/final.pt of a tiny reproduce_ablation run on DATA; five rows, two at a
# time; PUBLISH empty leaves the shipped files alone):
#   DEVICE=cpu AMP=none BATCH=2 JOBS=2 FIT_S=150 CAL_STEPS=3 WORKERS=0 PUBLISH= OUT=/tmp/dry RESULTS=/tmp/dry_runs \
#   TEACHER=/tmp/abl/runs1/teacher/final.pt DATA=/tmp/abl/synth \
#   FRAMES="--train-frames 4 --val-frames 2 --frames-per-scene 2 --width 128 --height 96 --synth-seed 7" \
#   bash scripts/device_ablation_call.sh --seeds 0 --level-seeds --set model_overrides.decoder.num_queries=32 \
#   --set "model_overrides.decoder.num_refines=[2,4]" --set "model_overrides.image_size=[96,128]" \
#   --set data.frequency_frames=4 --set optim.warmup_iters=1
set -uo pipefail
out=${OUT:?}
fit_s=${FIT_S:-500}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# with NN=fused every process compiles the search at its start: one compile thread each, not one per core
export TORCHINDUCTOR_COMPILE_THREADS=1
results=${RESULTS:-runs/ablation}
# eleven processes at once where the GPU has the H200's memory; six (two waves) with an H100's 78 GiB,
# since each process may hold several GiB (not measured)
jobs=${JOBS:-$(python3 -c 'import torch; print(11 if torch.cuda.get_device_properties(0).total_memory > 100 * 2**30 else 6)' \
    2>/dev/null || echo 6)}
publish=${PUBLISH---publish}
# Eleven processes share the GPU's memory: the search chunks are capped at 256 Mi distances (1 GiB) each
# instead of sized from the free memory, which every process would read before the others allocate.
# NN=fused where call 1's task_loss_cuda.json found the fused search faster (it stores no chunks at all).
# SIGINT 40 s after the budget: the rows still running save and stop, and the results are written.
# shellcheck disable=SC2086  # $FRAMES and $publish: options
timeout --signal=INT --kill-after=30 $((fit_s + 40)) python3 benchmarks/reproduce_ablation.py \
    --device "${DEVICE:-cuda}" --amp "${AMP:-bf16}" --batch "${BATCH:-32}" --jobs "$jobs" \
    --workers "${WORKERS:-2}" --threads 1 --synth-workers 16 --teacher "${TEACHER:-runs/device/teacher}" \
    --data "${DATA:-runs/device/synth}" ${FRAMES:---train-frames 840 --val-frames 120} \
    --seeds 0 1 --depth-rows --steps 100000 --fit-s "$fit_s" --calibrate-steps "${CAL_STEPS:-30}" \
    --set loss.nn_chunk_elements=268435456 --set "loss.nn_backend=${NN:-auto}" --out "$results" --quiet $publish "$@"
status=$?
cp "$results/results/ablation.md" "$results/results/ablation.json" "$out/" 2>/dev/null
if [ "$status" -eq 0 ] && [ -n "$publish" ]; then
    cp discene_ros/data/lite_distilled.pt discene_ros/data/lite_distilled_depth.pt "$out/"
fi
for log in "$results"/calibration/logs/*.log "$results"/logs/*.log; do
    [ -f "$log" ] && { echo "==== $log"; cat "$log"; }
done > "$out/ablation_logs.txt"
echo "reproduce_ablation exit status ${status}"
exit "$status"
