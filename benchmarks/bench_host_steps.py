"""Each CPU-side step of the frame path timed alone, right after an inference and back to back.

    python benchmarks/bench_host_steps.py [--calls N] [--json F]
    python benchmarks/bench_host_steps.py --fused [--device cuda] [--fp16] [--calls N] [--json F]

In the node's frame loop on the CPU every host step (decode, preprocessing, post-processing, output
check, PointCloud2) runs right after the network's forward pass, which has filled the caches with its
weights and activations: there a step takes several times what it takes when it runs back to back
(``hot``), and small numpy or torch calls suffer most. This runs each step of ``processing.FrameProcessor``
(lite with the shipped weights, a 640x480 bgr8 Image, torch threads as given) ``--calls`` times after an
inference (``cold``: the steps' cost in the loop) and ``--calls`` times back to back, alternating the two
conditions per call so that both see the same machine, and prints the medians in ms. ``--gaps`` adds four
conditions: the step after a 0.2 or 2 ms sleep, or a 0.2 or 2 ms busy-wait, since its previous call. The post-processing
step runs on a copy of the network's outputs for that frame. Written for the CPU target of issue 10
(docs/results/frame_path.md, session 10).

``--fused`` times the launch-ahead path's host steps instead (the fused CUDA path; on the CPU it runs for
tests, its ``launch`` then holding the network): ``sequence`` is one frame's steps in the order a one-thread
frame loop runs them, right after waiting for the previous frame's device work (collect, output check,
PointCloud2, then the next frame's decode, prepare and launch), without the loop's threads, hand-offs and
polls; ``hot`` is each step back to back. Against the loop's stage times it splits what the loop costs into
the steps' own cost as the loop meets them and what the loop adds (session 32: on the build machine a small
step runs about twice as long after 2 ms of anything else, a sleep or a spin, as back to back).
``--device-cloud``: with the fused path's ``device_cloud``, ``postprocess`` reads the rows the device compacted
instead of scanning the copied grids (on the CPU that compaction is part of ``launch``).

Both modes also time ``rclpy_data``, a cost of the node's that the frame-path benchmark leaves out: rclpy's
PointCloud2 takes its ``data`` as an ``array.array``, a copy of the rows (0.25 MB for lite's 10k voxels),
where the benchmarks' rosbags message takes the numpy rows as they are. rclpy's conversion to the C message
on publish and the middleware's send are not timed anywhere here (no ROS 2 on the build machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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

from discene_ros.msg_factory import RclpyFactory  # noqa: E402
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
        "rclpy_data": lambda: rclpy_data(processed.cloud),
    }, lambda: pipe.backend.run(inputs)


RCLPY_FACTORY = RclpyFactory()  # the node's one factory (its message classes are only imported by msg_class)


def rclpy_data(cloud: Any) -> Any:
    """The node's PointCloud2 ``data`` from the frame's rows: rclpy's message takes ``array.array`` and so a copy
    of them (``RclpyFactory.uint8_array``), where the benchmarks' rosbags message takes the numpy rows as they are."""
    return RCLPY_FACTORY.uint8_array(cloud.points)


