#!/usr/bin/env bash
# Issue 10's GPU measurements, as two calls of the device tool (docs/results/frame_path.md):
#
#   bash scripts/device_frame_path.sh bench   # CUDA tests, frame path (CUDA graphs; then torch.compile),
#                                             # FP16 agreement of the shipped lite on its val split
#   bash scripts/device_frame_path.sh train   # paper_student trained a few hundred steps on the GPU,
#                                             # its FP16 agreement and its frame path
#   bash scripts/device_frame_path.sh all     # tests, CUDA graphs, lite compiled, then train (one call)
#   bash scripts/device_frame_path.sh final   # tests, CUDA graphs, lite compiled, paper_student FP16 compiled
#   bash scripts/device_frame_path.sh recheck # tests, CUDA graphs: the rows again after the feeder and
#                                             # OpenMP-pool fixes (docs/results/frame_path.md, GPU section)
#   bash scripts/device_frame_path.sh fp32    # tests, paper_student trained as in `train`, its TF32 and
#                                             # TF32-convolutions agreement with IEEE FP32, then its FP32
#                                             # frame path (compile + graphs) IEEE, TF32 convolutions, TF32
#                                             # (time limits 40 + 200 + 60 + 3 x 62 s; earlier H200 calls:
#                                             # training 131-154 s, 26-60 s per compiled variant)
#   bash scripts/device_frame_path.sh fp32-recheck # fp32, then the CUDA-graph rows and lite compiled again
#                                             # with the fixed feeder (one call, ~7 min)
#   bash scripts/device_frame_path.sh replay  # tests, discene-replay on CUDA (defaults, --tf32, --fp16), then
#                                             # paper_student compiled FP16 and TF32 with the fixed feeder (~3 min)
#   bash scripts/device_frame_path.sh profile # py-spy samples (Python stacks) of the frame loop, lite fp32 CUDA
#                                             # graph, bgr8 + JPEG: every thread idle or not, then the GIL holder
#                                             # only: where each stage thread's time goes (~1 min; needs the
#                                             # py-spy wheel in .whl)
#   bash scripts/device_frame_path.sh remeasure # final, then profile, then PyTorch's default FP32 (TF32 convolutions,
#                                             # IEEE matmuls: --tf32-convolutions) on paper_student, its lite
#                                             # agreement (~6 min; call 7 ran it through a probe, before the option)
#   bash scripts/device_frame_path.sh profile-conv # profile, then paper_student trained as in `train` and its
#                                             # TF32-convolutions agreement with IEEE (~4 min)
#   bash scripts/device_frame_path.sh decode-stage # tests; lite with and without the decode stage of its own
#                                             # (CUDA graphs fp32 + fp16, then compiled fp32), side by side
#                                             # in one call; lite fed by a 30 Hz camera (the node's latency);
#                                             # lite with pipelining off (the fused path: one frame at a time);
#                                             # paper_student compiled FP16 and FP32 with the
#                                             # tf32_convolutions option itself (~6 min: call 7 took 17 s for
#                                             # the tests, 25 s for both configs' graphs, 67 s for lite compiled)
#   bash scripts/device_frame_path.sh trims   # tests; the previous commit (.before: git archive of it) and this
#                                             # tree side by side, interleaved, two rounds: lite CUDA graphs, this
#                                             # tree with its decode rule and with a decode stage for every input;
#                                             # paper_student CUDA graphs before/after; each host step alone
#                                             # (docs/results/device_runs/issue10_call10_probe.py) in both trees;
#                                             # paper_student compiled FP16 and FP32 (TF32 convolutions); before
#                                             # all that, JPEG decoding per DCT scale on that host (~6 min).
#                                             # Before it: echo /.before/ >> .git/info/exclude;
#                                             # mkdir .before; git archive 79bf64f | tar -x -C .before
#                                             # (session 8's code), and carry .whl and .before
#   bash scripts/device_frame_path.sh launch-path # call 11: tests; session 23's two changes (the preprocessing
#                                             # queued at launch into the network's inputs; a watcher thread,
#                                             # dropped after call 12) against
#                                             # .before (the commit before both) and .mid (the first alone),
#                                             # interleaved, three rounds of lite CUDA graphs, every tree through
#                                             # this tree's bench_frame_path.py (it times the launch); each
#                                             # host step alone in each tree; paper_student CUDA graphs before
#                                             # and now; this tree with a 30 Hz camera and paper_student
#                                             # compiled FP16 and FP32 (TF32 convolutions) (~5 min). Before it:
#                                             # mkdir .before; git archive <commit> -- . ':!checkpoints' ':!docs'
#                                             # | tar -x -C .before (likewise .mid); carry .whl, .before, .mid
#   bash scripts/device_frame_path.sh launch-fix # tests; after call 11's fix: .before against this tree, two
#                                             # rounds of lite CUDA graphs; paper_student CUDA graphs; a 30 Hz
#                                             # camera (~2.5 min; call 12 ran it with three rounds and this
#                                             # tree both with the watcher thread and polling, --launch-wait,
#                                             # before the watcher was dropped)
#   bash scripts/device_frame_path.sh unfused-wait # tests; the unfused CUDA path (--no-cuda-graph: eager network,
#                                             # post-processing as torch ops on the device) of .before against
#                                             # this tree, interleaved, two rounds, lite and paper_student bgr8:
#                                             # the finish stage's sleeping event against torch.cuda.synchronize
#                                             # (frame rate, process CPU per frame; ~3 min); then
#                                             # check_cuda_providers.py (the TensorRT path's wait); then
#                                             # the whole-frame graph probe (session 28: one graph of upload,
#                                             # preprocessing, network, post-processing and the copies back,
#                                             # captured at all? its replay's host time against launch; ~1 min);
#                                             # then profile (py-spy: where the fused launch's in-loop wait goes,
#                                             # the GIL or not; ~2 min). .before as launch-fix; carry .whl
#                                             # with py-spy's wheel too
#   bash scripts/device_frame_path.sh frame-graph # session 30: tests; the frame graph (one CUDA graph per buffer
#                                             # slot: upload, preprocessing, network, post-processing, copies
#                                             # back) on and off, interleaved, two rounds, lite and paper_student
#                                             # CUDA graphs; paper_student compiled FP16 with it; then profile
#                                             # (~6 min; carry .whl)
#   bash scripts/device_frame_path.sh frame-graph-memory # tests; the frame graphs in the network graph's memory
#                                             # pool: frame graph on and off, lite and paper_student bgr8 (~2 min)
#   bash scripts/device_frame_path.sh replay-frame-graph # discene-replay on CUDA, the sample bag, with the frame
#                                             # graph and without, FP32 and FP16: the same metrics? (~1 min)
#   bash scripts/device_frame_path.sh next    # what session 30 left: tests, replay-frame-graph, frame-graph-memory
#                                             # (rows now with cuda_reserved_mb), unfused-wait's comparison (.before
#                                             # with its own bench) (~5 min; carry .whl with apsw, backports.zstd
#                                             # and lz4, and .before as launch-fix)
#   bash scripts/device_frame_path.sh prepare-thread # session 31: tests; the launch-ahead loop without its prepare
#                                             # thread (the finish stage prepares each frame before launching it)
#                                             # against the loop with it, interleaved, two rounds, lite and
#                                             # paper_student bgr8: with a prepare thread (before), without it
#                                             # and a decode thread (the node: frames located there), without
#                                             # either (the replay); lite JPEG with and without; then
#                                             # replay-frame-graph (the replay now has no prepare thread); then
#                                             # profile (py-spy over the loop as it is now) (~6 min; carry .whl as
#                                             # for next, py-spy's wheel too)
#   bash scripts/device_frame_path.sh after-prepare-thread # each host step alone (issue10_call10_probe.py), a third
#                                             # round of prepare-thread, frame-graph-memory, unfused-wait (~6 min;
#                                             # carry .whl and .before as for next)
#   bash scripts/device_frame_path.sh camera-rate-prepare # lite FP32 bgr8 fed by a 30 Hz camera (newest frame wins),
#                                             # the node's loop with the prepare thread and without: latency, process
#                                             # CPU per frame (~1 min)
#   bash scripts/device_frame_path.sh unfused-wait-probe # the unfused path's sleeping wait against a spinning one
#                                             # in this tree, interleaved, two rounds, paper_student and lite FP32
#                                             # bgr8 (docs/results/device_runs/issue10_unfused_wait_probe.py; ~1.5 min)
#   bash scripts/device_frame_path.sh host-steps-sequence # session 32: lite's host steps in a one-thread loop's
#                                             # order right after the device wait, and back to back
#                                             # (bench_host_steps.py --fused), FP32 and FP16, interleaved with
#                                             # the one-thread loop itself (bench_frame_path, prepare thread and
#                                             # decode stage off), two rounds: the steps' own cost as the loop
#                                             # meets them against what the loop adds; then paper_student
#                                             # compiled FP16 bgr8 in the node's loop of session 31 (its host
#                                             # share was last measured with the prepare thread) (~4.5 min)
#   bash scripts/device_frame_path.sh device-cloud # session 34: tests (test_device_cloud.py with them); the
#                                             # fused path with the occupied voxels compacted into the cloud's
#                                             # rows on the device (--device-cloud on) against the grids (off),
#                                             # interleaved: lite bgr8 FP32 + FP16 in the node's loop, two rounds;
#                                             # lite's host steps in sequence, FP16, each way; paper_student bgr8
#                                             # each way, one round (~7 min; carry .whl)
#   bash scripts/device_frame_path.sh decode-thread # session 35: the node's loop with its decode thread
#                                             # decoding raw images (as up to session 34) against only taking
#                                             # them, the finish stage decoding (the node's rule since then),
#                                             # interleaved, two rounds, lite bgr8 FP32 + FP16, device cloud off
#                                             # and on (~2 min: call 18 ran lite + paper_student rows in 16-17 s
#                                             # each; carry .whl)
#   bash scripts/device_frame_path.sh cloud-and-decode # device-cloud, then decode-thread, in one call
#                                             # (~5-6 min; the steps' own limits add up to more than a call's
#                                             # 10 minutes, and the rows are appended as each step ends)
#   bash scripts/device_frame_path.sh session36 # tests (the geometry and host-compaction kernels bit for bit on
#                                             # the device's build too); session 35's end (.before: b190996)
#                                             # against this tree, interleaved, two rounds of lite CUDA graphs,
#                                             # paper_student, lite at a 30 Hz camera (launch-fix's steps); then
#                                             # device-cloud's pairs: the device's compaction against the host's
#                                             # one pass now (~4 min, then up to 7 more; the call's limit may cut
#                                             # the last steps). Before it: mkdir .before; git archive b190996
#                                             # -- . ':!checkpoints' ':!docs' | tar -x -C .before; carry .whl, .before
#
# Carry .whl (rosbags and its needs, for the message factory) and .devdata (the shipped model's val
# split, runs/synth_lite's 80 val frames). Every stage has its own time limit and a failed stage
# does not stop the next; everything lands under $OUT (at most 8 files per call).
set -uo pipefail
stages="bench|train|all|final|recheck|fp32|fp32-recheck|replay|profile|remeasure|profile-conv|decode-stage|trims|launch-path|launch-fix|unfused-wait|frame-graph|frame-graph-memory|replay-frame-graph|next|prepare-thread|after-prepare-thread|unfused-wait-probe|camera-rate-prepare|host-steps-sequence|device-cloud|decode-thread|cloud-and-decode|session36"
stage=${1:?usage: $0 $stages}
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
log=$out/$stage.log
# the CPU post-processing kernel (models/native_postprocess.py) for the host-side paths; where it cannot
# be built the torch ops run (the benchmarks' start-up lines say which)
python3 setup.py -q build_ext --inplace >> "$log" 2>&1 || echo "native post-processing kernel not built" | tee -a "$log"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log its wall time and exit code
    local limit=$1 name=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, numpy, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'numpy', numpy.__version__, 'ort', onnxruntime.__version__)"; nproc; } 2>&1 | tee -a "$log"

