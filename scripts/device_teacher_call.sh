#!/usr/bin/env bash
# Issue 12's first call of a GPU session: the task loss's nearest-neighbour search at batch 32 (the
# chunked GEMM against the compiled fused reductions, loss.nn_backend cdist / fused; the faster one is
# used from then on), the training throughput at this code (lite teacher step, student step,
# distillation step; batch 32, bf16), each eager and with compile=inductor (training/compiled.py), then
# the lite teacher trained in what is left of CALL_S seconds, eager or compiled, whichever the teacher
# rows say gives more steps in that time (compile time counted), its --steps sized from that row so that
# its lr schedule ends inside the budget (docs/results/README.md, "Running on the device machine"). The
# benchmark writes its JSON after every row, so a row cut short by BENCH_S loses only itself. First of
# all, a few seconds: benchmarks/check_cuda_providers.py, issue 14's check of export/cuda_mem.py's
# providers on a real GPU. 8 files come back, the tool's limit: three JSONs (providers, search,
# throughput), teacher.log and teacher/ (final.pt in two parts, its manifest, runs.jsonl).
# CPU dry run: DEVICE=cpu AMP=none SIZE="--batch 2 --frames 8 --steps 2 --warmup 1" TEACHER_BATCH=2 \
#     COMPILE="none aot_eager" SEARCH_BATCH=2 OUT=/tmp/dry CALL_S=400 BENCH_S=200 \
#     bash scripts/device_teacher_call.sh --scenes 3 --data /tmp/dry_synth --work /tmp/dry_work
#
# Continuation: when the carried runs/device/teacher holds a final.pt (whole or final.pt.parts.json; a
# previous call's hand-back), the search and the throughput were measured already (session 21:
# docs/results/task_loss_cuda.json, train_throughput_cuda.json), so after the providers check the whole
# rest of CALL_S trains the teacher on from that final.pt (device_run --init: its weights, a fresh
# optimiser, lr schedule and step; its records and checkpoints count the steps before as steps_before),
# eager with loss.nn_backend=NN (fused), --steps sized from TEACHER_SAMPLES_S (296.45: session 21's
# teacher run at batch 32, eager, fused search) by the formula below. A folder that also holds a last.pt
# is refused (device_train.sh would resume it). 6 files come back: cuda_providers.json, teacher.log and
# teacher/. TEACHER_FROM=FILE continues from a checkpoint file of the tree instead (committed, so it travels
# without a carry; session 21's teacher is checkpoints/lite_teacher_gpu_s21.pt); with a carried final.pt
# too, the call refuses. CPU dry run (a teacher's hand-back copied to runs/device/teacher first):
#     DEVICE=cpu AMP=none TEACHER_BATCH=2 TEACHER_SAMPLES_S=0.2 OUT=/tmp/dry CALL_S=300 \
#     bash scripts/device_teacher_call.sh --scenes 3 --data /tmp/dry_synth --work /tmp/dry_work
set -uo pipefail
out=${OUT:?}
call_s=${CALL_S:-540}  # the tool's limit is 600 s; device_train.sh may overrun its budget by up to 60 s
batch=${TEACHER_BATCH:-32}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
# the benchmark's compiled graphs are reused by the teacher run from this cache
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/runs/device/inductor_cache}
carried=runs/device/teacher
continuation=
if [ -f "$carried/final.pt" ] || [ -f "$carried/final.pt.parts.json" ]; then
    continuation=$carried
fi
if [ -n "${TEACHER_FROM:-}" ]; then  # a committed teacher checkpoint (it travels with the tree: no carry)
    [ -f "$TEACHER_FROM" ] || { echo "TEACHER_FROM=$TEACHER_FROM: no such checkpoint file" >&2; exit 2; }
    [ -z "$continuation" ] || { echo "TEACHER_FROM and a carried $carried/final.pt: give one of the two" >&2; exit 2; }
    continuation=$TEACHER_FROM