def spin(seconds: float) -> None:
    """Busy-wait ``seconds`` on the calling thread (the core stays awake, unlike ``time.sleep``)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def fused_steps(pipe: OccupancyPipeline, factory: bench.TypestoreFactory, kind: str = "bgr8",
                ) -> tuple[dict[str, Callable[[], Any]], Callable[[], None], dict[str, Any]]:
    """The launch-ahead path's host steps of one frame, in a one-thread loop's order, as callables; a ``wait``
    for the launched frame's device work (what the loop's finish stage waits for); and the state they share
    (``occupancy``: the frame ``postprocess`` collected last)."""
    proc = FrameProcessor(pipe)
    image, info, pose = bench.camera_messages(factory, kind)
    frame = FrameInput(image, info, cam_pose=pose)
    state: dict[str, Any] = {"slot": 0}
    state["launched"] = proc.launch(proc.prepare(frame, 0))
    state["done"] = proc.complete(state["launched"])
    state["decoded"] = proc.decode_frame(frame)

    def prepare() -> None:
        state["slot"] = (state["slot"] + 1) % pipe.slots
        state["prepared"] = proc.prepare_decoded(state["decoded"], state["slot"])

    def launch() -> None:
        state["launched"] = proc.launch(state["prepared"])

    def collect() -> None:  # FrameProcessor.complete without the check: the copied grids (or rows) into the frame
        state["occupancy"] = pipe.collect(state["launched"].launched)

    def output_check() -> None:
        state["cloud"] = checked_cloud(state["occupancy"])

    def pointcloud2() -> None:
        build_outputs(factory, dataclasses.replace(state["done"], occupancy=state["occupancy"], cloud=state["cloud"]),
                      "odom", 0, markers=False)

    def rows_for_rclpy() -> None:
        rclpy_data(state["cloud"])

    def decode() -> None:
        state["decoded"] = proc.decode_frame(frame)

    def wait() -> None:
        state["launched"].launched.copied.synchronize()

    prepare()
    launch()
    return {"postprocess": collect, "output_check": output_check, "pointcloud2": pointcloud2,
            "rclpy_data": rows_for_rclpy, "decode": decode, "preprocess": prepare, "launch": launch}, wait, state


def time_fused(host_steps: dict[str, Callable[[], Any]], wait: Callable[[], None], calls: int,
               sync: Callable[[], None]) -> dict[tuple[str, str], list[float]]:
    """ms per step and condition: ``sequence`` (one frame's steps in order after the device wait), ``hot``
    (back to back; ``launch`` has the device idle and a frame prepared before each call, untimed)."""
    times: dict[tuple[str, str], list[float]] = {(name, c): [] for name in host_steps for c in ("sequence", "hot")}
    for _ in range(calls):
        wait()
        for name, step in host_steps.items():  # collect ... launch: the frame after next is on the device now
            t0 = time.perf_counter()
            step()
            times[(name, "sequence")].append((time.perf_counter() - t0) * 1e3)
        for name, step in host_steps.items():
            for _ in range(3):  # the first call warms it; the other two are timed back to back
                if name == "launch":  # a frame prepared for each launch (the CPU's staging is a view of it)
                    sync()
                    host_steps["preprocess"]()
                t0 = time.perf_counter()
                step()
                elapsed = (time.perf_counter() - t0) * 1e3
            times[(name, "hot")].append(elapsed)
            if name == "launch":
                wait()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150, help="calls per step and condition")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the inference's)")
    parser.add_argument("--fused", action="store_true", help="the launch-ahead (fused CUDA) path's steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="with --fused")
    parser.add_argument("--fp16", action="store_true", help="with --fused on CUDA")
    parser.add_argument("--input", default="bgr8", choices=["bgr8", "jpeg"], help="with --fused")
    parser.add_argument("--device-cloud", action="store_true",
                        help="with --fused: the device compacts the occupied voxels into the cloud's rows, and "
                             "``postprocess`` reads those instead of scanning the grids")
    parser.add_argument("--gaps", action="store_true",
                        help="also after a 0.2 and a 2 ms sleep, and a 0.2 and a 2 ms spin (CPU path)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from rosbags.typesys import Stores, get_typestore

    torch.set_num_threads(args.threads)
    factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    if args.device == "cuda" and not args.fused:
        parser.error("--device cuda needs --fused (the CPU path's steps run on the CPU)")
    if args.fp16 and args.device != "cuda":
        parser.error("--fp16 needs --device cuda")
    if args.gaps and args.fused:
        parser.error("--gaps times the CPU path's steps; --fused has its own two conditions")
    if args.device_cloud and not args.fused:
        parser.error("--device-cloud needs --fused (the fused path's option)")
    backend, used = bench.make_backend("lite", args.device, args.fp16, False, True)
    backend.config.closing = True  # the node's default
    pipe = OccupancyPipeline(backend, fuse=True if args.fused else None, device_cloud=args.device_cloud)
    if args.fused:
        return fused_main(args, pipe, factory, used)
    host_steps, infer = steps(pipe, factory)
    conditions: dict[str, Callable[[], Any]] = {"cold": infer, "hot": lambda: None}
    if args.gaps:
        for gap_ms in (0.2, 2.0):
            conditions[f"sleep_{gap_ms:g}ms"] = functools.partial(time.sleep, gap_ms / 1e3)
            conditions[f"spin_{gap_ms:g}ms"] = functools.partial(spin, gap_ms / 1e3)
    times = {(name, cond): [] for name in host_steps for cond in conditions}
    for _ in range(args.calls):
        for name, step in host_steps.items():
            for cond, before in conditions.items():  # each condition follows the step's previous call
                before()
                t0 = time.perf_counter()
                step()
                times[(name, cond)].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for name in host_steps:
        rows.append({"step": name, **{f"{c}_ms": float(np.median(times[(name, c)])) for c in conditions}})
        print(f"{name:13s} " + "   ".join(f"{c} {rows[-1][f'{c}_ms']:7.3f}" for c in conditions) + " ms")
    print(f"{'sum':13s} " + "   ".join(f"{c} {sum(r[f'{c}_ms'] for r in rows):7.3f}" for c in conditions) + " ms")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": f"CPU {platform.processor() or platform.machine()} ({args.threads} torch threads)",
            "weights": used, "calls": args.calls, "rows": rows}, indent=2) + "\n")
    return 0


def fused_main(args: argparse.Namespace, pipe: OccupancyPipeline, factory: bench.TypestoreFactory, used: str) -> int:
    """``--fused``: the launch-ahead path's steps in sequence after the device wait, and back to back."""
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(pipe.describe(), flush=True)
    host_steps, wait, _ = fused_steps(pipe, factory, args.input)
    for _ in range(5):  # warm-up: each slot's graphs captured
        for step in host_steps.values():
            step()
        wait()
    times = time_fused(host_steps, wait, args.calls, sync)
    rows = []
    for name in host_steps:
        seq, hot = (float(np.median(times[(name, c)])) for c in ("sequence", "hot"))
        rows.append({"step": name, "sequence_ms": seq, "hot_ms": hot})
        print(f"{name:13s} in sequence after the device wait {seq:7.3f} ms   back to back {hot:7.3f} ms")
    total = {c: sum(r[f"{c}_ms"] for r in rows) for c in ("sequence", "hot")}
    print(f"{'sum':13s} in sequence after the device wait {total['sequence']:7.3f} ms   back to back {total['hot']:7.3f} ms")
    if args.json:
        name = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}"
        Path(args.json).write_text(json.dumps({
            "device": name, "path": pipe.describe(), "weights": used, "precision": "fp16" if args.fp16 else "fp32",
            "input": args.input, "device_cloud": pipe.device_cloud is not None, "calls": args.calls,
            "rows": rows}, indent=2) + "\n")
    pipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
