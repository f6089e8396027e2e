"""Device check: run the torch, cuda-python and pycuda providers of export/cuda_mem.py on a real GPU.

For each installed provider: ``gpu_info``, allocations of the lite network's IO tensors, exact
host -> device -> host round trips with the blocking-sync ``wait`` between upload and download, as the
TensorRT backend waits for its engine (also from a worker thread, as the ROS node does), the refusal of
a wrong-shaped upload before any copy, ``close`` freeing everything, and the H2D/D2H copy rate of
the image tensor. TensorRT itself is not exercised (not installable on the device machines).
Without CUDA every provider is reported as skipped and the exit code is 0.

    python benchmarks/check_cuda_providers.py [--providers torch cuda-python pycuda] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.cuda_mem import create_device_memory  # noqa: E402

SHAPES = {"image": ((1, 3, 192, 256), np.float32), "grid2img": ((1, 4, 4), np.float32),
          "scores": ((1, 64, 4, 11), np.float32), "labels": ((1000,), np.int32)}


def _roundtrip(mem, bufs, rng) -> None:
    for name, buf in bufs.items():
        host = (rng.standard_normal(buf.shape) * 100).astype(buf.dtype)
        mem.upload(buf, host)
        mem.wait()
        back = mem.download(buf)
        if not np.array_equal(back, host):
            raise AssertionError(f"{name}: device round trip changed the data")


def check_provider(name: str, repeats: int = 50) -> dict:
    """One provider end to end; returns a result dict (status ok / skipped / failed)."""
    try:
        mem = create_device_memory(name)
    except ImportError as exc:
        return {"provider": name, "status": "skipped", "reason": str(exc)}
    result = {"provider": name, "status": "failed"}
    try:
        result["gpu"] = mem.gpu_info()
        result["stream_handle_is_int"] = isinstance(mem.stream_handle(), int)
        bufs = {n: mem.alloc(shape, dtype) for n, (shape, dtype) in SHAPES.items()}
        result["pointers_distinct"] = len({b.ptr for b in bufs.values()}) == len(bufs)
        _roundtrip(mem, bufs, np.random.default_rng(0))
        errors = []
        worker = threading.Thread(target=lambda: _safe(errors, _roundtrip, mem, bufs, np.random.default_rng(1)))
        worker.start()
        worker.join()
        result["worker_thread_roundtrip"] = "ok" if not errors else repr(errors[0])
        try:
            mem.upload(bufs["image"], np.zeros((1, 3, 96, 128), np.float32))
            result["wrong_shape_refused"] = False
        except ValueError:
            result["wrong_shape_refused"] = True
        image = np.ones(SHAPES["image"][0], np.float32)
        mem.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            mem.upload(bufs["image"], image)
            mem.download(bufs["image"])
        dt = time.perf_counter() - t0
        result["h2d_d2h_image_ms"] = round(dt / repeats * 1e3, 4)
        result["h2d_d2h_image_GBps"] = round(2 * image.nbytes * repeats / dt / 1e9, 3)
        ok = (result["stream_handle_is_int"] and result["pointers_distinct"] and result["wrong_shape_refused"]
              and result["worker_thread_roundtrip"] == "ok")
        result["status"] = "ok" if ok else "failed"
    except Exception as exc:  # noqa: BLE001 - reported in the result, the other providers still run
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        mem.close()
    return result


def _safe(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - handed to the main thread
        errors.append(exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", nargs="+", default=["torch", "cuda-python", "pycuda"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    results = [check_provider(name, args.repeats) for name in args.providers]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