tests() {  # tests [SECONDS]
    step "${1:-90}" "device-path tests (torch 2.11; the pinned-upload test runs only on CUDA)" python3 -m pytest -q \
        -p no:cacheprovider tests/test_preprocess_device.py tests/test_cuda_mem.py tests/test_backends.py \
        tests/test_fused_postprocess.py tests/test_device_cloud.py tests/test_native_geometry.py \
        tests/test_native_arguments.py -k "device or cuda or static or graph or fused or launch or dense or compaction \
        or geometry or rigid or checked or extreme or overflow or unaligned"
}
graphs() {  # both configs, CUDA graphs (post-processing fused), fp32 + fp16, bgr8 + jpeg
    step 170 "frame path, CUDA graphs" python3 benchmarks/bench_frame_path.py --device cuda \
        --configs lite paper_student --frames 300 --json "$out/frame_path_gpu.json" --append
}
agreement_lite() {
    step 75 "FP16 agreement, shipped lite, val split" python3 benchmarks/fp16_agreement.py \
        --checkpoint discene_ros/data/lite_distilled.pt --data .devdata/synth_lite_val --device cuda \
        --onnx --onnx-frames 80 --json "$out/fp16_agreement.json" --append
}
compiled() {  # torch.compile + CUDA graphs for the given configs
    step 150 "frame path, torch.compile + CUDA graphs ($*)" python3 benchmarks/bench_frame_path.py --device cuda \
        --configs "$@" --frames 300 --compile --json "$out/frame_path_gpu.json" --append
}
train_student() {  # paper_student a few hundred steps; sets $ckpt
    step 200 "paper_student, a few hundred steps" python3 -m training.device_run --config paper_student \
        --name paper_student --steps 400 --batch 8 --amp bf16 --workers "$(nproc)" --device cuda --budget-s 180 \
        --reserve-s 35 --scenes 60 --out /tmp/handback --work /tmp/work --data /tmp/synth \
        --set optim.warmup_iters=50 --set log_every=25 --set ckpt_every=200 --set progress=false \
        --set loss.class_frequencies=null --set optim.lr_by_epoch=false
    cp /tmp/handback/paper_student/runs.jsonl "$out/paper_student_runs.jsonl" 2>/dev/null
    ckpt=/tmp/work/paper_student/final.pt
    [ -f "$ckpt" ] || ckpt=/tmp/work/paper_student/last.pt
}
train_paper() {  # paper_student a few hundred steps; its FP16 agreement and its frame path
    train_student
    step 100 "FP16 agreement, trained paper_student, val split" python3 benchmarks/fp16_agreement.py \
        --checkpoint "$ckpt" --data /tmp/synth --device cuda --max-frames 64 --onnx --onnx-frames 8 \
        --score-threshold 0.3 --json "$out/fp16_agreement.json" --append
    step 120 "frame path, trained paper_student, compile + CUDA graphs" python3 benchmarks/bench_frame_path.py \
        --device cuda --configs paper_student --weights "paper_student=$ckpt" --frames 300 --compile \
        --json "$out/frame_path_gpu_trained.json"
}
fp32_paper() {  # trained paper_student in FP32: TF32 agreement, then FP32 frame path per variant
    train_student
    step 60 "TF32 / TF32-convolutions agreement with IEEE FP32, trained paper_student, val split" \
        python3 benchmarks/fp16_agreement.py --checkpoint "$ckpt" --data /tmp/synth --device cuda --max-frames 64 \
        --compare tf32 tf32_convolutions --score-threshold 0.3 --json "$out/tf32_agreement.json"
    local flags  # cudnn.benchmark is left out since call 4 measured it changing nothing (tf32_agreement_gpu.json)
    for flags in "" "--tf32-convolutions" "--tf32"; do
        # shellcheck disable=SC2086  # $flags: zero or one option
        step 62 "frame path, trained paper_student FP32, compile + CUDA graphs, ${flags:-IEEE}" \
            python3 benchmarks/bench_frame_path.py --device cuda --configs paper_student --precisions fp32 \
            --weights "paper_student=$ckpt" --frames 300 --compile $flags --json "$out/frame_path_gpu_fp32.json" --append
    done
}

