"""Unfused CUDA path (eager network, ``--no-cuda-graph``): the finish stage's wait for the network on a sleeping
(blocking) event, as shipped since session 24, against a spinning one, in this tree, interleaved (session 31).
Device call 2 of session 31 compared the tree before session 24 with this one and saw paper_student FP32 slower
(40-42 against 50-54 FPS) but FP16 faster; this isolates the wait from everything else that changed since.

    python3 issue10_unfused_wait_probe.py [ROUNDS] [--json F]
"""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "benchmarks")]
import bench_frame_path as bench  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from discene_ros.processing import post_threads_for  # noqa: E402
from export.pipeline import OccupancyPipeline  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2
out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
device = "cuda" if torch.cuda.is_available() else "cpu"
factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
rows = []
for name in ("paper_student", "lite"):
    backend, used = bench.make_backend(name, device, False, False, False)
    pipe = OccupancyPipeline(backend)
    pipe.post_threads = post_threads_for(True)
    for r in range(rounds):
        for blocking in (True, False):
            if device == "cuda":  # the finish stage's network-done event (OccupancyPipeline._inferred)
                pipe._inferred = torch.cuda.Event(blocking=blocking)
            row = bench.run_row(pipe, factory, "bgr8", 300 if device == "cuda" else 10, 5, 20, decode_stage=False,
                                prepare_thread=True)
            row.update(config=name, weights=used, blocking_wait=blocking, round=r + 1)
            rows.append(row)
            print(f"{name} round {r + 1} {'sleeping' if blocking else 'spinning'} wait: fps {row['fps']:.1f}  infer "
                  f"{row['infer_ms']:.2f} ms  process CPU {row['process_cpu_ms_per_frame']:.2f} ms/frame", flush=True)
    pipe.close()
if out:
    Path(out).write_text(json.dumps({"device": bench.device_name(device), "rows": rows}, indent=1) + "\n")
