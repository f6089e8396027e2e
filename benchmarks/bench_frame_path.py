"""The whole frame path: ROS Image message in -> PointCloud2 message out, per stage and end to end.

    python benchmarks/bench_frame_path.py --device {cpu,cuda} --configs lite paper_student --frames N --json F

For each config, precision (CPU: fp32; CUDA: fp32 and fp16) and input (a 640x480 ``bgr8`` Image and
a JPEG CompressedImage, built with the rosbags typestore factory, the stand-in for rclpy here), frames
go through the node's code, ``processing.FrameProcessor``: decode (``decode_frame``: the image, K from
CameraInfo, the pose check), preprocess (``prepare_decoded``: the device frame path of the torch
backend), infer + post-process + the output checks (``complete``), then ``build_outputs`` (PointCloud2
and grid pose), the MarkerArray every ``--marker-period`` frames. The frame loop is the node's. With
``--pipelining`` auto (the node's default) it is pipelined where the network runs on a GPU:
``FrameRunner`` prepares frame i+1 while frame i is inferred, and with a decode stage decodes frame
i+2 meanwhile (``--decode-stage`` auto, the node's rule, ``processing.uses_decode_thread``: for JPEG
rows in a pipelined loop, and since session 31 for every row without a prepare thread, as the node locates
frames there; otherwise the image is decoded at the start of the prepare stage; on / off: every row; until
session 9 every row had one unless ``--no-decode-stage``, now ``--decode-stage off``; until session 12 the
JPEG rows had one on the CPU too). Since session 31 a launch-ahead loop (below) has no prepare thread by
default (``--prepare-thread`` auto, the node's rule, ``processing.uses_prepare_thread``; rows record
``prepare_thread``): the finish stage prepares each frame right before launching it. On the CPU the network runs alone (rows
say ``serial``; before session 8 the CPU rows were pipelined), and since session 27 the next frame is
decoded and prepared while this one is post-processed (rows say ``host_overlap``; ``--host-overlap off``
takes one frame at a time, as before). The runner is lossless (a camera faster than
the network, and no frame dropped; rows count ``dropped`` anyway); ``fps`` is the sustained end-to-end
throughput of the processed frames over ``--frames`` frames after ``--warmup``. Stage times are medians
of per-frame wall times (ms); ``overhead_ms`` = decode + preprocess + launch + post-process + output check +
PointCloud2, the CPU-side work per frame (``launch``: the host time of queueing a fused row's device
work, which since session 23 includes the upload and preprocessing graph; rows without ``launch`` in
``stages_ms``, before session 23, left it out of the overhead; ``process_cpu_ms_per_frame``, since then:
the whole process's user + system CPU time per frame over the timed frames, every thread included, the
CPU a robot gives this loop; rows without ``output_check`` did not run
the node's output checks, which took 0.4 ms per 12k voxels until session 8; since session 11 the check
builds the cloud's rows, which PointCloud2 then only wraps); the latency runs from the
first stage taking a frame to its PointCloud2. ``--camera-hz R`` measures the node's situation instead:
a camera publishing R frames per second into the loop as the node runs it (the newest frame wins,
``dropped`` counts the rest), the latency from a frame's arrival to its PointCloud2
(``end_to_end_latency`` median, ``end_to_end_latency_p90``). As the node, each row freezes the
objects alive before its loop, and again after its first frame, out of the garbage collector
(``processing.freeze_startup_objects``).

On CUDA with CUDA graphs (the default), post-processing is captured in the network's graph and the
runner launches ahead (``OccupancyPipeline.fused``): ``infer_ms`` is then GPU time from CUDA events and
``postprocess`` the host time from the copied (X,Y,Z) grids to the frame; elsewhere ``infer`` and
``postprocess`` are wall times of each step. Since session 30 such rows replay one graph per buffer slot
(``frame_graph``: upload, preprocessing, network, post-processing and the copies back; ``infer_ms`` is that
graph's GPU time); ``--frame-graph off`` replays the preprocessing's and the network's graphs apart, as
before (``infer_ms``: the network's graph, network + post-processing).

lite uses the shipped checkpoint (discene_ros/data/lite_distilled.pt) when present; other configs
run seeded random weights with score threshold 0, the worst case for post-processing and messages.
``--append`` merges rows into an existing JSON (e.g. a separate, shorter paper_student run on CPU).
``--backend onnxruntime`` (CPU, fp32) exports each config with the same weights to a temporary ONNX (gather
sampling) and runs the same frame path around onnxruntime; its rows' ``backend`` says so.
Each row records ``OMP_WAIT_POLICY`` as ``omp_wait_policy``; measure the CPU without it (the node's
setting): ``PASSIVE`` sends every parallel region's wake-up through the kernel and makes lite's
inference about 2x slower on the 2-core build machine.
``--tf32`` / ``--tf32-convolutions`` / ``--cudnn-benchmark`` pass the torch backend's options of those names
(CUDA only; FP32 is IEEE with cuDNN's heuristic algorithms without them); each row records them as booleans
(``tf32_convolutions`` is true with ``tf32`` too: the convolutions run in TF32 either way), as they ran
(false on the CPU, where they change nothing). Run each variant as a process of its own (cuDNN's
plan cache does not key on cudnn.benchmark; scripts/device_frame_path.sh fp32 does so).
JSON: {"device", "rows": [{"config", "backend", "precision", "input", "fps", "infer_ms", "overhead_ms",
"stages_ms": {...}, "tf32", "tf32_convolutions", "cudnn_benchmark", "jpeg_decoder" (JPEG rows:
"opencv <version>" where cv2 is installed, as on a robot, else "PIL <version>"; rows without it
decoded with PIL), "decode_stage" (rows without it: no decode stage, fed by waiting for an idle
pipeline rather than by the lossless runner), "post_threads" (the CPU post-processing kernel's threads;
``--post-threads``, default the node's rule; rows without it: 1), "resize" (CPU rows: "native" for the
native kernel's resize, the default where it is built, or "torch" for torch's, ``--resize torch``; rows
without it resized with torch), "host_overlap" (serial rows: the next frame decoded and prepared while this
one is post-processed, ``--host-overlap``; rows without it took one frame at a time), "between_networks_ms"
(median time from one frame's network end to the next one's start: the host work the frame rate pays for
where stages overlap; rows without it did not record it), "frame_graph" (fused rows: the frame graph ran;
fused rows without it ran the two graphs), "cuda_peak_allocated_mb" (CUDA: torch's peak allocated memory since
the row's config and precision were loaded, the rows before it of the same pipeline included), "cuda_reserved_mb"
(CUDA: what torch's allocator holds from the driver after the row, captured graphs' pools included),
"decode_on_thread" (rows with a decode stage: it decoded the image; false since session 35 for raw images without
a prepare thread, whose decode stage only takes the frame, as the node's only locates it, and the finish stage
decodes it: ``processing.decodes_on_decode_thread``; rows without it decoded there),
"prepare_thread" (the loop prepared frames on a thread of its own; rows without it did), "device_cloud" (fused rows:
the device compacted the occupied voxels into the cloud's rows, ``--device-cloud on``, and ``postprocess`` is the
host time from the copied rows to the frame; rows without it copied the grids), "emulated_device_ms" (rows run
with ``--emulate-device-ms X``: CPU, fused, on ``emulated_device.EmulatedDevice``; rows without it ran on a
real device), ...}]}.

``--emulate-device-ms X`` (CPU only) runs the fused launch-ahead path, frame graph on, against a stand-in device
that takes X ms per frame and does nothing (``benchmarks/emulated_device.py``): the GPU path's host steps and
frame loop at a GPU's pace on a machine without one (``--pipelining auto`` is the CUDA rule's, pipelined).
Its rows are not GPU figures (no CUDA calls, no DMA, this machine's CPU); they compare host-side changes
side by side. Such a run's ``device`` names the CPU and the emulation.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discene_ros import msg_decode, msg_encode  # noqa: E402
from discene_ros.msg_factory import EveryNth, TypestoreFactory  # noqa: E402
from discene_ros.params import PIPELINING_MODES, defaults  # noqa: E402
from discene_ros.processing import (  # noqa: E402
    FrameInput,
    FrameProcessor,
    build_outputs,
    decodes_on_decode_thread,
    frame_loop_mode,
    freeze_startup_objects,
    post_threads_for,
    uses_decode_thread,
    uses_prepare_thread,
)
from export.backends import create_backend  # noqa: E402
from export.backends.torch_backend import TorchBackend  # noqa: E402
from export.onnx_export import example_camera, export_onnx  # noqa: E402
from export.pipeline import FrameRunner, OccupancyPipeline  # noqa: E402
from models import build_model, native_postprocess  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from models.config import load_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emulated_device import emulated  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"lite": ROOT / "discene_ros/data/lite_distilled.pt"}
STAGES = ("decode", "preprocess", "launch", "infer", "postprocess", "output_check", "pointcloud2")
# CPU-side work per frame; ``launch`` (fused rows only: queueing the frame's device work) since session 23
OVERHEAD_STAGES = ("decode", "preprocess", "launch", "postprocess", "output_check", "pointcloud2")
CPU_TIMED_STAGES = ("decode", "preprocess", "launch", "pointcloud2")  # also in thread CPU time (``stages_cpu_ms``)


def process_cpu_s() -> float:
    """User + system CPU seconds of this process so far, every thread (torch's and the driver's) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