replay_cuda() {  # the replay CLI on the sample bag, on CUDA: the node's defaults, then the speed options
    local flags
    for flags in "" "--tf32" "--fp16"; do
        # shellcheck disable=SC2086  # $flags: zero or one option
        step 60 "discene-replay on CUDA ${flags:-(defaults)}" python3 -m discene_ros.replay --device cuda $flags \
            --out "/tmp/replay${flags}" --json "$out/replay_cuda${flags}.json" --renders 0 --no-progress
    done
}
compiled_paper() {  # paper_student (random weights, threshold 0), compiled + graphs: FP16, then FP32 with TF32
    compiled paper_student --precisions fp16
    step 75 "frame path, torch.compile + CUDA graphs (paper_student FP32, TF32)" python3 benchmarks/bench_frame_path.py \
        --device cuda --configs paper_student --precisions fp32 --tf32 --frames 300 --compile \
        --json "$out/frame_path_gpu.json" --append
}

profile_loop() {  # py-spy over the frame loop, Python stacks: every thread (idle too), then only the GIL holder
    # (--native at 1000 Hz slowed the start-up imports so much that the loop never ran in 120 s: H200, 4 CPUs)
    local spy=/tmp/site/bin/py-spy mode
    if [ ! -x "$spy" ]; then
        echo "py-spy is not installed: carry its wheel in .whl" | tee -a "$log"
        return
    fi
    for mode in idle gil; do
        step 90 "py-spy --$mode over the frame loop (lite fp32, CUDA graph)" "$spy" record --threads "--$mode" \
            --rate 250 --format raw -o "/tmp/frame_loop_$mode.txt" -- python3 benchmarks/bench_frame_path.py \
            --device "${PROFILE_DEVICE:-cuda}" --configs lite --precisions fp32 --frames 300
        gzip -c "/tmp/frame_loop_$mode.txt" > "$out/frame_loop_$mode.txt.gz"
    done
}

