"""Task-loss throughput: one batched call vs one call per sample (what the loss did before issue 12), and
the nearest-neighbour backends against each other.

Synthetic network outputs of the lite (or paper) decoder and random ground truth with unequal numbers of
occupied voxels per scene; forward + backward, median over repeats. ``{backend}_first_s`` is the first
call (for ``fused``, its compile), ``{backend}_loss`` the batched loss, which every exact search gives alike,
and ``choice`` the fastest batched backend with the first backend's loss (the GPU's first call trains with it).

    python benchmarks/bench_task_loss.py --config lite --batch 8 [--device cuda] [--backends cdist,fused] \
        [--modes batched] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from training.losses import FUSED_SEARCH, GroundTruth, TaskLoss, TaskLossConfig  # noqa: E402

SAME_LOSS = 1e-4  # relative: every exact search gives the same loss up to float32 rounding of near ties


def make_case(cfg: models.ModelConfig, batch: int, device: torch.device, seed: int = 0):
    """Network-like outputs (requires_grad) and ground truth of 8k-16k voxels per scene."""
    g = torch.Generator().manual_seed(seed)
    q, c = cfg.decoder.num_queries, cfg.num_classes
    layers = [{"points": torch.rand(batch, q, r, 3, generator=g).to(device).requires_grad_(),
               "logits": torch.randn(batch, q, r, c, generator=g).to(device).requires_grad_()}
              for r in cfg.decoder.num_refines]
    outputs = {"init_points": torch.rand(batch, q, 3, generator=g).to(device).requires_grad_(), "layers": layers}
    extent = torch.tensor([n * cfg.voxel_size for n in cfg.grid_shape])
    gts = []
    for _ in range(batch):
        m = int(torch.randint(8000, 16000, (1,), generator=g))
        gts.append(GroundTruth((torch.rand(m, 3, generator=g) * extent).to(device),
                               torch.randint(1, c + 1, (m,), generator=g).to(device)))
    return outputs, gts


def run(loss: TaskLoss, outputs: dict, gts: list[GroundTruth], per_sample: bool, device: torch.device
        ) -> tuple[float, float]:
    """(seconds of one forward + backward, the loss)."""
    start = time.perf_counter()
    if per_sample:
        total = 0.0
        for b in range(len(gts)):
            one = {"init_points": outputs["init_points"][b:b + 1],
                   "layers": [{k: v[b:b + 1] for k, v in layer.items()} for layer in outputs["layers"]]}
            total = total + sum(loss(one, [gts[b]]).values())
    else:
        total = sum(loss(outputs, gts).values())
    total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(total.detach())


def choose(result: dict, backends: list[str]) -> str | None:
    """The fastest batched backend whose loss is the first backend's (and, for ``fused``, that stayed compiled)."""
    timed = [b for b in backends if f"{b}_batched_s" in result and (b != "fused" or result.get("fused_compiled"))]
    if not timed:
        return None
    ref = result[f"{backends[0]}_loss"]
    same = [b for b in timed if abs(result[f"{b}_loss"] - ref) <= SAME_LOSS * abs(ref)]
    return min(same, key=lambda b: result[f"{b}_batched_s"]) if same else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lite")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default=None,
                        help="comma list of cdist,kdtree,fused; default: kdtree on CPU (cdist there is ~30x slower), "
                             "cdist on CUDA")
    parser.add_argument("--modes", nargs="+", default=["batched", "per_sample"], choices=["batched", "per_sample"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = models.load_config(args.config)
    outputs, gts = make_case(cfg, args.batch, device)
    backends = args.backends.split(",") if args.backends else (["kdtree"] if device.type == "cpu" else ["cdist"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {"config": args.config, "batch": args.batch, "device": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "points_per_scene": cfg.decoder.num_queries * (1 + sum(cfg.decoder.num_refines)),
              "gt_per_scene": [int(gt.points.shape[0]) for gt in gts]}
    for backend in backends:
        loss = TaskLoss(TaskLossConfig(nn_backend=backend)).to(device)
        for mode in args.modes:
            per_sample = mode == "per_sample"
            first, value = run(loss, outputs, gts, per_sample, device)  # warm-up (and compile)
            if not per_sample:
                result[f"{backend}_first_s"], result[f"{backend}_loss"] = first, value
            times = [run(loss, outputs, gts, per_sample, device)[0] for _ in range(args.repeats)]
            key = f"{backend}_{mode}_s"
            result[key] = statistics.median(times)
            print(f"{backend:7s} {'per-sample' if per_sample else 'batched':10s} {result[key] * 1e3:8.1f} ms "
                  f"({args.batch / result[key]:.1f} samples/s)", flush=True)
        if backend == "fused":
            result["fused_compiled"] = FUSED_SEARCH.usable  # False: the GEMM search stood in for it
    result["choice"] = choose(result, backends)
    print(f"fastest search with the same loss: {result['choice']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