RANDOM_WEIGHTS = "random (seed 0), score threshold 0"


def checkpoint_for(config_name: str, weights: dict[str, Path] | None) -> Path | None:
    """The given or shipped checkpoint of a config; None where there is none (seeded random weights, score
    threshold 0: every point kept, the worst case for post-processing)."""
    ckpt = (weights or {}).get(config_name, SHIPPED.get(config_name))
    return ckpt if ckpt is not None and ckpt.is_file() else None


def make_ort_backend(config_name: str, weights: dict[str, Path] | None, folder: Path):
    """onnxruntime on the CPU, the config's model exported (gather sampling: what ONNX Runtime's CPU provider
    runs fastest, README) into ``folder``; the same weights as ``make_backend``."""
    ckpt = checkpoint_for(config_name, weights)
    path = folder / f"{config_name}.onnx"
    torch.manual_seed(0)  # random weights: make_backend's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: the label says so
        export_onnx(config_name, path, checkpoint=None if ckpt is None else str(ckpt), parity=False,
                    sampling="gather")
    backend = create_backend("onnxruntime", path, providers=["cpu"])  # the config from the export's sidecar
    if ckpt is None:
        backend.config.score_threshold = 0.0
    return backend, RANDOM_WEIGHTS if ckpt is None else ckpt.name


