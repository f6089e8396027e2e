"""The occupancy PointCloud2 build (the frame path's ``pointcloud2`` stage): before, after, reference.

``reference_pointcloud2`` builds the message the obvious way (``OccupancyFrame.centers_world`` in
float64, a zeroed structured array filled field by field with colours from ``label_colors``,
PointFields spelled out, ``is_dense`` from three ``isfinite`` calls); tests/test_pointcloud2_build.py
holds ``msg_encode.occupancy_to_pointcloud2`` to its message bytes. "before" is the implementation
at git revision ``--before`` (``discene_ros/conversions.py`` and ``msg_factory.py`` read with ``git
show``; default: the commit before the module was split and the build made faster). All run on the
same synthetic frame (``frame_from_voxels`` from random sorted voxel ids, by default 10,500 of the
60x60x36 grid, about what the shipped lite model publishes), interleaved in one process in a random
order per round; the minimum and median per call are printed (and written with ``--json``).

    OMP_NUM_THREADS=1 python benchmarks/bench_pointcloud2.py [--calls 500] [--voxels 10500] [--json F]

Results: docs/results/pointcloud2_build.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from discene_ros import msg_encode  # noqa: E402
from discene_ros.msg_factory import MessageFactory, RclpyFactory, TypestoreFactory  # noqa: E402
from models.classes import label_colors  # noqa: E402
from models.config import lite  # noqa: E402
from models.postprocess import OccupancyFrame, frame_from_voxels  # noqa: E402

# (name, byte offset, sensor_msgs/PointField datatype: 7 FLOAT32, 2 UINT8), as documented in the README
REFERENCE_FIELDS = (("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("rgb", 12, 7), ("label", 16, 2), ("score", 20, 7))
REFERENCE_DTYPE = np.dtype({"names": [n for n, _, _ in REFERENCE_FIELDS],
                            "formats": ["<f4", "<f4", "<f4", "<f4", "u1", "<f4"],
                            "offsets": [o for _, o, _ in REFERENCE_FIELDS], "itemsize": 24})


def reference_points(frame: OccupancyFrame) -> np.ndarray:
    """The occupancy cloud's points built the obvious way (zeroed array, one field at a time)."""
    centers = frame.centers_world()
    labels = np.asarray(frame.voxel_labels, dtype=np.uint8)
    colors = label_colors(labels).astype(np.uint32)
    points = np.zeros(len(labels), dtype=REFERENCE_DTYPE)
    points["x"], points["y"], points["z"] = centers[:, 0], centers[:, 1], centers[:, 2]
    points["rgb"] = ((colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]).astype("<u4").view("<f4")
    points["label"] = labels
    points["score"] = np.asarray(frame.voxel_scores, dtype=np.float32)
    return points


def reference_pointcloud2(factory: MessageFactory, frame: OccupancyFrame, frame_id: str, stamp_ns: int) -> Any:
    """PointCloud2 of ``reference_points``: header, the six PointFields, height 1, little endian."""
    points = reference_points(frame)
    stamp = factory.new("builtin_interfaces/msg/Time", sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    header = factory.new("std_msgs/msg/Header", stamp=stamp, frame_id=frame_id)
    fields = [factory.new("sensor_msgs/msg/PointField", name=name, offset=offset, datatype=datatype, count=1)
              for name, offset, datatype in REFERENCE_FIELDS]
    dense = bool(np.isfinite(points["x"]).all() and np.isfinite(points["y"]).all() and np.isfinite(points["z"]).all())
    return factory.new("sensor_msgs/msg/PointCloud2", header=header, height=1, width=len(points), fields=fields,
                       is_bigendian=False, point_step=24, row_step=24 * len(points),
                       data=factory.uint8_array(points.tobytes()), is_dense=dense)


def synthetic_frame(seed: int, voxels: int = 10_500, grid: tuple[int, int, int] = (60, 60, 36),
                    origin: tuple[float, float, float] = (-2.4, 0.35, -0.1)) -> OccupancyFrame:
    """A frame of ``voxels`` occupied voxels at random sorted ids, labels 1..11, scores in [0, 1)."""
    config = lite()
    config.grid_shape = list(grid)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(int(np.prod(grid)), size=voxels, replace=False))
    labels = rng.integers(1, 12, size=voxels).astype(np.uint8)
    return frame_from_voxels(ids, labels, rng.random(voxels, dtype=np.float32), np.asarray(origin), config)


BEFORE_REV = "742c1bb"  # conversions.py in one piece, before the split and the faster cloud build


def load_revision(rev: str, path: str) -> types.ModuleType:
    """Module ``path`` of package ``discene_ros`` as it was at git revision ``rev`` (relative imports
    resolve to today's package)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType(f"discene_ros._at_{rev}_{Path(path).stem}")
    module.__package__ = "discene_ros"
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def _stats(seconds: list[float]) -> dict[str, float]:
    us = np.asarray(seconds) * 1e6
    return {"min_us": float(us.min()), "median_us": float(np.median(us)), "mean_us": float(us.mean())}


def interleaved(candidates: dict[str, Any], calls: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Each candidate called ``calls`` times, all of them once per round in a random order."""
    rng = np.random.default_rng(seed)
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(calls):
        for i in rng.permutation(len(names)):
            start = time.perf_counter()
            candidates[names[i]]()
            times[names[i]].append(time.perf_counter() - start)
    return {name: _stats(times[name]) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="timed calls per candidate (>= 300 for the record)")
    parser.add_argument("--voxels", type=int, default=10_500, help="occupied voxels per frame")
    parser.add_argument("--before", default=BEFORE_REV, help="git revision of the implementation to compare with")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    factory = TypestoreFactory(store)
    before_conv = load_revision(args.before, "discene_ros/conversions.py")
    before_factories = load_revision(args.before, "discene_ros/msg_factory.py")
    before_factory = before_factories.TypestoreFactory(store)
    frame = synthetic_frame(0, args.voxels)
    points = msg_encode.occupancy_points(frame)
    candidates = {
        "before": lambda: before_conv.occupancy_to_pointcloud2(before_factory, frame, "odom", 0),
        "after": lambda: msg_encode.occupancy_to_pointcloud2(factory, frame, "odom", 0),
        "reference (test oracle)": lambda: reference_pointcloud2(factory, frame, "odom", 0),
        "after: occupancy_points": lambda: msg_encode.occupancy_points(frame),
        "after: points_to_pointcloud2": lambda: msg_encode.points_to_pointcloud2(factory, points, "odom", 0),
        "rclpy uint8[] before": lambda: before_factories.RclpyFactory().uint8_array(points),
        "rclpy uint8[] after": lambda: RclpyFactory().uint8_array(points),
    }
    if bytes(candidates["before"]().data) != bytes(candidates["after"]().data):
        raise SystemExit(f"the cloud built at {args.before} differs from today's")
    for fn in candidates.values():  # warm-up
        for _ in range(20):
            fn()
    results = interleaved(candidates, args.calls)
    ref, new = results["before"], results["after"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"{len(points)} points, {args.calls} calls each, interleaved ({machine})")
    for name, r in results.items():
        print(f"  {name:48s} min {r['min_us']:7.1f} us  median {r['median_us']:7.1f} us")
    print(f"  speed-up of the PointCloud2 build over {args.before}: min {ref['min_us'] / new['min_us']:.2f}x, "
          f"median {ref['median_us'] / new['median_us']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"points": len(points), "calls": args.calls, "machine": machine, "before": args.before,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
