"""Semantic scene completion metrics of Occ-ScanNet (the SSCMetrics protocol of ISO / EmbodiedOcc / DiScene).

Protocol, number for number with the public SSCMetrics:
- voxels whose ground truth is 255 are excluded; no frustum or visibility mask;
- TP/FP/FN are accumulated over the whole dataset (never averaged per frame);
- completion (geometric) IoU treats every label > 0 as occupied: precision = TP/(TP+FP),
  recall = TP/(TP+FN), IoU = TP/(TP+FP+FN), all three 0 when TP = 0 (no epsilon);
- per-class IoU_c = TP_c/(TP_c+FP_c+FN_c+1e-5) for c = 0..11 (0 = empty), and
  mIoU = mean of IoU_1..IoU_11, classes absent from both prediction and ground truth counting as 0.
Predicted labels outside 0..num_classes-1 count as occupied for completion and as no class for the
semantic scores, as in the public code. Everything is one confusion matrix filled with ``np.bincount``.
"""
from __future__ import annotations

import numpy as np

from models.classes import CLASS_NAMES

UNKNOWN = 255
EPS = 1e-5


class SSCMetrics:
    """Accumulates a (C, C+1) confusion matrix (gt x pred; the last column = out-of-range predictions)."""

    def __init__(self, num_classes: int = 12) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (empty + classes), got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def add_batch(self, pred, gt) -> None:
        """Add predictions and ground truth, (B,X,Y,Z) or (X,Y,Z) raw labels (numpy or CPU tensors)."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        if pred.ndim not in (3, 4):
            raise ValueError(f"expected (B,X,Y,Z) or (X,Y,Z) label grids, got shape {pred.shape}")
        gt = gt.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        keep = gt != UNKNOWN
        gt, pred = gt[keep], pred[keep]
        bad = (gt < 0) | (gt >= self.num_classes)
        if bad.any():
            raise ValueError(f"ground truth has labels {np.unique(gt[bad])[:5].tolist()} outside "
                             f"0..{self.num_classes - 1} and {UNKNOWN}")
        if pred.size and pred.min() < 0:
            raise ValueError(f"predictions must be labels >= 0, got {int(pred.min())}")
        c = self.num_classes
        pred = np.where(pred < c, pred, c)
        self.confusion += np.bincount(gt * (c + 1) + pred, minlength=c * (c + 1)).reshape(c, c + 1)

    def merge(self, other: SSCMetrics) -> None:
        """Add another accumulator's counts (e.g. from other processes)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge metrics with {other.num_classes} and {self.num_classes} classes")
        self.confusion += other.confusion

    def counts(self) -> dict[str, np.ndarray]:
        """Per-class tp, fp, fn (C,) and completion tp, fp, fn (scalars)."""
        conf, c = self.confusion, self.num_classes
        tp = np.diag(conf[:, :c]).copy()
        fp = conf[:, :c].sum(axis=0) - tp
        fn = conf.sum(axis=1) - tp
        return {"tp": tp, "fp": fp, "fn": fn, "completion_tp": conf[1:, 1:].sum(),
                "completion_fp": conf[0, 1:].sum(), "completion_fn": conf[1:, 0].sum()}

    def compute(self) -> dict:
        """iou, precision, recall (completion), miou, per_class_iou (C values, index 0 = empty)."""
        k = self.counts()
        tp, fp, fn = int(k["completion_tp"]), int(k["completion_fp"]), int(k["completion_fn"])
        if tp != 0:
            precision, recall, iou = tp / (tp + fp), tp / (tp + fn), tp / (tp + fp + fn)
        else:
            precision = recall = iou = 0.0
        per_class = k["tp"] / (k["tp"] + k["fp"] + k["fn"] + EPS)
        return {"iou": float(iou), "miou": float(np.mean(per_class[1:])), "per_class_iou": per_class.tolist(),
                "precision": float(precision), "recall": float(recall)}


def format_table(results: dict, class_names: tuple[str, ...] = CLASS_NAMES) -> str:
    """Per-class IoU table in percent (as in papers), with IoU / mIoU / precision / recall."""
    per_class = results["per_class_iou"]
    names = list(class_names)[: len(per_class)] + [f"class{i}" for i in range(len(class_names), len(per_class))]
    width = max(len(n) for n in names + ["precision"]) + 2
    lines = [f"{'metric':<{width}}{'%':>8}", "-" * (width + 8)]
    for key in ("iou", "miou", "precision", "recall"):
        lines.append(f"{key:<{width}}{100 * results[key]:>8.2f}")
    lines.append("-" * (width + 8))
    for name, value in zip(names, per_class, strict=True):
        lines.append(f"{name:<{width}}{100 * value:>8.2f}")
    return "\n".join(lines)


def print_table(results: dict, class_names: tuple[str, ...] = CLASS_NAMES) -> None:
    print(format_table(results, class_names))
