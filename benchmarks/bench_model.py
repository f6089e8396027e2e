"""Forward latency of DiScene configs and its split into backbone+FPN / decoder / post-processing.

    python benchmarks/bench_model.py --configs lite paper_student --repeats 10 [--device cuda --fp16]

Inputs are a synthetic frame (random image, a camera 1.5 m high looking horizontally, grid placed
by the documented rule), so the decoder samples a realistic share of in-view points. Reports the
median over repeats after warm-up; "total" is a separate end-to-end measurement (forward + post).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.postprocess import points_to_occupancy  # noqa: E402
from models.preprocess import preprocess  # noqa: E402

CAM_POSE = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 1.5], [0.0, 0.0, 0.0, 1.0]])
INTRINSIC = np.array([[577.9, 0.0, 319.5], [0.0, 577.9, 239.5], [0.0, 0.0, 1.0]])  # ScanNet-like, 640x480


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_config(name: str, repeats: int, warmup: int, device: torch.device, fp16: bool) -> dict[str, float]:
    """Median milliseconds of each stage for one config, batch of one."""
    config = models.load_config(name)
    model = models.build_model(config).eval().to(device)
    rng = np.random.default_rng(0)
    frame = preprocess(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), INTRINSIC, CAM_POSE, config)
    image = torch.from_numpy(frame.image).to(device)
    grid2img = torch.from_numpy(frame.grid2img).to(device)
    depth = torch.full((1, 1, *config.image_size), 2.0, device=device) if config.use_depth else None
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=fp16)

    with torch.inference_mode(), autocast:
        features = model.extract_features(image)
        last = model.decode(features, grid2img, depth)["layers"][-1]
        points, scores = last["points"].float(), last["logits"].float().sigmoid()

        def post() -> object:
            return points_to_occupancy(points, scores, frame.voxel_origin, config)

        def total() -> object:
            out = model(image, grid2img, depth)["layers"][-1]
            return points_to_occupancy(out["points"].float(), out["logits"].float().sigmoid(), frame.voxel_origin, config)

        result = {
            "params_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "encoder": _median_ms(lambda: model.extract_features(image), repeats, warmup, device),
            "decoder": _median_ms(lambda: model.decode(features, grid2img, depth), repeats, warmup, device),
            "post": _median_ms(post, repeats, warmup, device),
            "total": _median_ms(total, repeats, warmup, device),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lite", "paper_student"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp16", action="store_true", help="autocast to float16 (CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.fp16 and device.type != "cuda":
        parser.error("--fp16 needs a CUDA device")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"device {device}{' fp16' if args.fp16 else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up")
    header = f"{'config':<15}{'params M':>9}{'total ms':>10}{'FPS':>7}{'backbone+FPN':>16}{'decoder':>16}{'post':>14}"
    print(header)
    print("-" * len(header))
    for name in args.configs:
        r = bench_config(name, args.repeats, args.warmup, device, args.fp16)
        parts = r["encoder"] + r["decoder"] + r["post"]

        def cell(key: str, r: dict[str, float] = r, parts: float = parts) -> str:
            return f"{r[key]:.1f} ({100 * r[key] / parts:.0f}%)"

        print(f"{name:<15}{r['params_M']:>9.1f}{r['total']:>10.1f}{1e3 / r['total']:>7.1f}"
              f"{cell('encoder'):>16}{cell('decoder'):>16}{cell('post'):>14}")


if __name__ == "__main__":
    main()
