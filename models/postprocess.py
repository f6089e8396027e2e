"""Post-processing: last-layer point sets -> voxel label grid (DESIGN.md section 2, vectorised).

Points farther than ``max_center_dist`` metres from their query centre (mean of the query's
points) and points whose best class score is <= ``score_threshold`` are dropped; the rest are
voxelised at ``voxel_size``; a voxel's score vector is the mean of its points' score vectors and
its label is argmax + 1 (0 = empty). Optional closing (3x3x3 dilation then erosion) fills holes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class OccupancyFrame:
    """Dense labels (X,Y,Z) uint8 plus the sparse occupied voxels with their scores and grid pose."""

    labels: np.ndarray          # (X, Y, Z) uint8, 0 empty, 1..C classes
    voxel_indices: np.ndarray   # (M, 3) int32
    voxel_labels: np.ndarray    # (M,) uint8
    voxel_scores: np.ndarray    # (M,) float32, mean score of the voxel's label class
    voxel_origin: np.ndarray    # (3,) float64 world xyz of the grid corner
    voxel_size: float

    def centers_world(self) -> np.ndarray:
        """World xyz (M, 3) of the occupied voxel centres."""
        return self.voxel_origin + (self.voxel_indices.astype(np.float64) + 0.5) * self.voxel_size


def _as_batch(x: np.ndarray | torch.Tensor, name: str, last: int | None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or (last is not None and t.shape[-1] != last):
        want = f"(B,Q,R,{last})" if last is not None else "(B,Q,R,C)"
        raise ValueError(f"{name} must be {want} or without B, got {tuple(t.shape)}")
    return t.detach().float()


def voxel_scores_batch(
    points: torch.Tensor, scores: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,Q,R,3) normalised points, (B,Q,R,C) sigmoid scores -> mean scores (B,X,Y,Z,C), occupied (B,X,Y,Z)."""
    if points.shape[:3] != scores.shape[:3]:
        raise ValueError(f"points {tuple(points.shape)} and scores {tuple(scores.shape)} disagree on (B,Q,R)")
    b, c = points.shape[0], scores.shape[-1]
    shape = torch.tensor(config.grid_shape, device=points.device)
    extent = shape.float() * config.voxel_size
    centre = points.mean(dim=2, keepdim=True)
    dist = ((points - centre) * extent).norm(dim=-1)  # (B, Q, R) metres
    keep = (dist <= config.max_center_dist) & (scores.max(dim=-1).values > config.score_threshold)
    idx = torch.floor(points * shape).long()  # (B, Q, R, 3)
    keep &= ((idx >= 0) & (idx < shape)).all(dim=-1)
    idx = torch.minimum(idx.clamp_min(0), shape - 1)
    nx, ny, nz = config.grid_shape
    num_voxels = nx * ny * nz
    batch = torch.arange(b, device=points.device).view(b, 1, 1)
    linear = batch * num_voxels + (idx[..., 0] * ny + idx[..., 1]) * nz + idx[..., 2]
    dump = b * num_voxels  # dropped points land in one extra row that is discarded
    linear = torch.where(keep, linear, torch.full_like(linear, dump)).reshape(-1)
    sums = scores.new_zeros(dump + 1, c).index_add_(0, linear, scores.reshape(-1, c))
    counts = scores.new_zeros(dump + 1).index_add_(0, linear, torch.ones_like(linear, dtype=scores.dtype))
    mean = (sums[:dump] / counts[:dump].clamp_min(1.0).unsqueeze(-1)).reshape(b, nx, ny, nz, c)
    occupied = (counts[:dump] > 0).reshape(b, nx, ny, nz)
    if config.closing:
        mean, occupied = close_holes(mean, occupied)
    return mean, occupied


def close_holes(mean: torch.Tensor, occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3x3 closing of the occupancy; filled voxels take the per-class max score of their neighbours."""
    occ = occupied.float().unsqueeze(1)  # (B, 1, X, Y, Z)
    dilated = F.max_pool3d(occ, 3, stride=1, padding=1)
    closed = -F.max_pool3d(-dilated, 3, stride=1, padding=1)  # erosion; the border is not eroded
    filled = (closed[:, 0] > 0.5) & ~occupied
    neighbour = F.max_pool3d(mean.permute(0, 4, 1, 2, 3), 3, stride=1, padding=1).permute(0, 2, 3, 4, 1)
    mean = torch.where(filled.unsqueeze(-1), neighbour, mean)
    return mean, occupied | filled


def labels_batch(points: torch.Tensor, scores: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Torch batch variant for evaluation: (B,Q,R,3), (B,Q,R,C) sigmoid scores -> (B,X,Y,Z) long labels."""
    mean, occupied = voxel_scores_batch(_as_batch(points, "points", 3), _as_batch(scores, "scores", None), config)
    return torch.where(occupied, mean.argmax(dim=-1) + 1, torch.zeros_like(occupied, dtype=torch.long))


def points_to_occupancy(
    points: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    voxel_origin: np.ndarray,
    config: ModelConfig,
) -> OccupancyFrame:
    """One frame: points (1,Q,R,3)/(Q,R,3) normalised, scores after sigmoid -> OccupancyFrame."""
    pts = _as_batch(points, "points", 3)
    scr = _as_batch(scores, "scores", config.num_classes)
    if pts.shape[0] != 1:
        raise ValueError(f"points_to_occupancy takes one frame, got batch {pts.shape[0]}; use labels_batch")
    origin = np.asarray(voxel_origin, dtype=np.float64).reshape(-1)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise ValueError(f"voxel_origin must be 3 finite numbers, got {voxel_origin}")
    mean, occupied = voxel_scores_batch(pts, scr, config)
    best, label = mean[0].max(dim=-1)
    occ = occupied[0]
    labels = torch.where(occ, label + 1, torch.zeros_like(label)).to(torch.uint8)
    indices = occ.nonzero()  # (M, 3), C-order = sorted by (i, j, k)
    return OccupancyFrame(
        labels=labels.cpu().numpy(),
        voxel_indices=indices.to(torch.int32).cpu().numpy(),
        voxel_labels=labels[occ].cpu().numpy(),
        voxel_scores=best[occ].cpu().numpy().astype(np.float32),
        voxel_origin=origin,
        voxel_size=float(config.voxel_size),
    )
