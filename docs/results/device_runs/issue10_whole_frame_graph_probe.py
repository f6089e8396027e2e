"""Whole-frame graph probe (issue 10; written in session 28, which had no GPU, for the next device call).

The fused CUDA path's ``launch`` makes two graph replays (the slot's preprocessing, then network +
post-processing), two copies of the grids into pinned memory and four event records: 0.17-0.24 ms of host
time alone and 0.45-0.60 ms in the frame loop for lite (session 23), the largest host step left. This probe
asks whether one CUDA graph per buffer slot, holding the upload, the preprocessing, the network, the
post-processing and both copies back to pinned memory, can be captured with torch's API, gives the same
grids, and how much host time its replay (plus the one event the frame loop needs) takes against ``launch``.
Nothing in the product uses such a graph; the answer decides whether it is worth building.

    python3 docs/results/device_runs/issue10_whole_frame_graph_probe.py [--out F.json] [--calls N]

Run from the root of the tree, on CUDA (FP32, lite with the shipped weights and paper_student with random
weights, bgr8 frames). Each variant's failure is recorded in the JSON instead of stopping the probe.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "benchmarks")]
import bench_frame_path as bench  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from discene_ros.processing import FrameInput, FrameProcessor  # noqa: E402
from export.pipeline import OccupancyPipeline  # noqa: E402


def host_ms(call, calls: int) -> dict[str, float]:
    """Host time of ``call(i)`` with the device idle before each call (median, p10, p90 in ms)."""
    times = []
    for i in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    p10, p50, p90 = np.percentile(times, [10, 50, 90]) * 1e3
    return {"median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90)}


def whole_frame_graph(pipe: OccupancyPipeline, staged, labels_out: torch.Tensor, best_out: torch.Tensor):
    """One graph of slot ``staged.slot``'s device work: its upload and preprocessing into the fused graph's
    static inputs (the preprocessor's eager device work, as its own graph holds it), the network and the
    post-processing (the fused function ``StaticRunner`` captures), and the grids' copies into pinned memory."""
    backend, pre = pipe.backend, pipe.preprocessor
    post = pipe._post_fn()
    runner = backend._fused_runner(post)
    targets = pipe._fused_targets(post)
    static = backend.fused_inputs(post)
    slot = pre.slots[staged.slot]
    side = torch.cuda.Stream()
    with torch.inference_mode():
        for tensor in static.values():  # the last launch's inputs: gone, so the graph's preprocessing must fill them
            tensor.zero_()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), runner.context():  # warm-up outside capture
            pre._device_work(slot, staged.depth_hw, targets)
            runner.fn(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), runner.context():
            pre._device_work(slot, staged.depth_hw, targets)
            labels, best = runner.fn(**static)
            labels_out.copy_(labels, non_blocking=True)
            best_out.copy_(best, non_blocking=True)
    torch.cuda.synchronize()
    return graph


def probe(config: str, factory, calls: int) -> dict:
    backend, weights = bench.make_backend(config, "cuda", False, False, True)
    pipe = OccupancyPipeline(backend, fuse=True)
    proc = FrameProcessor(pipe)
    image, info, pose = bench.camera_messages(factory, "bgr8")
    decoded = proc.decode_frame(FrameInput(image, info, cam_pose=pose))
    for i in range(10):  # warm-up: every slot's preprocessing graph and the fused network graph captured
        proc.complete(proc.launch(proc.prepare_decoded(decoded, i % pipe.slots)))
    prepared = [proc.prepare_decoded(decoded, i).prepared for i in range(pipe.slots)]
    reference = pipe.collect(pipe.launch(prepared[0]))
    row: dict = {"config": config, "weights": weights, "voxels": int(len(reference.voxel_labels)),
                 "launch": host_ms(lambda i: pipe.launch(prepared[i % len(prepared)]), calls),
                 "launch_and_collect": host_ms(lambda i: pipe.collect(pipe.launch(prepared[i % len(prepared)])), calls)}
    shape = (1, *(int(n) for n in pipe.config.grid_shape))
    labels = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
    best = torch.zeros(shape, dtype=torch.float32, pin_memory=True)
    try:
        t0 = time.perf_counter()
        graph = whole_frame_graph(pipe, prepared[0].inputs, labels, best)
        row["whole_frame_capture_s"] = time.perf_counter() - t0
        done = torch.cuda.Event(blocking=True)
        graph.replay()
        done.record()
        done.synchronize()
        got = labels[0].numpy()
        occupied = np.flatnonzero(reference.labels)
        row["whole_frame_same_grids"] = bool(np.array_equal(got, reference.labels) and np.array_equal(
            best[0].numpy().reshape(-1)[occupied], reference.voxel_scores))
        # CUDA's index_add_ sums with atomics in any order, so a voxel at a tie may flip (tests/test_fused_postprocess)
        row["whole_frame_label_agreement"] = float((got == reference.labels).mean())

        def replay(i: int) -> None:
            graph.replay()
            done.record()

        row["whole_frame_replay_and_record"] = host_ms(replay, calls)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        row["whole_frame_gpu_ms_per_frame"] = start.elapsed_time(end) / 50
    except Exception as exc:  # capture refused, or a replay failed: the answer this probe is after
        row["whole_frame_error"] = "".join(traceback.format_exception_only(exc)).strip()
        row["whole_frame_traceback"] = traceback.format_exc()[-3000:]
    pipe.close()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per variant")
    parser.add_argument("--configs", nargs="+", default=["lite", "paper_student"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this probe needs CUDA (it captures CUDA graphs); nothing measured", file=sys.stderr)
        return 2
    factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    rows = []
    for config in args.configs:
        row = probe(config, factory, args.calls)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
