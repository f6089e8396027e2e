"""Synthetic generator throughput: frames per second writing an Occ-ScanNet-format dataset.

    python benchmarks/bench_synth.py [--scenes 6] [--frames-per-scene 5] [--width 640] [--height 480] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.synth import generate  # noqa: E402


def measure(scenes: int, frames: int, width: int, height: int, workers: int, seed: int = 0) -> tuple[float, float]:
    """(frames per second of wall time, CPU seconds per frame) of ``generate`` (render, voxelise, encode, write).

    CPU time counts this process and its finished workers, so it stays meaningful on a busy machine.
    """
    import resource

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu0 = time.perf_counter(), cpu()
        generate(tmp, scenes, frames, seed=seed, width=width, height=height, workers=workers, progress=False)
        n = scenes * frames
        return n / (time.perf_counter() - start), (cpu() - cpu0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--frames-per-scene", type=int, default=5)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    n = args.scenes * args.frames_per_scene
    for workers in args.workers:
        fps, cpu = measure(args.scenes, args.frames_per_scene, args.width, args.height, workers)
        print(f"{args.width}x{args.height}  workers={workers}  frames={n}  {fps:.2f} frames/s wall  "
              f"({3600 * fps:.0f} frames/hour)  {1000 * cpu:.0f} CPU-ms/frame "
              f"(= {1 / cpu:.2f} frames/s per idle core)")


if __name__ == "__main__":
    main()
