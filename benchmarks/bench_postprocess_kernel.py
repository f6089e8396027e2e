"""Two builds of the native post-processing kernel side by side, interleaved, on the frame path's lite frame.

    python benchmarks/bench_postprocess_kernel.py BUILD.so [BUILD.so ...] [--threads 1 2] [--rounds N] [--json F]

The machine this project builds on drifts by a quarter from minute to minute, more than a kernel change
moves the frame loop, so a change is measured here: each build (a ``_occupancy_native*.so``, e.g. this
checkout's and one built from an older commit with ``python setup.py build_ext --inplace`` in a worktree)
is loaded under its own path, and the builds take turns on the same network output (lite with the shipped
weights, the 640x480 bgr8 frame of ``bench_frame_path``, closing on), ``--calls`` calls per turn, each
through ``models.native_postprocess.occupied_labels`` (what the frame path runs) with that build in place.
Prints each build's median and minimum over the rounds of the per-turn medians, in ms, and checks that every
build finds the same voxels. ``--threads``: the kernel's thread counts to take turns with too (each build at
each count; 2 splits its loops with its helper thread, as the CPU frame loop does one frame at a time);
default 1. torch runs on one thread here, so no OpenMP worker spins beside the helper.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_frame_path as bench  # noqa: E402
import bench_host_steps  # noqa: E402

from export.pipeline import OccupancyPipeline  # noqa: E402
from models import native_postprocess  # noqa: E402


def load_build(path: str) -> ModuleType:
    """The kernel extension at ``path``, loaded as its own module (builds of other commits side by side);
    SystemExit for a build of another ABI than this checkout's wrapper calls."""
    loader = importlib.machinery.ExtensionFileLoader("_occupancy_native", path)
    spec = importlib.util.spec_from_file_location("_occupancy_native", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if getattr(module, "ABI_VERSION", None) != native_postprocess.ABI_VERSION:
        raise SystemExit(f"{path}: ABI {getattr(module, 'ABI_VERSION', None)}, this checkout calls "
                         f"{native_postprocess.ABI_VERSION}")
    return module


@contextmanager
def build_in_place(kernel: ModuleType) -> Iterator[None]:
    """``native_postprocess`` calling ``kernel`` for the duration."""
    kept = native_postprocess._kernel
    native_postprocess._kernel = kernel
    try:
        yield
    finally:
        native_postprocess._kernel = kept


def frame_outputs() -> tuple[torch.Tensor, torch.Tensor, object]:
    """The lite network's points and scores for the benchmark frame, and its config (closing on)."""
    from rosbags.typesys import Stores, get_typestore

    factory = bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    backend, _ = bench.make_backend("lite", "cpu", False, False, True)
    backend.config.closing = True
    pipe = OccupancyPipeline(backend)
    _, infer = bench_host_steps.steps(pipe, factory)
    with torch.inference_mode():
        points, scores = (t.clone() for t in infer())
    return points, scores, pipe.config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", help="paths of _occupancy_native*.so builds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=40, help="calls per build and round")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="kernel thread counts to compare")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    points, scores, cfg = frame_outputs()
    torch.set_num_threads(1)  # the wrapper's one torch op (the query centres) wakes no OpenMP worker
    kernels = {path: load_build(path) for path in args.builds}
    turns = [(path, threads) for path in kernels for threads in args.threads]
    found = {}
    for path, threads in turns:
        with build_in_place(kernels[path]):
            found[(path, threads)] = native_postprocess.occupied_labels(points, scores, cfg, threads=threads)
    first = found[turns[0]]
    for turn, result in found.items():
        if not all(np.array_equal(a, b) for a, b in zip(result, first, strict=True)):
            raise SystemExit(f"{turn} finds other voxels than {turns[0]}")
    medians: dict[tuple[str, int], list[float]] = {turn: [] for turn in turns}
    for _ in range(args.rounds):
        for path, threads in turns:
            times = []
            with build_in_place(kernels[path]):
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    native_postprocess.occupied_labels(points, scores, cfg, threads=threads)
                    times.append((time.perf_counter() - t0) * 1e3)
            medians[(path, threads)].append(float(np.median(times)))
    rows = [{"build": path, "threads": threads, "median_ms": float(np.median(m)), "min_ms": float(np.min(m))}
            for (path, threads), m in medians.items()]
    for row in rows:
        print(f"{row['build']} x{row['threads']}: median {row['median_ms']:.3f} ms, min {row['min_ms']:.3f} ms "
              f"({row['median_ms'] / rows[0]['median_ms']:.2f}x the first)")
    print(f"{len(first.ids)} voxels each")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": f"CPU {platform.processor() or platform.machine()}", "voxels": len(first.ids),
            "rounds": args.rounds, "calls": args.calls, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