conv_tf32() {  # PyTorch's default FP32 (TF32 convolutions, IEEE matmuls): paper_student frame path, lite agreement
    step 90 "frame path, paper_student FP32 with TF32 convolutions only, compile + CUDA graphs" python3 \
        benchmarks/bench_frame_path.py --device cuda --configs paper_student --precisions fp32 --tf32-convolutions \
        --frames 300 --compile --json "$out/frame_path_gpu.json" --append
    step 60 "TF32-convolutions agreement with IEEE FP32, shipped lite, val split" python3 benchmarks/fp16_agreement.py \
        --checkpoint discene_ros/data/lite_distilled.pt --data .devdata/synth_lite_val --device cuda \
        --compare tf32_convolutions --json "$out/conv_tf32_agreement.json"
}
conv_tf32_trained() {  # trained paper_student: TF32 convolutions only against IEEE
    train_student
    step 60 "TF32-convolutions agreement with IEEE FP32, trained paper_student, val split" python3 \
        benchmarks/fp16_agreement.py --checkpoint "$ckpt" --data /tmp/synth --device cuda --max-frames 64 \
        --compare tf32_convolutions --score-threshold 0.3 --json "$out/conv_tf32_agreement_trained.json"
}
decode_stage_pairs() {  # lite with a decode stage for every input and without, one after the other
    local flags
    for flags in "--decode-stage on" "--decode-stage off"; do
        # shellcheck disable=SC2086  # $flags: an option and its value
        step 80 "frame path, lite, CUDA graphs ${flags:-(decode stage)}" python3 benchmarks/bench_frame_path.py \
            --device cuda --configs lite --frames 300 $flags --json "$out/frame_path_gpu.json" --append
        # shellcheck disable=SC2086
        step 80 "frame path, lite fp32, compile + CUDA graphs ${flags:-(decode stage)}" python3 \
            benchmarks/bench_frame_path.py --device cuda --configs lite --precisions fp32 --compile --frames 300 \
            $flags --json "$out/frame_path_gpu.json" --append
    done
}
camera_rate() {  # the node's situation: a 30 Hz camera, newest frame wins; latency from arrival
    step 60 "frame path, lite fp32, CUDA graphs, a 30 Hz camera" python3 benchmarks/bench_frame_path.py \
        --device cuda --configs lite --precisions fp32 --frames 300 --camera-hz 30 \
        --json "$out/frame_path_gpu.json" --append
}
camera_rate_prepare() {  # session 31: a 30 Hz camera into the node's loop, with the prepare thread and without
    local pt
    for pt in on auto; do
        step 40 "frame path, lite fp32, CUDA graphs, a 30 Hz camera, prepare thread $pt" python3 \
            benchmarks/bench_frame_path.py --device cuda --configs lite --precisions fp32 --inputs bgr8 --frames 150 \
            --camera-hz 30 --prepare-thread "$pt" --json "$out/camera_rate.json" --append
    done
}
serial_rows() {  # pipelining off (the fused path launches no frame ahead: one at a time) against the rows above
    step 50 "frame path, lite fp32, CUDA graphs, pipelining off" python3 benchmarks/bench_frame_path.py \
        --device cuda --configs lite --precisions fp32 --frames 300 --pipelining off \
        --json "$out/frame_path_gpu.json" --append
}

