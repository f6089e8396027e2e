"""Same frames through every available backend: median / p95 latency, FPS and speed-up over torch eager.

    python benchmarks/bench_backends.py                                # CPU: lite and paper_student
    python benchmarks/bench_backends.py --device cuda --fp16           # GPU: + torch FP16, ORT GPU, TensorRT

Times ``Backend.infer`` (host arrays in, host arrays out, i.e. including copies), after warm-up, calls
interleaved round-robin across backends (fair on a shared machine), on
seeded realistic frames (``export.onnx_export.example_frame``). Weights are random unless
``--checkpoint`` is given: speed does not depend on them. Ratio = torch-eager median / backend median.
On the CPU, onnxruntime runs two exports: GridSample ops, and the gather form of the same sampling
(``--ort-sampling``), which its CPU provider runs faster. On a shared, oversubscribed CPU set
OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads otherwise spin at barriers and torch eager becomes
10-20x slower (measured here on 2 cores with other jobs running), which is not what it costs on a robot.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.backends import create_backend  # noqa: E402
from export.backends.torch_backend import TorchBackend  # noqa: E402
from export.onnx_export import example_frame, export_onnx, load_for_export  # noqa: E402


def time_interleaved(backends: dict, frames, warmup: int, iters: int) -> dict[str, np.ndarray]:
    """Per-call latencies (ms) of every backend, calls interleaved round-robin so that load changes on a
    shared machine hit all backends alike."""
    for backend in backends.values():
        for i in range(warmup):
            backend.infer(frames[i % len(frames)])
    times: dict[str, list[float]] = {label: [] for label in backends}
    for i in range(iters):
        for label, backend in backends.items():
            t0 = time.perf_counter()
            backend.infer(frames[i % len(frames)])
            times[label].append((time.perf_counter() - t0) * 1e3)
    return {label: np.array(t) for label, t in times.items()}


def candidate_backends(config, model, onnx_path: Path, device: str, fp16: bool, ort_paths: dict | None = None):
    """(label, factory) for every backend that can run here; ``ort_paths``: CPU ORT graphs by sampling form."""
    out = [(f"torch eager {device} fp32", lambda: TorchBackend(model, config, device=device))]
    if device == "cuda":
        out.append((f"torch eager {device} tf32", lambda: TorchBackend(model, config, device=device, tf32=True)))
    if device == "cuda" and fp16:
        out.append((f"torch eager {device} fp16 (autocast)", lambda: TorchBackend(model, config, device=device, fp16=True)))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        avail = ort.get_available_providers()
        if device == "cpu":
            for sampling, path in (ort_paths or {"grid_sample": onnx_path}).items():
                out.append((f"onnxruntime CPU EP fp32 ({sampling})",
                            lambda path=path: create_backend("onnxruntime", path, config, providers=["cpu"])))
        else:
            for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
                if p in avail:
                    out.append((f"onnxruntime {p}", lambda p=p: create_backend("onnxruntime", onnx_path, config,
                                                                                providers=[p], fp16=fp16)))
    if device == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        out.append((f"tensorrt {'fp16' if fp16 else 'fp32'}",
                    lambda: create_backend("tensorrt", onnx_path, config, fp16=fp16)))
    return out


def bench_config(name: str, args, workdir: Path) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, config = load_for_export(name, args.checkpoint)
    onnx_path = workdir / f"{config.name}.onnx"
    ort_paths = {}
    if any(b != "torch" for b in args.backends):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(config, onnx_path, checkpoint=args.checkpoint, parity=False)
            for sampling in args.ort_sampling:
                ort_paths[sampling] = onnx_path if sampling == "grid_sample" else \
                    workdir / f"{config.name}.{sampling}.onnx"
                if sampling != "grid_sample":
                    export_onnx(config, ort_paths[sampling], checkpoint=args.checkpoint, parity=False,
                                sampling=sampling)
    frames = [example_frame(config, seed=s) for s in range(args.frames)]
    iters = args.iters if name == "lite" else args.iters_large
    backends = {}
    for label, factory in candidate_backends(config, model, onnx_path, args.device, args.fp16, ort_paths):
        if label.split()[0] not in args.backends:
            continue
        try:
            backends[label] = factory()
        except Exception as exc:  # report and go on: one missing backend must not stop the table
            print(f"  skip {label}: {exc}", file=sys.stderr)
    times = time_interleaved(backends, frames, args.warmup, iters)
    rows = []
    for label, t in times.items():
        backends[label].close()
        rows.append({"config": config.name, "backend": label, "median_ms": float(np.median(t)),
                     "p95_ms": float(np.percentile(t, 95)), "fps": 1e3 / float(np.median(t)), "iters": iters})
        print(f"  {config.name:14s} {label:40s} median {rows[-1]['median_ms']:9.1f} ms", file=sys.stderr)
    base = next((r["median_ms"] for r in rows if r["backend"].startswith("torch eager") and "fp32" in r["backend"]), None)
    for r in rows:
        r["speedup_vs_torch"] = base / r["median_ms"] if base else float("nan")
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| config | backend | median ms | p95 ms | FPS | x torch eager |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['backend']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['fps']:.2f} | {r['speedup_vs_torch']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["lite", "paper_student"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--fp16", action="store_true", help="add FP16 variants (CUDA only)")
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--checkpoint", help="checkpoint for every config (default: random weights)")
    p.add_argument("--frames", type=int, default=4, help="distinct frames cycled through")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=30, help="timed calls for lite")
    p.add_argument("--iters-large", type=int, default=10, help="timed calls for the other configs")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--ort-sampling", nargs="+", default=["grid_sample", "gather"], choices=["grid_sample", "gather"],
                   help="ONNX graphs for onnxruntime on the CPU: GridSample ops and/or the gather form")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--workdir", help="where the ONNX/engine files go (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch has no CUDA device")
    if args.fp16 and args.device != "cuda":
        p.error("--fp16 needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.configs:
            rows += bench_config(name, args, workdir)
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(markdown(rows, f"### Backend latency on {dev} (torch {torch.__version__})"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
