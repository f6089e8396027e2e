"""Task loss of the sparse occupancy decoder (paper eq. 2, DESIGN.md section 3).

Every decoder layer is supervised by a two-sided weighted Chamfer loss (SmoothL1) between its
predicted points and the occupied ground-truth voxel centres, plus a sigmoid focal loss where each
predicted point takes the label of its nearest ground-truth voxel. The initial points get the
Chamfer loss too. All distances are in metres (grid-local: ``normalised * grid extent``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.classes import NUM_CLASSES, UNKNOWN_LABEL
from models.geometry import GRID_EXTENT, GRID_SHAPE, VOXEL_SIZE

# Largest number of float32 distances one cdist chunk may hold (64 MiB); keeps memory bounded at
# 15,360 points x tens of thousands of ground-truth voxels.
MAX_CDIST_ELEMENTS = 16 * 1024 * 1024


@dataclass
class TaskLossConfig:
    """Weights of the task loss; defaults are the public OPUS/DiScene values."""

    chamfer_weight: float = 0.5
    chamfer_beta: float = 0.04          # metres, SmoothL1 beta
    focal_weight: float = 2.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    far_threshold: float = 0.04         # metres: GT voxels whose nearest prediction is farther get x far_weight
    far_weight: float = 5.0
    rare_min_weight: float = 10.0       # GT-side weight floor for rare classes
    rare_class_share: float = 0.02      # a class is rare below this share of occupied voxels
    max_distance_weight: float = 1.5    # distance weight grows from 1 (grid centre) to this (corner)
    init_points_weight: float = 1.0     # Chamfer on the initial points, relative to the layer loss
    nn_backend: str = "auto"            # nearest neighbours: "cdist" (chunked torch.cdist), "kdtree" (scipy,
                                        # CPU tensors only) or "auto" (kdtree on CPU, cdist on GPU); both exact
    class_frequencies: list[float] | None = None  # voxel counts of classes 1..C; None: uniform weights


@dataclass
class GroundTruth:
    """Occupied voxels of one scene: centres in metres (M,3) and labels 1..C (M,)."""

    points: torch.Tensor
    labels: torch.Tensor


def class_weights_from_frequencies(frequencies: Sequence[float]) -> torch.Tensor:
    """OPUS class weights ``(1/ln(freq) - 0.05) * 400`` from voxel counts of classes 1..C.

    ``freq`` are raw voxel counts (not shares). Classes never seen (count <= 1) get the largest
    weight of the seen classes; weights are floored at 1 so a huge count never gives a negative weight.
    """
    freq = np.asarray(frequencies, dtype=np.float64)
    if freq.ndim != 1 or freq.size == 0 or np.any(~np.isfinite(freq)) or np.any(freq < 0):
        raise ValueError(f"class frequencies must be a non-empty list of non-negative counts, got {frequencies}")
    seen = freq > 1.0
    weights = np.ones_like(freq)
    if seen.any():
        weights[seen] = (1.0 / np.log(freq[seen]) - 0.05) * 400.0
        weights[~seen] = weights[seen].max()
    return torch.as_tensor(np.maximum(weights, 1.0), dtype=torch.float32)


def rare_class_mask(frequencies: Sequence[float] | None, share: float, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Boolean (C,) mask of classes whose share of occupied voxels is below ``share``."""
    if frequencies is None:
        return torch.zeros(num_classes, dtype=torch.bool)
    freq = torch.as_tensor(list(frequencies), dtype=torch.float64)
    total = freq.sum().clamp(min=1.0)
    return (freq / total) < share


def ground_truth_from_voxels(target: torch.Tensor, voxel_size: float = VOXEL_SIZE,
                             num_classes: int = NUM_CLASSES) -> list[GroundTruth]:
    """Per-sample occupied voxel centres (metres, grid-local) and labels from (B,X,Y,Z) label grids.

    Occupied = labels 1..C; 0 (empty) and 255 (unknown) are left out. Scenes may have no occupied voxel.
    """
    if target.dim() == 3:
        target = target.unsqueeze(0)
    if target.dim() != 4:
        raise ValueError(f"target must be (B,X,Y,Z) or (X,Y,Z) labels, got shape {tuple(target.shape)}")
    out = []
    for grid in target:
        grid = grid.long()
        bad = (grid > num_classes) & (grid != UNKNOWN_LABEL)
        if bad.any():
            raise ValueError(f"target holds labels {grid[bad].unique().tolist()}: expected 0..{num_classes} or 255")
        occupied = (grid > 0) & (grid != UNKNOWN_LABEL)
        idx = occupied.nonzero()  # (M, 3)
        points = (idx.float() + 0.5) * voxel_size
        out.append(GroundTruth(points=points, labels=grid[occupied]))
    return out