jpeg_decode() {  # libjpeg's decode per DCT scale on the device's host, JSON into rounds.tgz (before_after)
    mkdir -p /tmp/rounds
    step 40 "JPEG decode per DCT scale, one thread" python3 benchmarks/bench_jpeg_decode.py --calls 100 \
        --json /tmp/rounds/jpeg_decode.json
}
have_before() {  # true when the .before tree (git archive of the commit to compare with) was carried
    [ -d .before ] && return 0
    echo "no .before tree: git archive the previous commit into .before and carry it" | tee -a "$log"
    return 1
}
build_native() {  # TREE...: build each tree's native post-processing kernel
    local tree
    for tree in "$@"; do
        (cd "$tree" && python3 setup.py -q build_ext --inplace >> "$log" 2>&1) || echo "$tree: native kernel not built" | tee -a "$log"
    done
}
with_this_bench() {  # TREE...: give each tree this tree's bench (it times what these stages compare) and its kernel
    local tree
    for tree in "$@"; do
        cp benchmarks/bench_frame_path.py "$tree/benchmarks/bench_frame_path.py"
    done
    build_native "$@"
}
before_after() {  # .before (the previous commit) and this tree, interleaved; rows of both in the log,
    # this tree's last round in frame_path_gpu.json, every round's JSON in rounds.tgz
    have_before || return
    (cd .before && python3 setup.py -q build_ext --inplace >> "$log" 2>&1) || echo "before: native kernel not built" | tee -a "$log"
    mkdir -p /tmp/rounds
    local round flags
    local same="--marker-period 10"  # session 8's default marker rate, so that both trees build the same markers
    for round in 1 2; do
        step 45 "BEFORE, lite, CUDA graphs (round $round)" bash -c "cd .before && PYTHONPATH=\$PWD:/tmp/site python3 \
            benchmarks/bench_frame_path.py --device cuda --configs lite --frames 300 $same --json /tmp/rounds/before_$round.json"
        for flags in "--decode-stage on" "--decode-stage auto"; do
            # shellcheck disable=SC2086  # $flags, $same: an option and its value each
            step 45 "AFTER, lite, CUDA graphs $flags (round $round)" python3 benchmarks/bench_frame_path.py \
                --device cuda --configs lite --frames 300 $flags $same --json "/tmp/rounds/after_${flags##* }_$round.json"
        done
    done
    step 50 "BEFORE, paper_student, CUDA graphs" bash -c "cd .before && PYTHONPATH=\$PWD:/tmp/site python3 \
        benchmarks/bench_frame_path.py --device cuda --configs paper_student --frames 300 $same --json /tmp/rounds/before_paper.json"
    # shellcheck disable=SC2086  # $same: one option and its value
    step 50 "AFTER, paper_student, CUDA graphs" python3 benchmarks/bench_frame_path.py --device cuda \
        --configs paper_student --frames 300 $same --json /tmp/rounds/after_paper.json
    step 30 "BEFORE, each host step alone (lite fp32, CUDA graph)" bash -c "cd .before && PYTHONPATH=\$PWD:/tmp/site \
        python3 ../docs/results/device_runs/issue10_call10_probe.py cuda"
    step 30 "AFTER, each host step alone (lite fp32, CUDA graph)" python3 docs/results/device_runs/issue10_call10_probe.py cuda
    python3 - "$out/frame_path_gpu.json" /tmp/rounds/after_auto_2.json /tmp/rounds/after_paper.json <<'PY'
import json, sys
rows = [r for path in sys.argv[2:] for r in json.load(open(path))["rows"]]
json.dump({"device": json.load(open(sys.argv[2]))["device"], "rows": rows}, open(sys.argv[1], "w"), indent=1)
PY
    tar czf "$out/rounds.tgz" -C /tmp rounds
}

