"""FP16 (or TF32) against FP32 on trained weights, over a dataset split: voxel-label agreement and IoU (issue 10).

    python benchmarks/fp16_agreement.py --checkpoint discene_ros/data/lite_distilled.pt \\
        --data runs/synth_lite --split val --device cuda [--compare fp16 tf32 ...] [--onnx] --json F [--append]

Compares, through the node's post-processing (``export.fp16.compare_backends``):
- ``torch_autocast`` (``--compare fp16``, the default): the torch backend's FP16 autocast against its
  FP32 (TF32 off), both as CUDA graphs (CUDA only);
- ``torch_tf32``, ``torch_tf32_convolutions``, ``torch_cudnn_benchmark``, ``torch_tf32_cudnn_benchmark``
  (``--compare tf32`` ...):
  the torch backend with those options against its IEEE FP32, both as CUDA graphs (CUDA only;
  ``export.fp16.TORCH_VARIANTS``);
- ``cuda_graph_vs_eager``: the FP32 CUDA-graph replay against eager FP32 on the same device (they
  must agree exactly up to kernel choice);
- ``onnx_fp16`` (``--onnx``): the FP16 ONNX companion that ``discene-export --fp16`` writes, on
  onnxruntime's CPU provider, against eager FP32 torch on the CPU (``--onnx-frames`` frames).
Each row also gives SSC IoU / mIoU of both runs against the split's ground truth, so a precision
change that moves the metric shows up next to the label agreement.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.backends.torch_backend import TorchBackend  # noqa: E402
from export.fp16 import TORCH_VARIANTS, compare_backends, fp16_onnx_agreement, torch_variant_agreement  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.preprocess import NetworkInputs  # noqa: E402
from training.metrics import SSCMetrics  # noqa: E402
from training.occscannet import OccScanNetDataset  # noqa: E402


def split_frames(root: str, split: str, config: ModelConfig, max_frames: int | None) -> tuple[list[NetworkInputs], list]:
    """Network inputs and ground-truth label grids of the first ``max_frames`` frames of a split."""
    ds = OccScanNetDataset(root, split, config=config, load_depth=config.use_depth, max_samples=max_frames)
    frames, targets = [], []
    for i in range(len(ds)):
        s = ds[i]
        frames.append(NetworkInputs(image=s["image"][None].numpy(), grid2img=s["grid2img"][None].numpy(),
                                  depth=s["depth"][None].numpy() if config.use_depth else None,
                                  voxel_origin=s["voxel_origin"].numpy()))
        targets.append(s["target"].numpy())
    return frames, targets


def metrics(labels: list, targets: list, num_classes: int) -> dict[str, float]:
    m = SSCMetrics(num_classes=num_classes + 1)
    for pred, gt in zip(labels, targets, strict=True):
        m.add_batch(pred, gt)
    r = m.compute()
    return {"iou": round(100 * float(r["iou"]), 2), "miou": round(100 * float(r["miou"]), 2)}


def with_metrics(result: dict[str, Any], pairs: list, targets: list, config: ModelConfig) -> dict[str, Any]:
    ref = metrics([p[0] for p in pairs], targets[:len(pairs)], config.num_classes)
    got = metrics([p[1] for p in pairs], targets[:len(pairs)], config.num_classes)
    return {**result, "gt_metrics_reference": ref, "gt_metrics_other": got}


def guarded(out: dict[str, Any], name: str, row: Any) -> None:
    """One comparison into ``out["rows"][name]``; a failure is recorded there and does not lose the others."""
    t0 = time.perf_counter()
    try:
        out["rows"][name] = {**row(), "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as exc:  # noqa: BLE001 - a benchmark row, reported in the JSON and on stderr
        traceback.print_exc()
        out["rows"][name] = {"error": f"{type(exc).__name__}: {exc}"}


def variant_row(model: Any, cfg: ModelConfig, frames: list, targets: list, source: str,
                variant: str) -> dict[str, Any]:
    pairs: list = []
    row = torch_variant_agreement(model, cfg, frames, source, variant, labels_out=pairs)
    return with_metrics(row, pairs, targets, cfg)


def graph_row(model: Any, cfg: ModelConfig, frames: list) -> dict[str, Any]:
    eager = TorchBackend(model, cfg, device="cuda")
    graph = TorchBackend(model, cfg, device="cuda", cuda_graph=True)
    try:
        row = compare_backends(eager, graph, cfg, frames)
    finally:
        eager.close()
        graph.close()
    return {**row, "reference": "torch eager cuda float32", "runtime": "torch CUDA graph cuda float32"}


def onnx_row(args: argparse.Namespace, model: Any, cfg: ModelConfig, frames: list, targets: list,
             source: str) -> dict[str, Any]:
    from export.onnx_export import export_onnx

    n = min(args.onnx_frames, len(frames))
    pairs: list = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{cfg.name}.onnx"
        export_onnx(None, path, checkpoint=args.checkpoint, fp16=True, parity=False)
        row = fp16_onnx_agreement(path.with_name(path.stem + ".fp16.onnx"), model.to("cpu"), cfg, frames[:n],
                                  f"{source}, first {n}", labels_out=pairs)
    return with_metrics(row, pairs, targets, cfg)


def row_name(variant: str) -> str:
    """JSON row of a ``--compare`` variant (``torch_autocast`` for fp16, as in the earlier results)."""
    return "torch_autocast" if variant == "fp16" else f"torch_{variant}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, cfg = load_model(args.checkpoint, map_location="cpu")
    if args.score_threshold is not None:
        cfg.score_threshold = args.score_threshold
    if args.closing != "model":
        cfg.closing = args.closing == "on"
    frames, targets = split_frames(args.data, args.split, cfg, args.max_frames)
    source = f"{args.data} split {args.split} ({len(frames)} frames)"
    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "config": cfg.name, "frames": len(frames),
                           "data": source, "torch": torch.__version__, "rows": {}}
    if args.device == "cuda":
        out["device"] = torch.cuda.get_device_name()
        for variant in args.compare:
            guarded(out, row_name(variant), lambda v=variant: variant_row(model, cfg, frames, targets, source, v))
        guarded(out, "cuda_graph_vs_eager", lambda: graph_row(model, cfg, frames))
    if args.onnx:
        guarded(out, "onnx_fp16", lambda: onnx_row(args, model, cfg, frames, targets, source))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="Occ-ScanNet-format root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"],
                        help="cuda: torch rows (--compare); cpu: only --onnx (torch FP16/TF32 run on CUDA only)")
    parser.add_argument("--compare", nargs="+", default=None, choices=sorted(TORCH_VARIANTS),
                        help="torch variants against IEEE FP32 on CUDA (default fp16)")
    parser.add_argument("--onnx", action="store_true", help="also the FP16 ONNX on onnxruntime CPU")
    parser.add_argument("--onnx-frames", type=int, default=16)
    parser.add_argument("--score-threshold", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--closing", choices=["on", "off", "model"], default="on",
                        help="post-processing closing: on (the node's default), off, or as the checkpoint says")
    parser.add_argument("--json", default=None)
    parser.add_argument("--append", action="store_true", help="add to a list of results in --json")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.compare:
        parser.error(f"--compare {' '.join(args.compare)} needs --device cuda: FP16 autocast, TF32 and "
                     f"cudnn.benchmark are CUDA modes of the torch backend (on the CPU: --onnx only)")
    args.compare = args.compare or ["fp16"]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no usable CUDA", file=sys.stderr)
        return 2
    result = run(args)
    for name, row in result["rows"].items():
        if "error" in row:
            print(f"{result['config']} {name}: FAILED {row['error']}", flush=True)
            continue
        gt = (f"  IoU/mIoU fp32 {row['gt_metrics_reference']['iou']}/{row['gt_metrics_reference']['miou']} "
              f"other {row['gt_metrics_other']['iou']}/{row['gt_metrics_other']['miou']}"
              if "gt_metrics_reference" in row else "")
        print(f"{result['config']} {name}: all-voxel {100 * row['label_agreement']:.3f} %  occupied "
              f"{100 * row['occupied_label_agreement']:.2f} %  IoU {100 * row['occupancy_iou']:.2f} %  occupied "
              f"fp32 {row['occupied_voxels_fp32']} other {row['occupied_voxels_other']}  max point diff "
              f"{row['max_abs_diff_points']:.4f}{gt}", flush=True)
    if args.json:
        path = Path(args.json)
        results = json.loads(path.read_text()) if args.append and path.is_file() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([*results, result], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
