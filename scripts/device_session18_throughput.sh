#!/usr/bin/env bash
# Session 18's second device call (issue 12): training throughput before and after c0d7aab (batched
# Hungarian matching on threads, GPU cdist chunks by free memory), side by side on one machine, then a
# torch.profiler table per row. .tp_before: `git archive 3938550` (the code before), carried; a later
# session compares against another commit by archiving that one instead.
# CPU dry run: DEVICE=cpu SIZE="--batch 2 --frames 8 --steps 2 --warmup 1" OUT=/tmp/dry bash scripts/device_session18_throughput.sh
set -uo pipefail
out=${OUT:?}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
common="--device ${DEVICE:-cuda} --amp bf16 --workers 12 --synth-workers 16 --threads 4"
size=${SIZE:---batch 32 --frames 256 --steps 20 --warmup 5}
# shellcheck disable=SC2086  # $common, $size: options
(cd .tp_before && timeout --signal=INT 100 python3 benchmarks/bench_train_throughput.py $common $size \
    --json "$out/train_throughput_before.json")
# shellcheck disable=SC2086
timeout --signal=INT 100 python3 benchmarks/bench_train_throughput.py $common $size --json "$out/train_throughput_after.json"
# shellcheck disable=SC2086
timeout --signal=INT 90 python3 benchmarks/bench_train_throughput.py $common $size --steps 10 --profile "$out/profile" \
    --json "$out/train_throughput_profiled.json"