launch_path() {  # .before, .mid (optional) and this tree interleaved, all through this tree's bench (it
    # times the launch); every run's JSON in rounds.tgz
    have_before || return
    local tree trees=(.before) round
    [ -d .mid ] && trees+=(.mid)
    with_this_bench "${trees[@]}"
    trees+=(.)
    mkdir -p /tmp/rounds
    for round in 1 2 3; do
        for tree in "${trees[@]}"; do
            step 50 "tree $tree, lite, CUDA graphs (round $round)" bash -c "cd $tree && PYTHONPATH=\$PWD:/tmp/site \
                python3 benchmarks/bench_frame_path.py --device cuda --configs lite --frames 300 \
                --json /tmp/rounds/lite_${tree#.}_$round.json"
        done
    done
    for tree in "${trees[@]}"; do
        step 30 "tree $tree, each host step alone (lite fp32, CUDA graph)" bash -c "cd $tree && \
            PYTHONPATH=\$PWD:/tmp/site python3 $PWD/docs/results/device_runs/issue10_call10_probe.py cuda"
    done
    for tree in .before .; do
        step 50 "tree $tree, paper_student, CUDA graphs" bash -c "cd $tree && PYTHONPATH=\$PWD:/tmp/site python3 \
            benchmarks/bench_frame_path.py --device cuda --configs paper_student --frames 300 \
            --json /tmp/rounds/paper_${tree#.}.json"
    done
    step 30 "this tree, lite fp32, CUDA graphs, a 30 Hz camera" python3 benchmarks/bench_frame_path.py --device cuda \
        --configs lite --precisions fp32 --frames 300 --camera-hz 30 --json /tmp/rounds/lite_camera30.json
    step 90 "this tree, paper_student FP16, torch.compile + CUDA graphs" python3 benchmarks/bench_frame_path.py \
        --device cuda --configs paper_student --precisions fp16 --compile --frames 300 \
        --json /tmp/rounds/paper_compiled_fp16.json
    step 80 "this tree, paper_student FP32 (TF32 convolutions), torch.compile + CUDA graphs" python3 \
        benchmarks/bench_frame_path.py --device cuda --configs paper_student --precisions fp32 --tf32-convolutions \
        --compile --frames 300 --json /tmp/rounds/paper_compiled_fp32_tf32conv.json
    tar czf "$out/rounds.tgz" -C /tmp rounds
}

launch_fix() {  # after call 11's failure was fixed: .before and this tree interleaved, two rounds of lite CUDA
    # graphs; paper_student CUDA graphs and the 30 Hz camera row
    have_before || return
    with_this_bench .before
    mkdir -p /tmp/rounds
    local round
    for round in 1 2; do
        step 50 "BEFORE, lite, CUDA graphs (round $round)" bash -c "cd .before && PYTHONPATH=\$PWD:/tmp/site python3 \
            benchmarks/bench_frame_path.py --device cuda --configs lite --frames 300 --json /tmp/rounds/before_$round.json"
        step 50 "AFTER, lite, CUDA graphs (round $round)" python3 benchmarks/bench_frame_path.py --device cuda \
            --configs lite --frames 300 --json "/tmp/rounds/after_$round.json"
    done
    step 50 "AFTER, paper_student, CUDA graphs" python3 benchmarks/bench_frame_path.py --device cuda \
        --configs paper_student --frames 300 --json /tmp/rounds/after_paper.json
    step 30 "AFTER, lite fp32, CUDA graphs, a 30 Hz camera" python3 benchmarks/bench_frame_path.py --device cuda \
        --configs lite --precisions fp32 --frames 300 --camera-hz 30 --json /tmp/rounds/after_camera30.json
    tar czf "$out/rounds.tgz" -C /tmp rounds
}