def make_backend(config_name: str, device: str, fp16: bool, compile_: bool, cuda_graph: bool,
                 weights: dict[str, Path] | None = None, tf32: bool = False, cudnn_benchmark: bool = False,
                 tf32_convolutions: bool = False):
    """Torch backend with the given or shipped weights where there are some, else seeded random weights."""
    ckpt = checkpoint_for(config_name, weights)
    if ckpt is not None:
        model, cfg = load_model(str(ckpt), map_location="cpu")
        label = ckpt.name
    else:
        cfg = load_config(config_name)
        torch.manual_seed(0)
        model = build_model(cfg)
        cfg.score_threshold = 0.0
        label = RANDOM_WEIGHTS
    backend = TorchBackend(model.eval(), cfg, device=device, fp16=fp16, compile=compile_, cuda_graph=cuda_graph,
                           tf32=tf32, cudnn_benchmark=cudnn_benchmark, tf32_convolutions=tf32_convolutions)
    return backend, label


def camera_rgb() -> np.ndarray:
    """The benchmark's 640x480 RGB frame: 32-pixel blocks of random colour under Gaussian noise (sigma 8)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(15, 20, 3)).astype(np.float32)
    rgb = np.clip(np.kron(coarse, np.ones((32, 32, 1), np.float32)) + rng.normal(0, 8, (480, 640, 3)), 0, 255)
    return rgb.astype(np.uint8)


def camera_messages(factory: TypestoreFactory, kind: str):
    """A 640x480 scene-like frame as a bgr8 Image or a JPEG CompressedImage, with its CameraInfo."""
    rgb = camera_rgb()
    k, pose = example_camera(None)
    image = (msg_encode.rgb_to_compressed(factory, rgb, "cam", 0, "jpeg") if kind == "jpeg"
             else msg_encode.rgb_to_image(factory, rgb, "cam", 0, "bgr8"))
    return image, msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", 0), pose


def run_row(pipe: OccupancyPipeline, factory: TypestoreFactory, kind: str, frames: int, warmup: int,
            marker_period: int, decode_stage: bool = True, camera_hz: float | None = None,
            serial: bool = False, overlap: bool = False, prepare_thread: bool = True,
            decode_on_thread: bool = True) -> dict:
    """One row: ``frames`` frames after ``warmup`` through the frame loop, lossless as fast as it goes, or
    newest-frame-wins from a camera at ``camera_hz``; items are the frames' arrival times. ``decode_on_thread``
    off: the decode stage only takes the frame (the node's locating, which this benchmark has none of) and
    the stage after it decodes, as the node's ``FrameLoop(decode_on_thread=False)``."""
    image, info, pose = camera_messages(factory, kind)
    records: list[dict] = []
    markers_ms: list[float] = []
    schedule = EveryNth(marker_period)
    lock = threading.Lock()

    processor = FrameProcessor(pipe)  # the node's: frame checks, reduced JPEG decoding, output checks

    def decode(item):
        t0, c0 = time.perf_counter(), time.thread_time()
        decoded = processor.decode_frame(FrameInput(image, info, cam_pose=pose))
        return {"t_taken": t0, "decode": (time.perf_counter() - t0) * 1e3,
                "decode_cpu": (time.thread_time() - c0) * 1e3, "decoded": decoded}

    def prepare(decoded, slot):
        t1, c1 = time.perf_counter(), time.thread_time()
        prepared = processor.prepare_decoded(decoded.pop("decoded"), slot)
        return {**decoded, "preprocess": (time.perf_counter() - t1) * 1e3,
                "preprocess_cpu": (time.thread_time() - c1) * 1e3, "prepared": prepared}

    def launch(item, p):
        t0, c0 = time.perf_counter(), time.thread_time()
        processor.launch(p["prepared"])
        p["launch"], p["launch_cpu"] = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
        return p

    def finish(item, p):
        def network_done():  # as FrameLoop's: with ``overlap``, a serial loop takes the next frame now
            p["net_end"] = time.perf_counter()
            if overlap:
                runner.network_done()

        t0 = time.perf_counter()
        result = processor.complete(p["prepared"], network_done)  # infer (or collect), post-process, checks
        t1, c1 = time.perf_counter(), time.thread_time()
        build_outputs(factory, result, "odom", 0, markers=False)  # PointCloud2 + grid pose, as the node
        t2, c2 = time.perf_counter(), time.thread_time()
        if schedule.due():
            msg_encode.occupancy_to_marker_array(factory, result.occupancy, "odom", 0)
            markers_ms.append((time.perf_counter() - t2) * 1e3)
        timings = result.timings_ms
        with lock:
            records.append({"decode": p["decode"], "preprocess": p["preprocess"], "launch": p.get("launch", 0.0),
                            "infer": timings["infer_ms"],
                            "postprocess": timings["postprocess_ms"], "output_check": timings["output_check_ms"],
                            "pointcloud2": (t2 - t1) * 1e3,
                            "decode_cpu": p["decode_cpu"], "preprocess_cpu": p["preprocess_cpu"],
                            "pointcloud2_cpu": (c2 - c1) * 1e3, "launch_cpu": p.get("launch_cpu", 0.0),
                            "process_cpu_s": process_cpu_s(),
                            "end_to_end": (t2 - (item if camera_hz else p["t_taken"])) * 1e3, "done": t2,
                            "net_start": t0, "net_end": p.get("net_end"),
                            "voxels": len(result.occupancy.voxel_labels), "stage2": (t2 - t0) * 1e3})
            first = len(records) == 1
        if first:  # as the node's frame loop after its first frame (compilation, capture): a warm-up frame
            freeze_startup_objects()

    errors: list[BaseException] = []
    ahead = {"launch": launch, "launched_done": lambda p: processor.launched_done(p["prepared"])} if pipe.launch_ahead else {}

    def locate(item):  # where the frame's latency starts, as in ``decode``
        return {"t_taken": time.perf_counter()}

    if decode_stage and not decode_on_thread:
        stages = {"decode": locate, "prepare": lambda taken, slot: prepare({**decode(None), **taken}, slot)}
    else:
        stages = ({"prepare": prepare, "decode": decode} if decode_stage
                  else {"prepare": lambda item, slot: prepare(decode(item), slot)})
    freeze_startup_objects()  # as the node does after start-up
    runner = FrameRunner(finish=finish, on_error=lambda item, exc: errors.append(exc), slots=pipe.slots,
                         lossless=camera_hz is None, serial=serial, prepare_thread=prepare_thread, **stages, **ahead)
    try:
        start = time.perf_counter()
        for i in range(warmup + frames):
            if camera_hz:
                time.sleep(max(0.0, start + i / camera_hz - time.perf_counter()))
            runner.submit(time.perf_counter())
        runner.wait_idle()
    finally:
        runner.close()
    if errors:
        trace = "".join(traceback.format_exception(errors[0]))
        raise RuntimeError(f"{len(errors)} frames failed, the first with:\n{trace}")
    counts = runner.counts()
    timed = records[warmup:]
    if len(timed) < 2:
        raise RuntimeError(f"only {len(records)} of {warmup + frames} frames processed: too few to time")
    wall = timed[-1]["done"] - records[warmup - 1]["done"] if warmup else timed[-1]["done"] - timed[0]["done"]
    n = len(timed) if warmup else len(timed) - 1
    med = {s: float(np.median([r[s] for r in timed])) for s in (*STAGES, "end_to_end", "stage2")}
    stages = {s: med[s] for s in STAGES}
    stages["markers_every_n"] = float(np.median(markers_ms)) if markers_ms else 0.0
    stages["markers_per_frame_amortised"] = float(np.sum(markers_ms) / len(records)) if markers_ms else 0.0
    stages["end_to_end_latency"] = med["end_to_end"]
    stages["end_to_end_latency_p90"] = float(np.percentile([r["end_to_end"] for r in timed], 90))
    overhead = sum(med[s] for s in OVERHEAD_STAGES)
    # the network's idle time from one frame's end to the next one's start: the host work the frame rate pays
    # for where stages overlap (None for launched frames, whose network time is the device's)
    gaps = [(b["net_start"] - a["net_end"]) * 1e3 for a, b in itertools.pairwise(records[max(warmup - 1, 0):])
            if a["net_end"] is not None]
    between = float(np.median(gaps)) if gaps else None
    # the same stages in CPU time of their thread: below the wall time by what the thread spent waiting
    # (for a core, the GIL or the device) rather than working
    cpu = {s: float(np.median([r[f"{s}_cpu"] for r in timed])) for s in CPU_TIMED_STAGES}
    first = records[warmup - 1] if warmup else timed[0]  # the process's CPU time over the same frames as ``fps``
    process_cpu_ms = (timed[-1]["process_cpu_s"] - first["process_cpu_s"]) * 1e3 / n
    return {
        "input": kind, "fps": n / wall, "infer_ms": med["infer"], "overhead_ms": overhead,
        "overhead_fraction_of_infer": overhead / med["infer"], "between_networks_ms": between,
        "between_networks_fraction_of_infer": None if between is None else between / med["infer"],
        "stages_ms": stages, "stages_cpu_ms": cpu,
        "process_cpu_ms_per_frame": process_cpu_ms,
        "frames": len(timed), "dropped": counts["dropped"], "decode_stage": decode_stage, "camera_hz": camera_hz,
        "serial": serial, "host_overlap": bool(serial and overlap), "prepare_thread": prepare_thread,
        "decode_on_thread": bool(decode_stage and decode_on_thread),
        "voxels_median": int(np.median([r["voxels"] for r in timed])), "marker_period": marker_period,
    }


def jpeg_decoder() -> str:
    """The library that decodes the JPEG rows, as the node would (rows without this field used PIL)."""
    cv2 = msg_decode.opencv()
    return f"opencv {cv2.__version__}" if cv2 is not None else f"PIL {PIL.__version__}"


def append_key(row: dict) -> tuple:
    """What makes two rows the same measurement for ``--append``. Rows from before ``tf32``,
    ``tf32_convolutions``, ``cudnn_benchmark``, ``decode_stage``, ``camera_hz`` and ``serial`` were recorded ran
    with them off (a ``tf32`` row's convolutions in TF32); rows without ``omp_wait_policy`` are taken
    as the default policy (true of the GPU runs; the older PASSIVE CPU rows live in files of their own);
    launch-ahead rows without ``launch_wait`` polled (``watch``: session 23's watcher thread, measured in
    device calls 11 and 12 and dropped, docs/results/frame_path.md); rows without ``post_threads`` ran the
    kernel on one thread (fused rows: none); CPU rows without ``resize`` resized with torch; rows without
    ``host_overlap`` took one frame at a time where serial; rows without ``frame_graph`` ran without it; rows
    without ``prepare_thread`` had one; rows without ``device_cloud`` copied the grids; rows without
    ``emulated_device_ms`` ran on a real device; rows without ``decode_on_thread`` decoded on their decode stage."""
    wait = row.get("launch_wait") or ("poll" if postprocess_impl(row) == "fused" else None)
    return (*(row.get(k) for k in ("config", "backend", "precision", "input", "closing")),
            bool(row.get("tf32", False)), bool(row.get("tf32_convolutions", row.get("tf32", False))),
            bool(row.get("cudnn_benchmark", False)),
            row.get("omp_wait_policy", "default"), postprocess_impl(row), bool(row.get("decode_stage", False)),
            row.get("camera_hz"), bool(row.get("serial", False)), wait,
            row.get("post_threads", None if postprocess_impl(row) == "fused" else 1),
            row.get("resize", "torch" if row.get("threads") is not None else None),
            bool(row.get("host_overlap", False)), bool(row.get("frame_graph", False)),
            bool(row.get("prepare_thread", True)), bool(row.get("device_cloud", False)), row.get("emulated_device_ms"),
            bool(row.get("decode_on_thread", row.get("decode_stage", False))))


def postprocess_impl(row: dict) -> str:
    """Which post-processing a row ran: "fused" (in the CUDA graph), "native" (the CPU kernel) or "torch"
    (torch ops; every row from before the kernel that was not fused)."""
    return row.get("postprocess_impl") or ("fused" if row.get("fused_postprocess") else "torch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", nargs="+", default=["lite", "paper_student"])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--inputs", nargs="+", default=["bgr8", "jpeg"], choices=["bgr8", "jpeg"])
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "fp16"],
                        help="default: fp32 on CPU, fp32 and fp16 on CUDA")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile on CUDA (tens of seconds per precision)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="eager instead of the static/CUDA-graph runner")
    parser.add_argument("--frame-graph", choices=("on", "off"), default="on",
                        help="fused CUDA rows: one graph per buffer slot for the whole frame (on), or the "
                             "preprocessing's and the network's graphs replayed apart (off)")
    parser.add_argument("--device-cloud", choices=("on", "off"), default="off",
                        help="fused rows: the device compacts the occupied voxels into the cloud's rows and only "
                             "those come back (on), or the dense grids come back and the host scans them (off)")
    parser.add_argument("--tf32", action="store_true", help="TF32 convolutions/matmuls in FP32 (CUDA; default IEEE)")
    parser.add_argument("--tf32-convolutions", action="store_true",
                        help="TF32 convolutions, IEEE matmuls in FP32: PyTorch's default (CUDA; default IEEE)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cudnn.benchmark while the backend warms up and captures (CUDA; default heuristic)")
    parser.add_argument("--decode-stage", choices=("auto", "on", "off"), default="auto",
                        help="decode on a thread of its own: auto (the node's rule) for JPEG rows in a pipelined "
                             "loop only, on or off for every row (off: the loop before session 7)")
    parser.add_argument("--decode-on-thread", choices=("auto", "on", "off"), default="auto",
                        help="with a decode stage: whether it decodes or only takes the frame (auto: the node's rule, "
                             "processing.decodes_on_decode_thread)")
    parser.add_argument("--prepare-thread", choices=("auto", "on", "off"), default="auto",
                        help="prepare on a thread of its own: auto (the node's rule) everywhere but in a "
                             "launch-ahead loop, whose finish stage prepares each frame before launching it")
    parser.add_argument("--pipelining", choices=PIPELINING_MODES, default="auto",
                        help="the node's parameter: overlap consecutive frames' stages (on) or one frame at a time "
                             "(off); auto (the node's default): on where the network runs on a GPU")
    parser.add_argument("--post-threads", choices=("auto", "1", "2"), default="auto",
                        help="threads of the CPU post-processing kernel: auto (the node's rule, "
                             "processing.post_threads_for): 1 pipelined; where the network runs alone 2 for raw "
                             "images, 1 for JPEG beside its decode")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="torch (default), or onnxruntime on the CPU: each config exported to a temporary ONNX "
                             "(gather sampling) with the same weights; fp32 only")
    parser.add_argument("--host-overlap", choices=("on", "off"), default="on",
                        help="where the network runs alone (pipelining off): on (the node's loop), the next frame "
                             "is decoded and prepared while this one is post-processed; off, one frame at a time "
                             "(the loop before session 27)")
    parser.add_argument("--resize", choices=("native", "torch"), default="native",
                        help="the CPU preprocessing's resize: the native kernel's (the node's, where built) or "
                             "torch's (the same bytes; the path before session 26)")
    parser.add_argument("--camera-hz", type=float, default=None,
                        help="feed at this camera rate, newest frame wins (the node); default: lossless, flat out")
    parser.add_argument("--marker-period", type=int, default=defaults()["marker_period"],
                        help="the node's marker_period (default: its default)")
    parser.add_argument("--closing", choices=["on", "off", "model"], default="on",
                        help="post-processing closing: on (the node's default), off, or as the checkpoint says")
    parser.add_argument("--weights", nargs="+", default=[], metavar="CONFIG=CHECKPOINT",
                        help="checkpoint per config (default: the shipped lite; others random)")
    parser.add_argument("--emulate-device-ms", type=float, default=None, metavar="MS",
                        help="CPU: the fused path against a stand-in device of MS ms per frame (emulated_device.py)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--append", action="store_true", help="merge rows into an existing --json file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from rosbags.typesys import Stores, get_typestore

    torch.set_num_threads(args.threads)
    if args.device == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        print("note: OMP_WAIT_POLICY=PASSIVE slows torch's multi-threaded inference (about 2x for lite on 2 cores); "
              "the node runs with the default policy", file=sys.stderr)
    emulate = args.emulate_device_ms
    if emulate is not None and (args.device != "cpu" or args.backend != "torch" or args.no_cuda_graph
                                or args.frame_graph == "off" or not emulate > 0):
        print("--emulate-device-ms: a positive time, with --device cpu, the torch backend and its frame graph",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no usable CUDA", file=sys.stderr)
        return 2
    factory = TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    weights = {}
    for item in args.weights:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            print(f"--weights {item}: expected CONFIG=CHECKPOINT with an existing file", file=sys.stderr)
            return 2
        weights[name] = Path(path)
    precisions = args.precisions or (["fp32", "fp16"] if args.device == "cuda" else ["fp32"])
    if args.backend == "onnxruntime" and (args.device != "cpu" or precisions != ["fp32"]):
        print("--backend onnxruntime: --device cpu and fp32 only", file=sys.stderr)
        return 2
    rows = []
    exports = tempfile.TemporaryDirectory(prefix="bench_frame_path_")
    for name in args.configs:
        for precision in precisions:
            if args.backend == "onnxruntime":
                backend, used = make_ort_backend(name, weights, Path(exports.name))
            else:
                backend, used = make_backend(name, args.device, precision == "fp16", args.compile,
                                             not args.no_cuda_graph, weights, args.tf32, args.cudnn_benchmark,
                                             args.tf32_convolutions)
            if args.closing != "model":
                backend.config.closing = args.closing == "on"
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            pipe = OccupancyPipeline(backend, frame_graphs=args.frame_graph == "on",
                                     device_cloud=args.device_cloud == "on", fuse=True if emulate else None)
            pipe.preprocessor.native_resize = args.resize == "native"
            emulation = contextlib.ExitStack()  # for the pipeline's life: its events and graphs are the emulation's
            if emulate:
                emulation.enter_context(emulated(pipe, emulate))
            for kind in args.inputs:
                # emulated: the CUDA rule (auto pipelines)
                pipelined = frame_loop_mode("on" if emulate and args.pipelining == "auto" else args.pipelining, pipe)[0]
                # off only where the loop launches ahead (FrameRunner's rule): "off" is the node's rule there too;
                # the row records what ran
                prepare_thread = uses_prepare_thread(pipelined, pipe) or args.prepare_thread == "on"
                # one frame at a time (--host-overlap off) the kernel had both cores to itself for either input
                compressed = kind == "jpeg" and args.host_overlap == "on"
                pipe.post_threads = (post_threads_for(pipelined, compressed) if args.post_threads == "auto"
                                     else int(args.post_threads))
                print(f"{name} {precision} {kind}: {pipe.describe()}; weights {used}"
                      f"{f'; emulated device, {emulate} ms per frame' if emulate else ''}", flush=True)
                row = run_row(pipe, factory, kind, args.frames, args.warmup, args.marker_period,
                              args.decode_stage == "on"
                              or (args.decode_stage == "auto"
                                  and uses_decode_thread(kind == "jpeg", pipelined, prepare_thread, locates=True)),
                              args.camera_hz, serial=not pipelined, overlap=args.host_overlap == "on",
                              prepare_thread=prepare_thread,
                              decode_on_thread=(args.decode_on_thread == "on" or (
                                  args.decode_on_thread == "auto" and decodes_on_decode_thread(kind == "jpeg",
                                                                                               prepare_thread))))
                label = (f"torch {backend.mode}" + (" fused" if pipe.fused else "") if pipe.tensor_path
                         else f"onnxruntime {backend.device}")
                row = {"config": name, "backend": label,
                       "precision": precision, "fused_postprocess": pipe.fused, **row,
                       "weights": used, "threads": args.threads if args.device == "cpu" else None,
                       "closing": bool(backend.config.closing),  # tf32/cudnn_benchmark: as they ran (CUDA only)
                       "tf32": bool(getattr(backend, "tf32", False) and args.device == "cuda"),
                       "tf32_convolutions": bool(getattr(backend, "tf32_convolutions", False) and args.device == "cuda"),
                       "cudnn_benchmark": bool(getattr(backend, "cudnn_benchmark", False)),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                       "jpeg_decoder": jpeg_decoder() if kind == "jpeg" else None,
                       "post_threads": pipe.post_threads if not pipe.fused else None,
                       # as it ran: a failed capture falls back to the two graphs
                       "frame_graph": bool(pipe.fused and pipe.preprocessor.frame_graphs),
                       "device_cloud": pipe.device_cloud is not None,
                       "emulated_device_ms": emulate,
                       # the peak since this config and precision's pipeline was made (its graphs included)
                       "cuda_peak_allocated_mb": (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
                                                  else None),
                       "cuda_reserved_mb": torch.cuda.memory_reserved() / 2**20 if args.device == "cuda" else None,
                       "postprocess_impl": ("fused" if pipe.fused else "native" if native_postprocess.available()
                                            and args.device == "cpu" else "torch"),
                       "resize": (("native" if pipe.preprocessor.native_resize and native_postprocess.available()
                                   else "torch") if args.device == "cpu" else None)}
                rows.append(row)
                s, c = row["stages_ms"], row["stages_cpu_ms"]
                post = (row["postprocess_impl"] + (f" x{pipe.post_threads}" if row["post_threads"] else "")
                        + (", frame graph" if row["frame_graph"] else "")
                        + (", device cloud" if row["device_cloud"] else "")
                        + (", no prepare thread" if not row["prepare_thread"] else "")
                        + (", decode thread" if row["decode_on_thread"] else
                           ", a thread that takes frames, decoded by the next stage" if row["decode_stage"] else ""))
                between = ("" if row["between_networks_ms"] is None else f"between networks {row['between_networks_ms']:.2f} "
                           f"({100 * row['between_networks_fraction_of_infer']:.1f} %)  ")
                print(f"  {kind:5s} [{post} post] fps {row['fps']:7.2f}  infer {row['infer_ms']:8.2f}  overhead "
                      f"{row['overhead_ms']:6.2f} ({100 * row['overhead_fraction_of_infer']:.1f} %)  {between}decode "
                      f"{s['decode']:.2f} pre {s['preprocess']:.2f} launch {s['launch']:.2f} post "
                      f"{s['postprocess']:.2f} check {s['output_check']:.2f} cloud "
                      f"{s['pointcloud2']:.2f} markers/{args.marker_period} {s['markers_every_n']:.1f}  "
                      f"dropped {row['dropped']}  (CPU time: decode {c['decode']:.2f} pre {c['preprocess']:.2f} "
                      f"launch {c['launch']:.2f} cloud {c['pointcloud2']:.2f}; process "
                      f"{row['process_cpu_ms_per_frame']:.2f} ms per frame)", flush=True)
            pipe.close()
            emulation.close()
    exports.cleanup()
    device = device_name(args.device) + (" with an emulated device (no GPU)" if emulate else "")
    out = {"device": device, "torch": torch.__version__, "rows": rows}
    if args.json:
        path = Path(args.json)
        if args.append and path.is_file():
            old = json.loads(path.read_text())
            if old.get("device") != out["device"]:
                print(f"--append: {path} was measured on {old.get('device')!r}, this run on {out['device']!r}",
                      file=sys.stderr)
                return 2
            new_keys = {append_key(r2) for r2 in rows}
            keep = [r for r in old["rows"] if append_key(r) not in new_keys]
            out["rows"] = keep + rows
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