fi
if [ -n "$continuation" ] && { [ -f "$carried/last.pt" ] || [ -f "$carried/last.pt.parts.json" ]; }; then
    echo "$carried holds a last.pt: keep last.pt alone to resume, or a final.pt alone (or TEACHER_FROM) to continue" >&2
    exit 2
fi
timeout --signal=INT --kill-after=5 30 python3 benchmarks/check_cuda_providers.py --out "$out/cuda_providers.json"
init=()
if [ -n "$continuation" ]; then
    nn=${NN:-fused}
    rows=-  # no benchmark: one eager row at TEACHER_SAMPLES_S
    init=(--init "$continuation")
else
    # the search: forward + backward of the lite task loss at batch 32, each backend's first call (the fused
    # one compiles) and median of 5; the faster of the two that gives the same loss ("choice") is kept
    timeout --signal=INT --kill-after=10 "${SEARCH_S:-90}" python3 benchmarks/bench_task_loss.py \
        --device "${DEVICE:-cuda}" --batch "${SEARCH_BATCH:-32}" --backends cdist,fused --modes batched --repeats 5 \
        --json "$out/task_loss_cuda.json"
    nn=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["choice"] or "auto")' \
        "$out/task_loss_cuda.json" 2>/dev/null) || nn=auto
    echo "nearest-neighbour search: loss.nn_backend=${nn}"
    budget_bench=$(( ${BENCH_S:-270} - SECONDS ))
    rows=$out/train_throughput_cuda.json
    # shellcheck disable=SC2086  # $SIZE and $COMPILE: options
    timeout --signal=INT --kill-after=15 "$budget_bench" python3 benchmarks/bench_train_throughput.py \
        --device "${DEVICE:-cuda}" --modes teacher student distill --compile ${COMPILE:-none inductor} \
        ${SIZE:---batch 32 --frames 256 --steps 20 --warmup 5} --amp "${AMP:-bf16}" \
        --workers 12 --synth-workers 16 --threads 4 --set "loss.nn_backend=${nn}" --json "$rows"
fi
budget=$((call_s - SECONDS - 20))
if [ "$budget" -lt 120 ]; then
    echo "teacher not started: ${budget}s left"
    exit 0
fi
# training seconds = budget - 45 s kept for eval and saving - ~30 s of data generation and start-up;
# a compiled row pays its warm-up time (compiling, at most, with the cache above) once more
read -r steps backend < <(python3 - "$rows" "$budget" "$batch" "${TEACHER_SAMPLES_S:-296.45}" <<'PY'
import json, sys
path, budget, batch, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if path == "-":
    rows = [{"samples_per_s": rate}]
else:  # a compiled row that fell back to eager is left out
    rows = [r for r in json.load(open(path))["rows"]
            if r["mode"] == "teacher" and (r.get("compile", "none") == "none" or r.get("compiled"))]
def seconds(r):
    return budget - 75 - (r.get("first_steps_s", 0) if r.get("compile", "none") != "none" else 0)
best = max(rows, key=lambda r: r["samples_per_s"] * seconds(r))
print(max(10, int(0.9 * best["samples_per_s"] * seconds(best) / batch)), best.get("compile", "none"))
PY
) || { echo "no teacher row: teacher not started"; exit 1; }
[ -n "${steps:-}" ] || { echo "no teacher row: teacher not started"; exit 1; }
echo "teacher: ${continuation:+continuing from ${continuation}, }${budget}s budget, ${steps} steps of ${batch}," \
    "compile=${backend}, loss.nn_backend=${nn}"
# back: teacher/ (final.pt in two parts, its manifest, runs.jsonl; last.pt is over the limits), the log and
# the JSONs (providers, search, throughput; a continuation only the first): 8 files at most
OUT=$out BUDGET_S=$budget scripts/device_train.sh teacher training/configs/lite_teacher.yaml "${init[@]}" \
    --steps "$steps" --batch "$batch" --workers 12 --set data.frequency_frames=200 --set progress=false \
    --set "compile=${backend}" --set "loss.nn_backend=${nn}" --max-files 5 "$@"