unfused_wait() {  # the unfused CUDA path, .before and this tree interleaved, two rounds per config
    # .before runs its own bench: this tree's imports what 1514074 lacks (call 14); both record fps, infer_ms
    # and process_cpu_ms_per_frame alike
    have_before || return
    build_native .before
    mkdir -p /tmp/rounds
    local round config
    for round in 1 2; do
        for config in lite paper_student; do
            step 60 "BEFORE, $config, unfused (round $round)" bash -c "cd .before && PYTHONPATH=\$PWD:/tmp/site python3 \
                benchmarks/bench_frame_path.py --device cuda --configs $config --inputs bgr8 --no-cuda-graph \
                --frames 300 --json /tmp/rounds/unfused_before_${config}_$round.json"
            step 60 "AFTER, $config, unfused (round $round)" python3 benchmarks/bench_frame_path.py --device cuda \
                --configs $config --inputs bgr8 --no-cuda-graph --frames 300 \
                --json "/tmp/rounds/unfused_after_${config}_$round.json"
        done
    done
    tar czf "$out/rounds.tgz" -C /tmp rounds
    step 30 "TensorRT backend's CUDA memory providers, their blocking wait included" python3 \
        benchmarks/check_cuda_providers.py --out "$out/cuda_providers.json"
}
frame_graph_pairs() {  # session 30: the frame graph (one graph per slot) against the two graphs, interleaved
    local round fg
    for round in 1 2; do
        for fg in on off; do
            step 100 "frame graph $fg, CUDA graphs, lite + paper_student (round $round)" python3 \
                benchmarks/bench_frame_path.py --device cuda --configs lite paper_student --frames 300 \
                --frame-graph $fg --json "$out/frame_path_gpu.json" --append
        done
    done
    step 150 "frame graph, torch.compile + CUDA graphs (paper_student fp16, lite fp32)" python3 \
        benchmarks/bench_frame_path.py --device cuda --configs paper_student --precisions fp16 --frames 300 --compile \
        --json "$out/frame_path_gpu_compiled.json"
}
frame_graph_memory() {  # the frame graphs in the network graph's pool: memory and host time, on and off, bgr8
    local fg
    for fg in on off; do
        step 80 "frame graph $fg (network graph's pool), CUDA graphs, lite + paper_student bgr8" python3 \
            benchmarks/bench_frame_path.py --device cuda --configs lite paper_student --inputs bgr8 --frames 300 \
            --frame-graph $fg --json "$out/frame_path_gpu_pool.json" --append
    done
}
replay_frame_graph() {  # the replay CLI on CUDA with the frame graph (default) and without, FP32 and FP16
    local flags
    mkdir -p /tmp/replays
    for flags in "" "--no-frame-graph" "--fp16" "--fp16 --no-frame-graph"; do
        # shellcheck disable=SC2086  # $flags: zero to two options
        step 60 "discene-replay on CUDA ${flags:-(defaults)}" python3 -m discene_ros.replay --device cuda $flags \
            --out "/tmp/replay${flags// /}" --json "/tmp/replays/replay_cuda${flags// /}.json" --renders 0 --no-progress
    done
    tar czf "$out/replay_cuda.tgz" -C /tmp replays  # one file: at most 8 come back
}
prepare_thread_pairs() {  # [ROUND...] session 31: no prepare thread on the launch-ahead loop, interleaved
    local round variant pt ds rounds=${*:-1 2}
    for round in $rounds; do
        for variant in on:auto off:auto off:off; do  # before; the node (decode thread); the replay (one thread)
            pt=${variant%:*} ds=${variant#*:}
            step 80 "prepare thread $pt, decode stage $ds, CUDA graphs, lite + paper_student bgr8 (round $round)" \
                python3 benchmarks/bench_frame_path.py --device cuda --configs lite paper_student --inputs bgr8 \
                --frames 300 --prepare-thread "$pt" --decode-stage "$ds" \
                --json "$out/prepare_thread_r$round.json" --append
        done
    done
}
prepare_thread_jpeg() {
    local pt
    for pt in on off; do
        step 60 "prepare thread $pt, CUDA graphs, lite JPEG (decode thread)" python3 benchmarks/bench_frame_path.py \
            --device cuda --configs lite --inputs jpeg --frames 300 --prepare-thread "$pt" \
            --json "$out/prepare_thread_r2.json" --append  # one file fewer: at most 8 come back
    done
}
host_steps_alone() {  # each host step of the frame alone, hot (the probe of call 10, this tree)
    step 90 "each host step alone, lite, CUDA graph" python3 docs/results/device_runs/issue10_call10_probe.py cuda
}
host_steps_sequence() {  # session 32: the steps in sequence after the device wait, beside the one-thread loop
    local round precision fp16
    for round in 1 2; do
        for precision in fp32 fp16; do
            fp16=$([ "$precision" = fp16 ] && echo --fp16)
            step 60 "host steps in sequence and back to back, lite $precision bgr8 (round $round)" python3 \
                benchmarks/bench_host_steps.py --fused --device cuda $fp16 --calls 300 \
                --json "$out/host_steps_${precision}_r$round.json"
        done
        step 60 "one-thread loop, lite bgr8 fp32 + fp16 (round $round)" python3 benchmarks/bench_frame_path.py \
            --device cuda --configs lite --inputs bgr8 --frames 300 --prepare-thread off --decode-stage off \
            --json "$out/host_steps_loop.json" --append
    done
}
device_cloud_pairs() {  # session 34: the device's cloud rows against the grids, interleaved
    local round dc
    for round in 1 2; do
        for dc in off on; do
            step 60 "device cloud $dc, lite bgr8 fp32 + fp16, the node's loop (round $round)" python3 \
                benchmarks/bench_frame_path.py --device cuda --configs lite --inputs bgr8 --frames 300 \
                --device-cloud $dc --json "$out/device_cloud_lite.json" --append
        done
    done
    for dc in off on; do
        step 60 "host steps in sequence and back to back, lite fp16 bgr8, device cloud $dc" python3 \
            benchmarks/bench_host_steps.py --fused --device cuda --fp16 --calls 300 \
            $([ "$dc" = on ] && echo --device-cloud) --json "$out/host_steps_fp16_cloud_$dc.json"
    done
    for dc in off on; do
        step 80 "device cloud $dc, paper_student bgr8 fp32 + fp16, the node's loop" python3 \
            benchmarks/bench_frame_path.py --device cuda --configs paper_student --inputs bgr8 --frames 300 \
            --device-cloud $dc --json "$out/device_cloud_paper_student.json" --append
    done
}
decode_thread_pairs() {  # session 35: the decode thread decoding raw images against only taking them
    local round dt dc
    for round in 1 2; do
        for dc in off on; do
            for dt in on auto; do
                step 60 "decode on the decode thread: $dt, device cloud $dc, lite bgr8 fp32 + fp16, the node's loop (round $round)" \
                    python3 benchmarks/bench_frame_path.py --device cuda --configs lite --inputs bgr8 --frames 300 \
                    --device-cloud $dc --decode-on-thread $dt --json "$out/decode_thread_r$round.json" --append
            done
        done
    done
}
whole_frame_graph() {  # one graph per slot, not built: can the whole frame be captured, and its host time
    step 90 "whole-frame graph probe: capture, same grids, replay's host time against launch" python3 \
        docs/results/device_runs/issue10_whole_frame_graph_probe.py --out "$out/whole_frame_graph.json"
}

case $stage in
bench) tests; graphs; agreement_lite; compiled paper_student lite ;;
train) train_paper ;;
all) tests; graphs; compiled lite; train_paper ;;
final) tests; graphs; compiled lite; compiled paper_student --precisions fp16 ;;
recheck) tests; graphs ;;
fp32) tests 40; fp32_paper ;;
fp32-recheck) tests 40; fp32_paper; graphs; compiled lite ;;
replay) tests 40; replay_cuda; compiled_paper ;;
profile) profile_loop ;;
profile-conv) profile_loop; conv_tf32_trained ;;
remeasure) tests 40; graphs; compiled lite; compiled paper_student --precisions fp16; profile_loop; conv_tf32 ;;
decode-stage) tests 40; decode_stage_pairs; camera_rate; serial_rows; compiled paper_student --precisions fp16
    conv_tf32 ;;
