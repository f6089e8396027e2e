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


def occupied_voxels(
    points: torch.Tensor, scores: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,Q,R,3) normalised points, (B,Q,R,C) sigmoid scores -> occupied voxels, sorted.

    Returns ``ids`` (M,) long, the flat index ``b * X*Y*Z + (i * Y + j) * Z + k``, and ``mean``
    (M, C), the mean score vector of the kept points in each voxel (closing applied if configured).
    """
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
    nx, ny, nz = config.grid_shape
    batch = torch.arange(b, device=points.device).view(b, 1, 1)
    linear = batch * (nx * ny * nz) + (idx[..., 0] * ny + idx[..., 1]) * nz + idx[..., 2]
    ids, inverse = torch.unique(linear[keep], sorted=True, return_inverse=True)
    sums = scores.new_zeros(len(ids), c).index_add_(0, inverse, scores[keep])
    mean = sums / torch.bincount(inverse, minlength=len(ids)).clamp_min(1).unsqueeze(-1).to(sums.dtype)
    if config.closing:
        ids, mean = close_holes(ids, mean, b, config.grid_shape)
    return ids, mean


def close_holes(
    ids: torch.Tensor, mean: torch.Tensor, batch: int, grid_shape: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3x3 closing (dilation then erosion) of the occupied voxels.

    Filled voxels take the per-class maximum score vector of their occupied neighbours; original
    voxels are never removed (the erosion does not erode at the grid border).
    """
    nx, ny, nz = grid_shape
    c = mean.shape[-1]
    occ = torch.zeros(batch * nx * ny * nz, dtype=mean.dtype, device=mean.device)
    occ[ids] = 1.0
    occ = occ.view(batch, 1, nx, ny, nz)
    dilated = F.max_pool3d(occ, 3, stride=1, padding=1)
    closed = -F.max_pool3d(-dilated, 3, stride=1, padding=1)  # max_pool pads with -inf: border kept
    filled = ((closed > 0.5) & (occ < 0.5)).view(-1).nonzero()[:, 0]
    if len(filled) == 0:
        return ids, mean
    dense = torch.zeros(batch * nx * ny * nz, c, dtype=mean.dtype, device=mean.device)
    dense[ids] = mean
    dense = dense.view(batch, nx, ny, nz, c).permute(0, 4, 1, 2, 3)
    neighbour = F.max_pool3d(dense, 3, stride=1, padding=1).permute(0, 2, 3, 4, 1).reshape(-1, c)
    all_ids, order = torch.sort(torch.cat([ids, filled]))
    return all_ids, torch.cat([mean, neighbour[filled]])[order]


def labels_batch(points: torch.Tensor, scores: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Torch batch variant for evaluation: (B,Q,R,3), (B,Q,R,C) sigmoid scores -> (B,X,Y,Z) long labels."""
    pts, scr = _as_batch(points, "points", 3), _as_batch(scores, "scores", None)
    ids, mean = occupied_voxels(pts, scr, config)
    labels = torch.zeros(pts.shape[0] * int(np.prod(config.grid_shape)), dtype=torch.long, device=pts.device)
    labels[ids] = mean.argmax(dim=-1) + 1
    return labels.view(pts.shape[0], *config.grid_shape)


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
    ids, mean = occupied_voxels(pts, scr, config)
    best, label = mean.max(dim=-1)
    nx, ny, nz = config.grid_shape
    indices = torch.stack([ids // (ny * nz), (ids // nz) % ny, ids % nz], dim=-1)  # (M, 3), C-order sorted
    voxel_labels = (label + 1).to(torch.uint8)
    labels = torch.zeros(nx * ny * nz, dtype=torch.uint8, device=ids.device)
    labels[ids] = voxel_labels
    return OccupancyFrame(
        labels=labels.view(nx, ny, nz).cpu().numpy(),
        voxel_indices=indices.to(torch.int32).cpu().numpy(),
        voxel_labels=voxel_labels.cpu().numpy(),
        voxel_scores=best.cpu().numpy().astype(np.float32),
        voxel_origin=origin,
        voxel_size=float(config.voxel_size),
    )
