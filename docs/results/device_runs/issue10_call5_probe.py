"""Issue 10, device call 5 (docs/results/frame_path.md), run from the repo root on CUDA: where the
frame path's CPU-side preprocessing time goes on CUDA, quiet and beside a busy Python thread, and the
GIL switch interval's effect on the benchmark rows."""
# ruff: noqa: B023  (each lambda is timed inside the loop iteration that defines it)
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path[:0] = [".", "benchmarks"]
import bench_frame_path as bench  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from discene_ros import msg_decode, msg_encode  # noqa: E402
from export.pipeline import OccupancyPipeline  # noqa: E402
from models.geometry import grid_to_image_matrix, place_grid, scale_intrinsic  # noqa: E402

dev = os.environ.get("PROF_DEVICE", "cuda")
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
backend, _ = bench.make_backend("lite", dev, False, False, True)
pipe = OccupancyPipeline(backend)
print(pipe.describe(), flush=True)


def med(f, n=300, between=None):
    ts = []
    for i in range(n):
        if between:
            between()
        t0 = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t0)
    return f"med {np.median(ts) * 1e3:.3f} min {np.min(ts) * 1e3:.3f} p90 {np.percentile(ts, 90) * 1e3:.3f}"


stop = threading.Event()


def busy(occ):  # stage 2's host work, continuously
    while not stop.is_set():
        msg_encode.occupancy_to_pointcloud2(factory, occ, "odom", 0)


for kind in ("bgr8", "jpeg"):
    image, info, pose = bench.camera_messages(factory, kind)
    hw = msg_decode.reduced_decode_size(pipe.config.image_size)
    rgb = msg_decode.any_image_to_rgb(image, hw)
    k = msg_decode.camera_info_to_k(info, rgb.shape[:2])
    for i in range(20):
        occ = pipe.complete(pipe.prepare(rgb, k, pose, slot=i % pipe.slots)) if not pipe.fused else None
    if pipe.fused:
        occ = pipe.collect(pipe.launch(pipe.prepare(rgb, k, pose, slot=0)))
    sync()
    pre = pipe.preprocessor
    s = pre.slots[0]
    origin = place_grid(pose, voxel_size=pipe.config.voxel_size, grid_shape=tuple(pipe.config.grid_shape))
    g2i = grid_to_image_matrix(scale_intrinsic(k, rgb.shape[:2], pre.size_hw), pose, origin,
                               pipe.config.voxel_size, tuple(pipe.config.grid_shape))
    print(f"--- {kind}: rgb {rgb.shape} contiguous {rgb.flags.c_contiguous}", flush=True)
    print("decode          ", med(lambda i: msg_decode.any_image_to_rgb(image, hw)), flush=True)
    print("prepare synced  ", med(lambda i: pipe.prepare(rgb, k, pose, slot=i % pipe.slots), between=sync), flush=True)
    print("prepare b2b     ", med(lambda i: pipe.prepare(rgb, k, pose, slot=i % pipe.slots)), flush=True)
    sync()
    print("place_grid      ", med(lambda i: place_grid(pose, voxel_size=pipe.config.voxel_size,
                                                      grid_shape=tuple(pipe.config.grid_shape))), flush=True)
    print("g2i matrix      ", med(lambda i: grid_to_image_matrix(scale_intrinsic(k, rgb.shape[:2], pre.size_hw), pose,
                                                               origin, pipe.config.voxel_size,
                                                               tuple(pipe.config.grid_shape))), flush=True)
    print("stage (copyto)  ", med(lambda i: pre._stage(s, rgb, None, g2i), between=sync), flush=True)
    if dev == "cuda":
        graph = pre._graph(s, None)
        print("graph replay    ", med(lambda i: graph.replay(), between=sync), flush=True)
        print("event+record    ", med(lambda i: torch.cuda.Event().record(), between=sync), flush=True)
        if pipe.upload_stream is not None:
            print("wait_stream     ", med(lambda i: pipe.upload_stream.wait_stream(torch.cuda.current_stream()),
                                          between=sync), flush=True)
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        stop.clear()
        th = threading.Thread(target=busy, args=(occ,), daemon=True)
        th.start()
        time.sleep(0.05)
        print(f"busy thread, switch {interval * 1e3:.1f} ms: decode ",
              med(lambda i: msg_decode.any_image_to_rgb(image, hw)),
              " prepare ", med(lambda i: pipe.prepare(rgb, k, pose, slot=i % pipe.slots), between=sync), flush=True)
        stop.set()
        th.join()
    sys.setswitchinterval(0.005)
pipe.close()
out = os.environ.get("OUT", "/tmp")
for interval in (0.005, 0.0005):
    sys.setswitchinterval(interval)
    print(f"=== bench rows, switch interval {interval * 1e3:.1f} ms", flush=True)
    bench.main(["--device", dev, "--configs", "lite", "--precisions", "fp32", "--frames",
                os.environ.get("PROF_FRAMES", "300"), "--json", f"{out}/switch_{interval * 1e3:.1f}.json"])
