"""JPEG decoding at each libjpeg DCT scale, and the entropy-decoding floor under it.

    python benchmarks/bench_jpeg_decode.py [--calls N] [--json F]

The frame path decodes a camera's JPEG at the smallest DCT scale that keeps the network's input sharp
(``msg_decode.jpeg_reduction``: 1/2 for lite's 256x192 from 640x480). The scale shrinks the inverse DCT,
the chroma upsampling and the colour conversion, but every coefficient is still Huffman-decoded. So the
1/8 decode, whose inverse DCT keeps only the DC term, and the greyscale 1/8 decode, which also skips the
chroma's inverse DCT and the colour conversion, bound from above what the entropy decoding alone costs;
no choice of scale or output format skips that part. Each image is decoded ``--calls`` times back
to back on one thread, with OpenCV (``IMREAD_REDUCED_*``, the node's decoder where it is installed) and PIL
(``draft``), rotating through the variants per call so that all see the same machine; medians in ms.

Images: the frame-path benchmark's noisy 640x480 frame (bench_frame_path.camera_rgb) and the sample
dataset's four frames (procedural rooms, smoother), each encoded as the benchmark encodes it (PIL,
quality 90). Written for the CPU target of issue 10 (docs/results/frame_path.md, session 12).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_frame_path as bench  # noqa: E402

from discene_ros import msg_decode  # noqa: E402

SAMPLE_FRAMES = sorted((ROOT / "discene_ros/data/sample_dataset/posed_images").glob("*/*.jpg"))
SCALES = (1, 2, 4, 8)


def encode(rgb: np.ndarray, quality: int = 90) -> bytes:
    """As ``msg_encode.rgb_to_compressed`` encodes a frame."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decoders(data: bytes) -> dict[str, Callable[[], object]]:
    """Each decode of ``data`` as a callable: PIL at every scale, OpenCV at every scale and greyscale 1/8."""
    def pil(scale: int) -> Callable[[], object]:
        def run() -> object:
            with Image.open(io.BytesIO(data)) as img:
                if scale > 1:
                    img.draft("RGB", (img.width // scale, img.height // scale))
                return np.asarray(img.convert("RGB"))
        return run

    variants = {f"pil 1/{s}": pil(s) for s in SCALES}
    cv2 = msg_decode.opencv()
    if cv2 is not None:
        buf = np.frombuffer(data, np.uint8)
        flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}
        for s in SCALES:
            variants[f"opencv 1/{s}"] = lambda f=flags[s]: cv2.imdecode(buf, f | cv2.IMREAD_IGNORE_ORIENTATION)
        variants["opencv grey 1/8"] = lambda: cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_8)
    return variants


def time_variants(variants: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median ms of each variant over ``calls`` rounds, one call of every variant per round."""
    for run in variants.values():  # first calls: imports, decoder set-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(calls):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: round(float(np.median(t)) * 1e3, 4) for name, t in times.items()}


def images() -> dict[str, bytes]:
    """The benchmark's frame and the sample frames, JPEG-encoded as the benchmark does."""
    out = {"benchmark frame (noisy blocks)": encode(bench.camera_rgb())}
    for path in SAMPLE_FRAMES:
        with Image.open(path) as img:
            out[f"sample {path.parent.name}/{path.name}"] = encode(np.asarray(img.convert("RGB")))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="decodes per variant and image")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cv2 = msg_decode.opencv()
    if cv2 is not None:
        cv2.setNumThreads(1)
    rows = []
    for name, data in images().items():
        ms = time_variants(decoders(data), args.calls)
        rows.append({"image": name, "bytes": len(data), "decode_ms": ms})
        print(f"{name}: {len(data) / 1024:.0f} KiB", flush=True)
        for variant, value in ms.items():
            print(f"  {variant:16s} {value:6.3f} ms", flush=True)
    if args.json:
        out = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "opencv": getattr(cv2, "__version__", None), "pillow": Image.__version__,
               "calls": args.calls, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
