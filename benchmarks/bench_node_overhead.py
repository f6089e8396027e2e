"""Node pipeline overhead: decode + preprocess + post-process + message build, as a fraction of inference.

Runs the node's per-frame work (``FrameProcessor`` + ``build_outputs``) on a 640x480 frame, once as
a raw rgb8 Image and once as a JPEG CompressedImage, with the ``lite`` config (shipped model if
present, else random weights with the score threshold at 0 so post-processing and messages carry
the worst-case number of points). Messages are built with the rosbags typestore factory, the
closest stand-in for rclpy here.

    python benchmarks/bench_node_overhead.py [--device cpu|cuda] [--iters 20] [--json out.json]

Measured (random lite weights, score threshold 0; medians, ms):
  Current lite (15,360 points, ~3,800 voxels), shared 2-core CPU (noisy: other jobs running):
    bgr8 Image: decode 0.14, preprocess 9.7, infer 176, postprocess 7.8, PointCloud2 0.6 -> 10% of inference;
    jpeg: decode 8.9, preprocess 7.6, infer 136, postprocess 18.7 -> 27%. MarkerArray adds 15-22 ms.
  Previous lite (3,840 points, ~885 voxels) on an NVIDIA H200, torch CUDA FP32: bgr8 decode 0.09,
    preprocess 8.2, infer 14.7, postprocess 3.4, PointCloud2 0.46 -> 83% of inference (jpeg: 111%);
    same machine, 16 CPU threads: infer 23 ms -> 49% (bgr8) / 65% (jpeg).
  Preprocess is dominated by the antialiased PIL resize of 640x480 to 256x192 (about 4-5 ms): on a
  GPU the CPU-side work, not the network, bounds the frame rate of the lite model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pipeline(model: str | None, device: str, threshold: float | None):
    import torch

    from export.backends import create_backend
    from export.pipeline import OccupancyPipeline
    from models.config import lite

    if model and Path(model).is_file():
        backend = create_backend("torch", model, device=device)
        source = model
    else:
        torch.manual_seed(0)
        backend = create_backend("torch", None, config=lite(), device=device)
        source = "random lite weights"
        threshold = 0.0 if threshold is None else threshold
    if threshold is not None:
        backend.config.score_threshold = threshold
    return OccupancyPipeline(backend), source


def _messages(factory, compressed: bool):
    from discene_ros import msg_encode

    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(120, 40, (480, 640, 3)), 0, 255).astype(np.uint8)
    k = np.array([[520.0, 0, 320], [0, 520, 240], [0, 0, 1]])
    image = msg_encode.rgb_to_compressed(factory, rgb, "cam", 0, "jpeg") if compressed else \
        msg_encode.rgb_to_image(factory, rgb, "cam", 0, "bgr8")
    return image, msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", 0)


def measure(pipeline, factory, compressed: bool, iters: int, warmup: int = 3) -> dict:
    from discene_ros.processing import FrameInput, FrameProcessor, ProcessorSettings, build_outputs

    image, info = _messages(factory, compressed)
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    pose[2, 3] = 1.2
    proc = FrameProcessor(pipeline, ProcessorSettings())
    rows, voxels = [], 0
    for i in range(warmup + iters):
        result = proc.process(FrameInput(image=image, camera_info=info, cam_pose=pose))
        t0 = time.perf_counter()
        build_outputs(factory, result, "odom", 0, markers=False)
        t1 = time.perf_counter()
        build_outputs(factory, result, "odom", 0, markers=True)
        t2 = time.perf_counter()
        if i >= warmup:
            t = result.timings_ms
            rows.append([t["decode_ms"], t["preprocess_ms"], t["infer_ms"], t["postprocess_ms"], (t1 - t0) * 1e3,
                         (t2 - t1) * 1e3])
            voxels = len(result.occupancy.voxel_labels)
    med = np.median(np.array(rows), axis=0)
    decode, pre, infer, post, cloud, with_markers = (float(v) for v in med)
    overhead = decode + pre + post + cloud
    return {"input": "jpeg CompressedImage" if compressed else "bgr8 Image", "decode_ms": decode, "preprocess_ms": pre,
            "infer_ms": infer, "postprocess_ms": post, "cloud_msg_ms": cloud, "cloud_and_markers_msg_ms": with_markers,
            "overhead_ms": overhead, "overhead_fraction_of_infer": overhead / infer, "voxels": voxels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "discene_ros/data/lite_distilled.pt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--score-threshold", type=float, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch
    from rosbags.typesys import Stores, get_typestore

    from discene_ros.msg_factory import TypestoreFactory

    torch.set_num_threads(max(1, torch.get_num_threads()))
    factory = TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    pipeline, source = _pipeline(args.model, args.device, args.score_threshold)
    results = [measure(pipeline, factory, compressed, args.iters) for compressed in (False, True)]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"lite on {pipeline.backend.describe()} [{device}], model: {source}, medians of {args.iters} frames, 640x480 input")
    print(f"{'input':<22}{'decode':>8}{'preproc':>9}{'infer':>9}{'postproc':>10}{'cloud msg':>11}{'+markers':>10}"
          f"{'overhead/infer':>16}{'voxels':>8}")
    for r in results:
        print(f"{r['input']:<22}{r['decode_ms']:>8.2f}{r['preprocess_ms']:>9.2f}{r['infer_ms']:>9.2f}"
              f"{r['postprocess_ms']:>10.2f}{r['cloud_msg_ms']:>11.2f}{r['cloud_and_markers_msg_ms']:>10.2f}"
              f"{100 * r['overhead_fraction_of_infer']:>15.1f}%{r['voxels']:>8d}")
    print("overhead = decode + preprocess + postprocess + PointCloud2 build (ms, medians); markers are optional")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "model": source, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