trims) tests 40; jpeg_decode; before_after; compiled paper_student --precisions fp16
    step 75 "frame path, torch.compile + CUDA graphs (paper_student FP32, TF32 convolutions)" python3 \
        benchmarks/bench_frame_path.py --device cuda --configs paper_student --precisions fp32 --tf32-convolutions \
        --frames 300 --compile --json "$out/frame_path_gpu.json" --append ;;
launch-path) tests 40; launch_path ;;
launch-fix) tests 60; launch_fix ;;
unfused-wait) tests 60; whole_frame_graph; profile_loop; unfused_wait ;;
frame-graph) tests 60; frame_graph_pairs; profile_loop ;;
frame-graph-memory) tests 60; frame_graph_memory ;;
replay-frame-graph) replay_frame_graph ;;
next) tests 60; replay_frame_graph; frame_graph_memory; unfused_wait ;;
prepare-thread) tests 60; prepare_thread_pairs 1 2; prepare_thread_jpeg; replay_frame_graph; profile_loop ;;
camera-rate-prepare) camera_rate_prepare ;;
unfused-wait-probe) step 130 "unfused path: sleeping against spinning wait, this tree, interleaved" python3 \
    docs/results/device_runs/issue10_unfused_wait_probe.py 2 --json "$out/unfused_wait_probe.json" ;;
host-steps-sequence) tests 60; host_steps_sequence; compiled paper_student --precisions fp16 --inputs bgr8 ;;
device-cloud) tests 60; device_cloud_pairs ;;
decode-thread) decode_thread_pairs ;;
session36) tests 60; launch_fix; device_cloud_pairs ;;
cloud-and-decode) tests 60; device_cloud_pairs; decode_thread_pairs ;;
after-prepare-thread) host_steps_alone; prepare_thread_pairs 3; frame_graph_memory; unfused_wait ;;
*)
    echo "unknown stage $stage ($stages)" >&2
    exit 2
    ;;
esac
