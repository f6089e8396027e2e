"""The CPU preprocessing's resize + normalisation: torch's ops against the native kernel's one call, interleaved.

    python benchmarks/bench_resize.py [--rounds N] [--calls N] [--gap-ms MS] [--json F]

What ``TensorPreprocessor`` runs on the CPU for a lite frame (network input 192x256): a 640x480 bgr8 camera
frame, and a JPEG decoded at half size (320x240, what ``msg_decode`` gives for lite), each resized with the
antialiased uint8 bilinear filter and normalised into the network's float32 input. The ways take turns on the
same frame, ``--calls`` calls each per round:
- ``torch``: ``F.interpolate(uint8, antialias=True)`` then ``native_postprocess.normalise_image`` (the path
  before session 26, and the path wherever the kernel is not built);
- ``native x1``: ``native_postprocess.resize_normalise`` (the frame path's since session 26);
- ``native x2``: the same with the helper thread taking half the rows;
and, for the whole preprocessing of a frame (checks, ``grid2img``, resize, normalisation):
- ``frame: tensor``: ``TensorPreprocessor`` on the CPU (what every backend's frames take since session 26);
- ``frame: numpy + PIL``: ``models.preprocess.preprocess``, what the onnxruntime and TensorRT backends' frames
  took before (PIL's resize: other bytes, so these two are timed, not compared).
``--gap-ms``: a pause before each call (``time.sleep``), as between the frame loop's resizes: the kernel's
helper sleeps by then, and waking it is what ``x2`` pays in the loop. Prints each way's median over the rounds
of the per-turn medians and its ratio to ``torch`` in the same rounds, after checking the outputs are equal.
torch runs on one thread, as the frame path's preprocessing does.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_frame_path as bench  # noqa: E402

from export.onnx_export import example_camera  # noqa: E402
from models import load_config, native_postprocess  # noqa: E402
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, TensorPreprocessor, preprocess  # noqa: E402

SIZE_HW = (192, 256)  # lite's network input
ORDER = (2, 1, 0)  # BGR bytes (a bgr8 message, or OpenCV's decode) into RGB planes
SCALE = tuple(float(v) for v in (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).tolist())
SHIFT = tuple(float(v) for v in (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).tolist())


def frames() -> dict[str, np.ndarray]:
    """The benchmark's camera frame (BGR bytes) at full size and at half size (the JPEG row's decode)."""
    bgr = np.ascontiguousarray(bench.camera_rgb()[..., ::-1])
    half = np.ascontiguousarray(bgr.reshape(240, 2, 320, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    return {"bgr8 640x480": bgr, "jpeg 320x240": half}


COMPARED = ("torch", "native x1", "native x2")  # the same floats; the frame ways are timed only


def ways(image: np.ndarray, out: np.ndarray) -> dict:
    """name -> a call that writes the normalised network input for ``image`` into ``out`` (the resize ways), or
    preprocesses the whole frame (the frame ways: ``image`` seen as RGB, as a bgr8 message is)."""
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    config = load_config("lite")
    k, pose = example_camera(config)
    k = k.copy()
    k[:2] *= image.shape[1] / 640  # the calibration of this image size
    rgb_view, tensor_path = image[..., ::-1], TensorPreprocessor(config)

    def torch_ops() -> None:
        y = F.interpolate(x, size=SIZE_HW, mode="bilinear", antialias=True, align_corners=False)
        native_postprocess.normalise_image(y.numpy(), out, ORDER, SCALE, SHIFT)

    return {"torch": torch_ops,
            "native x1": lambda: native_postprocess.resize_normalise(image, out, ORDER, SCALE, SHIFT, 1),
            "native x2": lambda: native_postprocess.resize_normalise(image, out, ORDER, SCALE, SHIFT, 2),
            "frame: tensor": lambda: tensor_path(rgb_view, k, pose),
            "frame: numpy + PIL": lambda: preprocess(rgb_view, k, pose, config)}


def check_equal(image: np.ndarray) -> None:
    """Every way writes the same floats (SystemExit otherwise)."""
    outputs = {}
    for name, call in ways(image, out := np.empty((1, 3, *SIZE_HW), np.float32)).items():
        if name in COMPARED:
            call()
            outputs[name] = out.copy()
    for name, got in outputs.items():
        if not np.array_equal(got.view(np.uint32), outputs["torch"].view(np.uint32)):
            raise SystemExit(f"{name} differs from torch's resize and normalisation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=60, help="calls per way and round")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="sleep before each call (the helper sleeps)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not native_postprocess.available():
        print(f"native kernel unavailable: {native_postprocess.unavailable_reason()}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows = []
    for label, image in frames().items():
        check_equal(image)
        out = np.empty((1, 3, *SIZE_HW), np.float32)
        calls = ways(image, out)
        medians: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                call()  # warm
                times = []
                for _ in range(args.calls):
                    if args.gap_ms:
                        time.sleep(args.gap_ms / 1e3)
                    t0 = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t0) * 1e3)
                medians[name].append(float(np.median(times)))
        base = np.array(medians["torch"])
        for name, values in medians.items():
            ratio = float(np.median(np.array(values) / base))
            rows.append({"input": label, "way": name, "median_ms": float(np.median(values)),
                         "ratio_to_torch": ratio})
            print(f"{label:13s} {name:18s} median {np.median(values):.3f} ms  {ratio:.2f}x torch's", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "torch": torch.__version__, "gap_ms": args.gap_ms, "rounds": args.rounds,
                                         "calls": args.calls, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
