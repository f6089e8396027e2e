"""Each CPU-side step of the frame path timed alone, right after an inference and back to back.

    python benchmarks/bench_host_steps.py [--calls N] [--json F]

In the node's frame loop on the CPU every host step (decode, preprocessing, post-processing, output
check, PointCloud2) runs right after the network's forward pass, which has filled the caches with its
weights and activations: there a step takes several times what it takes when it runs back to back
(``hot``), and small numpy or torch calls suffer most. This runs each step of ``processing.FrameProcessor``
(lite with the shipped weights, a 640x480 bgr8 Image, torch threads as given) ``--calls`` times after an
inference (``cold``: the steps' cost in the loop) and ``--calls`` times back to back, alternating the two
conditions per call so that both see the same machine, and prints the medians in ms. The post-processing
step runs on a copy of the network's outputs for that frame. Written for the CPU target of issue 10
(docs/results/frame_path.md, session 10).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_frame_path as bench  # noqa: E402

from discene_ros.processing import FrameInput, FrameProcessor, build_outputs, checked_cloud  # noqa: E402
from export.host_threads import intra_op_threads  # noqa: E402
from export.pipeline import OccupancyPipeline  # noqa: E402
from models.postprocess import points_to_occupancy  # noqa: E402


def steps(pipe: OccupancyPipeline, factory: bench.TypestoreFactory) -> tuple[dict[str, Callable[[], Any]], Callable[[], Any]]:
    """The host steps of one bgr8 frame as callables, and the inference that precedes them in the loop."""
    proc = FrameProcessor(pipe)
    image, info, pose = bench.camera_messages(factory, "bgr8")
    frame = FrameInput(image, info, cam_pose=pose)
    processed = proc.process(frame)
    decoded = proc.decode_frame(frame)
    inputs = proc.prepare_decoded(decoded, 0).prepared.inputs
    with torch.inference_mode():
        points, scores = (t.clone() for t in pipe.backend.run(inputs))
    origin, config = inputs.voxel_origin, pipe.config

    def post():
        with torch.inference_mode(), intra_op_threads(pipe.host_threads):
            return points_to_occupancy(points, scores, origin, config)

    return {
        "decode": lambda: proc.decode_frame(frame),
        "preprocess": lambda: proc.prepare_decoded(decoded, 1),
        "postprocess": post,
        "output_check": lambda: checked_cloud(processed.occupancy),  # as FrameProcessor.complete: rows + check
        "pointcloud2": lambda: build_outputs(factory, processed, "odom", 0, markers=False),
    }, lambda: pipe.backend.run(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150, help="calls per step and condition")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the inference's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from rosbags.typesys import Stores, get_typestore

    torch.set_num_threads(args.threads)
    factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    backend, used = bench.make_backend("lite", "cpu", False, False, True)
    backend.config.closing = True  # the node's default
    pipe = OccupancyPipeline(backend)
    host_steps, infer = steps(pipe, factory)
    times = {(name, cond): [] for name in host_steps for cond in ("cold", "hot")}
    for _ in range(args.calls):
        for name, step in host_steps.items():
            for cond in ("cold", "hot"):
                if cond == "cold":
                    infer()
                t0 = time.perf_counter()
                step()
                times[(name, cond)].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for name in host_steps:
        cold, hot = (float(np.median(times[(name, c)])) for c in ("cold", "hot"))
        rows.append({"step": name, "cold_ms": cold, "hot_ms": hot})
        print(f"{name:13s} after an inference {cold:7.3f} ms   back to back {hot:7.3f} ms")
    total = {c: sum(r[f"{c}_ms"] for r in rows) for c in ("cold", "hot")}
    print(f"{'sum':13s} after an inference {total['cold']:7.3f} ms   back to back {total['hot']:7.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": f"CPU {platform.processor() or platform.machine()} ({args.threads} torch threads)",
            "weights": used, "calls": args.calls, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
