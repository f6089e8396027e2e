"""``discene-eval``: evaluate a checkpoint on an Occ-ScanNet-format split with SSCMetrics (IoU, mIoU)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from models.checkpoint import atomic_write, check_output_file, load_model
from models.classes import CLASS_NAMES
from models.config import ModelConfig
from models.device import resolve_device
from models.postprocess import labels_batch

from .data import build_dataset, collate_frames, prepare_inputs, worker_context
from .distributed import autocast_dtype
from .interrupt import worker_init_for_this_process
from .metrics import SSCMetrics
from .occscannet import BadSampleError, OccScanNetDataset
from .scene_format import SPLIT_FILES

SKIPPED_SHOWN = 20  # bad frames (unreadable, or a wrong pose, K, grid...) named in the result (all are counted)


class ScoredFrames(Dataset):
    """Every frame of a split once, for scoring as the reference's test phase reads them: a frame with no
    occupied voxel is scored (it can only add false positives), and a bad one (BadSampleError: unreadable, or
    its pose, K or grid is wrong) comes back as ``{"bad": reason}`` to be counted, never replaced by the next
    frame (which would score that one twice)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(self.dataset, OccScanNetDataset):
            return self.dataset[index]
        sample_id = self.dataset.ids[index]
        try:
            return self.dataset.load(sample_id, allow_empty=True)
        except BadSampleError as exc:
            return {"bad": str(exc), "sample_id": sample_id}


def check_scorable(dataset: Dataset) -> None:
    """ValueError unless at least one frame of ``dataset`` can be scored: a run checks its val split before
    training, not at its first evaluation (reads frames until one is good, usually the first)."""
    frames, first = ScoredFrames(dataset), None
    for index in range(len(frames)):
        item = frames[index]
        if "bad" not in item:
            return
        first = first or item["bad"]
    raise ValueError(f"no validation frame can be scored: {_none_scorable(len(frames), first)}")


def _none_scorable(bad: int, first: str | None) -> str:
    """Why a split gave no frame to score: ``bad`` frames, ``first``'s reason (what is wrong); none at all."""
    return f"all {bad} frames are bad; first: {first}" if bad else "the split is empty"


def collate_scored(items: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the batch of the good frames, or None; the bad ones, with their reasons)."""
    good = [item for item in items if "bad" not in item]
    return (collate_frames(good) if good else None), [item for item in items if "bad" in item]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: Dataset, model_cfg: ModelConfig, device: torch.device | str = "cpu",
                   batch_size: int = 1, workers: int = 0, amp: str = "none") -> dict[str, Any]:
    """Run the model on every frame, post-process the last layer to label grids, accumulate SSCMetrics.

    Returns SSCMetrics.compute() plus ``frames`` (scored), ``skipped_frames`` (bad frames not scored: unreadable,
    or a wrong pose, K or grid; the first SKIPPED_SHOWN in ``skipped``, id -> reason) and ``seconds``. The model's train/eval mode is restored.
    Autocast only on CUDA (``amp``); CPU evaluation stays fp32.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    metrics = SSCMetrics(num_classes=model_cfg.num_classes + 1)
    loader = DataLoader(ScoredFrames(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_scored,  # Ctrl-C: the trainer's; a killed trainer ends them
                        worker_init_fn=worker_init_for_this_process(),
                        multiprocessing_context=worker_context() if workers > 0 else None)
    dtype = autocast_dtype(amp, device)
    frames, skipped, start = 0, [], time.perf_counter()
    try:
        for batch, bad in loader:
            skipped += bad
            if batch is None:
                continue
            inputs = prepare_inputs(batch, device, model_cfg.use_depth)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                out = model(inputs["image"], inputs["grid2img"], inputs["depth"])
            last = out["layers"][-1]
            labels = labels_batch(last["points"].float(), last["logits"].float().sigmoid(), model_cfg)
            metrics.add_batch(labels.cpu().numpy(), inputs["target"].cpu().numpy())
            frames += labels.shape[0]
    finally:
        model.train(was_training)
    if frames == 0:
        first = skipped[0]["bad"] if skipped else None
        raise ValueError(f"no frame could be scored: {_none_scorable(len(skipped), first)}")
    result = dict(metrics.compute())
    result.update(frames=frames, skipped_frames=len(skipped), seconds=time.perf_counter() - start,
                  skipped={item["sample_id"]: item["bad"] for item in skipped[:SKIPPED_SHOWN]})
    return result


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discene-eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (final.pt, best.pt, last.pt)")
    parser.add_argument("--data", required=True, help="Occ-ScanNet-format dataset root")
    parser.add_argument("--split", default="val",
                        help="split to evaluate: 'train', 'val' (list files under the root) or a list-file path")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="evaluate only the first N frames of the split (N >= 1; default: all)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="occupancy score threshold (default: the checkpoint config's); short runs whose scores "
                             "stay below the default need a lower one, as in discene-replay")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda[:N] or auto (CUDA when present)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--json", default=None,
                        help="write the metrics to this JSON file (its folder is created when missing)")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        try:
            device = resolve_device(args.device)
        except (RuntimeError, ValueError) as exc:  # RuntimeError: torch's for a malformed device string
            raise ValueError(f"--device: {exc}") from exc
        model, cfg = load_model(args.checkpoint, map_location="cpu")
        if args.score_threshold is not None:
            if not 0.0 <= args.score_threshold < 1.0:
                raise ValueError(f"--score-threshold must be in [0, 1), got {args.score_threshold}")
            cfg.score_threshold = float(args.score_threshold)
        dataset = build_dataset(args.data, args.split, cfg, args.max_frames)
        result = evaluate_model(model.to(device), dataset, cfg, device, args.batch_size, args.workers, args.amp)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"discene-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint} on {args.data} [{args.split}], {result['frames']} frames: "
          f"IoU {100 * result['iou']:.2f}  mIoU {100 * result['miou']:.2f}")
    if result["skipped_frames"]:
        first_id, reason = next(iter(result["skipped"].items()))
        print(f"  {result['skipped_frames']} bad frames not scored; first: {first_id}: {reason}", file=sys.stderr)
    per_class = result.get("per_class_iou")
    if per_class is not None:
        print("  " + "  ".join(f"{n} {100 * float(v):.1f}" for n, v in zip(CLASS_NAMES[1:], list(per_class)[1:], strict=False)))
    if args.json:
        text = json.dumps(_jsonable(result), indent=1) + "\n"
        try:
            atomic_write(args.json, lambda f: f.write(text.encode()))
        except OSError as exc:  # a full disk: the checks above ran before the evaluation
            print(f"discene-eval: error: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError for arguments that would fail or mislead only after the evaluation: ``--max-frames``
    below 1, and a ``--json`` path that cannot be written or is one of the inputs."""
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be at least 1 (leave it out to evaluate all frames), got {args.max_frames}")
    if args.json:
        split_list = Path(args.data) / SPLIT_FILES[args.split] if args.split in SPLIT_FILES else Path(args.split)
        check_output_file(args.json, "--json", {"--checkpoint": args.checkpoint, "--split": split_list})


if __name__ == "__main__":
    sys.exit(main())
