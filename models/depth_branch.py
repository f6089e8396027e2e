"""Depth branch (paper eq. 1): f <- f + MLP(projected depth of the query centre, prior depth there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import project_points
from .sampling import MIN_DEPTH, pixels_to_grid


class DepthBranch(nn.Module):
    """Encodes (d_q, d_p) of each query centre into a feature added to the query."""

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, embed_dims), nn.ReLU(inplace=True), nn.Linear(embed_dims, embed_dims))

    def forward(self, centers: torch.Tensor, grid2img: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """centres (B,N,3) normalised, depth (B,1,H,W) metres (0 invalid) at network input size -> (B,N,D)."""
        uv, d_q = project_points(grid2img, centers)  # (B,N,2), (B,N,1)
        grid = pixels_to_grid(uv, tuple(depth.shape[-2:])).unsqueeze(2)  # (B, N, 1, 2)
        d_p = F.grid_sample(depth, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # (B,1,N,1)
        d_p = d_p[:, 0]  # (B, N, 1)
        valid = (d_q > MIN_DEPTH).to(d_q.dtype)
        return self.mlp(torch.cat([d_q * valid, d_p * valid], dim=-1))
