"""Host-step probe (issue 10; written for device call 10, which was not lent, and run on the CPU):
each host step of the node's frame path timed alone, hot, on the device's host, so that the frame loop's stage times can be split into the steps' own cost and what the
loop adds. Tree-agnostic: run from the root of the tree to measure (the previous commit or this one).

    python3 issue10_call10_probe.py [cuda|cpu]
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "benchmarks")]
import bench_frame_path as bench  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from discene_ros import msg_encode  # noqa: E402
from discene_ros.processing import FrameInput, FrameProcessor, build_outputs  # noqa: E402

try:  # the node's output check since session 11: the cloud rows, whose writer reports their finiteness
    from discene_ros.processing import checked_cloud as output_check  # noqa: E402
except ImportError:  # older trees: the check on its own, the rows built by build_outputs
    from discene_ros.processing import check_outputs as output_check  # noqa: E402
from export.pipeline import OccupancyPipeline  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
backend, _ = bench.make_backend("lite", dev, False, False, True)
pipe = OccupancyPipeline(backend, fuse=True)
proc = FrameProcessor(pipe)
print(pipe.describe(), flush=True)


def med(f, n=400, between=sync):
    ts = []
    for i in range(n):
        between()
        t0 = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t0)
    p10, p50, p90 = np.percentile(ts, [10, 50, 90]) * 1e3
    return f"median {p50:.3f} ms  p10 {p10:.3f}  p90 {p90:.3f}"


def probe(kind: str) -> None:
    image, info, pose = bench.camera_messages(factory, kind)
    decoded = proc.decode_frame(FrameInput(image, info, cam_pose=pose))
    for i in range(10):  # warm-up, graph capture
        proc.complete(proc.launch(proc.prepare_decoded(decoded, i % pipe.slots)))
    sync()
    done = proc.complete(proc.launch(proc.prepare_decoded(decoded, 0)))
    p = [proc.prepare_decoded(decoded, i) for i in range(pipe.slots)]
    sync()
    print(f"--- {kind}", flush=True)
    print("decode_frame      ", med(lambda i: proc.decode_frame(FrameInput(image, info, cam_pose=pose))), flush=True)
    print("prepare_decoded   ", med(lambda i: proc.prepare_decoded(decoded, i % pipe.slots)), flush=True)
    if dev == "cuda":  # on the CPU these are the inference
        print("launch            ", med(lambda i: proc.launch(p[i % len(p)])), flush=True)
        print("launch + complete ", med(lambda i: proc.complete(proc.launch(p[i % len(p)]))), flush=True)
    print("markers           ", med(lambda i: msg_encode.occupancy_to_marker_array(factory, done.occupancy, "odom", 0)),
          flush=True)
    print("output check      ", med(lambda i: output_check(done.occupancy)), flush=True)
    print("build_outputs     ", med(lambda i: build_outputs(factory, done, "odom", 0, markers=False)), flush=True)


for kind in ("bgr8", "jpeg"):
    probe(kind)
pipe.close()