@torch.no_grad()
def nearest_neighbours(src: torch.Tensor, dst: torch.Tensor, max_elements: int = MAX_CDIST_ELEMENTS
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest neighbours both ways between src (N,3) and dst (M,3), from one chunked ``torch.cdist`` pass.

    Returns (src->dst distance (N,), index (N,), dst->src distance (M,), index (M,)); at most
    ``max_elements`` distances exist at once. Both sets must be non-empty.
    """
    if src.shape[0] == 0 or dst.shape[0] == 0:
        raise ValueError(f"nearest_neighbours needs non-empty sets, got {src.shape[0]} and {dst.shape[0]} points")
    src, dst = src.detach().float(), dst.detach().float()
    rows = max(1, max_elements // dst.shape[0])
    s_dist, s_idx = [], []
    d_dist = dst.new_full((dst.shape[0],), float("inf"))
    d_idx = torch.zeros(dst.shape[0], dtype=torch.long, device=dst.device)
    for start in range(0, src.shape[0], rows):
        d = torch.cdist(src[start:start + rows], dst)  # (rows, M)
        best, arg = d.min(dim=1)
        s_dist.append(best)
        s_idx.append(arg)
        col_best, col_arg = d.min(dim=0)
        better = col_best < d_dist
        d_dist = torch.where(better, col_best, d_dist)
        d_idx = torch.where(better, col_arg + start, d_idx)
    return torch.cat(s_dist), torch.cat(s_idx), d_dist, d_idx


@torch.no_grad()
def nearest_neighbours_kdtree(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same result as ``nearest_neighbours`` from two scipy KD-trees: about 10x faster on CPU tensors."""
    from scipy.spatial import cKDTree

    if src.shape[0] == 0 or dst.shape[0] == 0:
        raise ValueError(f"nearest_neighbours needs non-empty sets, got {src.shape[0]} and {dst.shape[0]} points")
    a, b = src.detach().float().cpu().numpy(), dst.detach().float().cpu().numpy()
    s_dist, s_idx = cKDTree(b).query(a)
    d_dist, d_idx = cKDTree(a).query(b)

    def t(x, dtype):
        return torch.as_tensor(x, dtype=dtype, device=src.device)
    return t(s_dist, torch.float32), t(s_idx, torch.long), t(d_dist, torch.float32), t(d_idx, torch.long)


def nearest_neighbour(src: torch.Tensor, dst: torch.Tensor, max_elements: int = MAX_CDIST_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of src (N,3) the distance to and index of its nearest row of dst (M,3)."""
    dist, idx, _, _ = nearest_neighbours(src, dst, max_elements)
    return dist, idx


def distance_weight(points: torch.Tensor, extent: Sequence[float] = GRID_EXTENT, max_weight: float = 1.5) -> torch.Tensor:
    """Weight 1 at the grid centre growing linearly to ``max_weight`` at a corner; points (...,3) metres."""
    ext = points.new_tensor(list(extent))
    rel = (points.detach() - ext / 2).norm(dim=-1) / (ext / 2).norm()
    return 1.0 + (max_weight - 1.0) * rel.clamp(max=1.0)


def smooth_l1_chamfer(
    pred: torch.Tensor,
    gt: torch.Tensor,
    pred_weight: torch.Tensor,
    gt_weight: torch.Tensor,
    p2g: torch.Tensor,
    g2p: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Two-sided SmoothL1 Chamfer between pred (N,3) and gt (M,3), metres; returns a scalar.

    Pred side: each prediction to its nearest GT (index ``p2g``), weighted by ``pred_weight`` (N,). GT
    side: each GT voxel to its nearest prediction (``g2p``), weighted by ``gt_weight`` (M,). Each side
    is the weighted sum divided by its number of points.
    """
    loss_pred = F.smooth_l1_loss(pred, gt[p2g], beta=beta, reduction="none").sum(-1)
    loss_gt = F.smooth_l1_loss(pred[g2p], gt, beta=beta, reduction="none").sum(-1)
    return (loss_pred * pred_weight).sum() / pred.shape[0] + (loss_gt * gt_weight).sum() / gt.shape[0]


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Per-point sigmoid focal loss summed over classes; logits (N,C), labels (N,) in 1..C. Returns (N,)."""
    target = F.one_hot(labels - 1, logits.shape[-1]).to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum(-1)


class TaskLoss(torch.nn.Module):
    """Chamfer + focal loss over every decoder layer plus Chamfer on the initial points (eq. 2)."""

    def __init__(self, config: TaskLossConfig | None = None, num_classes: int = NUM_CLASSES,
                 grid_shape: Sequence[int] = GRID_SHAPE, voxel_size: float = VOXEL_SIZE) -> None:
        super().__init__()
        self.config = config or TaskLossConfig()
        self.num_classes = num_classes
        self.extent = [n * voxel_size for n in grid_shape]
        freq = self.config.class_frequencies
        if self.config.nn_backend not in ("auto", "cdist", "kdtree"):
            raise ValueError(f"loss.nn_backend must be auto, cdist or kdtree, got {self.config.nn_backend!r}")
        if freq is not None and len(freq) != num_classes:
            raise ValueError(f"class_frequencies needs {num_classes} counts (classes 1..{num_classes}), got {len(freq)}")
        weights = class_weights_from_frequencies(freq) if freq is not None else torch.ones(num_classes)
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("rare", rare_class_mask(freq, self.config.rare_class_share, num_classes), persistent=False)

    def to_metres(self, points: torch.Tensor) -> torch.Tensor:
        return points * points.new_tensor(self.extent)

    def _gt_weight(self, gt: GroundTruth, nn_dist: torch.Tensor) -> torch.Tensor:
        """GT-side weights (M,): distance weight, x far_weight when the nearest prediction is far, rare floor."""
        cfg = self.config
        w = distance_weight(gt.points, self.extent, cfg.max_distance_weight)
        w = w * torch.where(nn_dist > cfg.far_threshold, cfg.far_weight, 1.0)
        return torch.where(self.rare[gt.labels - 1], w.clamp(min=cfg.rare_min_weight), w)

    def layer_loss(self, points: torch.Tensor, logits: torch.Tensor | None, gt: GroundTruth) -> tuple[torch.Tensor, torch.Tensor]:
        """(chamfer, focal) of one sample: points (P,3) normalised, logits (P,C) or None."""
        cfg = self.config
        zero = points.sum() * 0.0  # keeps the graph (and DDP) happy on empty scenes
        if gt.points.shape[0] == 0:
            return zero, zero if logits is None else logits.sum() * 0.0
        pred = self.to_metres(points.float())
        pred_w = distance_weight(pred, self.extent, cfg.max_distance_weight)
        use_tree = cfg.nn_backend == "kdtree" or (cfg.nn_backend == "auto" and pred.device.type == "cpu")
        search = nearest_neighbours_kdtree if use_tree else nearest_neighbours
        _, p2g, g_dist, g2p = search(pred, gt.points)
        chamfer = smooth_l1_chamfer(pred, gt.points, pred_w, self._gt_weight(gt, g_dist), p2g, g2p, cfg.chamfer_beta)
        if logits is None:
            return chamfer * cfg.chamfer_weight, zero
        labels = gt.labels[p2g]
        focal = sigmoid_focal_loss(logits.float(), labels, cfg.focal_gamma, cfg.focal_alpha)
        w = pred_w * self.class_weights[labels - 1]
        return chamfer * cfg.chamfer_weight, (focal * w).sum() / points.shape[0] * cfg.focal_weight

    def forward(self, outputs: dict, gts: list[GroundTruth]) -> dict[str, torch.Tensor]:
        """Loss terms ``chamfer_init``, ``chamfer_<l>``, ``focal_<l>`` (batch means) and ``task`` (their sum).

        outputs: the network dict (``init_points`` (B,N,3), ``layers`` with ``points`` (B,N,R,3) and
        ``logits`` (B,N,R,C)); gts: one GroundTruth per sample (centres in metres).
        """
        layers = outputs["layers"]
        batch = outputs["init_points"].shape[0]
        if len(gts) != batch:
            raise ValueError(f"got {len(gts)} ground-truth scenes for a batch of {batch}")
        gts = [GroundTruth(g.points.to(outputs["init_points"].device).float(),
                           g.labels.to(outputs["init_points"].device).long()) for g in gts]
        terms: dict[str, torch.Tensor] = {}
        init = [self.layer_loss(outputs["init_points"][b], None, gts[b])[0] for b in range(batch)]
        terms["chamfer_init"] = torch.stack(init).mean() * self.config.init_points_weight
        for index, layer in enumerate(layers):
            pts = layer["points"].flatten(1, 2)   # (B, N*R, 3)
            log = layer["logits"].flatten(1, 2)   # (B, N*R, C)
            per = [self.layer_loss(pts[b], log[b], gts[b]) for b in range(batch)]
            terms[f"chamfer_{index}"] = torch.stack([c for c, _ in per]).mean()
            terms[f"focal_{index}"] = torch.stack([f for _, f in per]).mean()
        terms["task"] = torch.stack(list(terms.values())).sum()
        return terms


def class_frequencies_from_targets(targets, num_classes: int = NUM_CLASSES) -> list[float]:
    """Voxel counts of classes 1..C over an iterable of label grids (numpy or torch)."""
    counts = np.zeros(num_classes + 1, dtype=np.float64)
    for grid in targets:
        arr = np.asarray(grid.cpu() if isinstance(grid, torch.Tensor) else grid).reshape(-1).astype(np.int64)
        arr = arr[(arr > 0) & (arr <= num_classes)]
        counts += np.bincount(arr, minlength=num_classes + 1)[: num_classes + 1]
    return counts[1:].tolist()
