"""Adaptive sampling of image features around each query's point set (OPUS design, plain PyTorch).

Sampling points = centre + offsets * scale, with centre the mean and scale the per-axis standard
deviation of the query's previous points (0 for a single point). They are projected with
``grid2img`` and read bilinearly from every FPN level with 4-D ``grid_sample`` (TensorRT supports
only 4-D GridSample), then summed over levels with per-point softmax weights. Points behind the
camera or outside the image contribute zeros.

Two implementations of the bilinear read, the same function: ``grid_sample`` (default: fastest in
PyTorch, native in TensorRT) and ``gather`` (four row gathers from channels-last maps and their
bilinear weights), which ONNX Runtime's CPU provider runs about twice as fast as its GridSample
kernel. ``set_sampling_impl(model, "gather")`` switches a model, e.g. for an ONNX export meant for
ONNX Runtime on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import project_points

MIN_DEPTH = 1e-3  # metres; points closer than this (or behind the camera) are invalid
GRID_CLAMP = 2.0  # normalised image coordinates are clamped here: still outside, but finite in FP16


def pixels_to_grid(uv: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates -> grid_sample coordinates in [-1, 1] (align_corners=True), clamped."""
    h, w = image_hw
    # Python-float scales, not a tensor built here: forward makes no host-to-device copy (CUDA graphs)
    u = uv[..., 0:1] * (2.0 / max(w - 1, 1))
    v = uv[..., 1:2] * (2.0 / max(h - 1, 1))
    return (torch.cat([u, v], dim=-1) - 1.0).clamp(-GRID_CLAMP, GRID_CLAMP)


SAMPLING_IMPLS = ("grid_sample", "gather")


def gather_bilinear(feat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(feat, grid, "bilinear", "zeros", align_corners=True)`` as gathers, but returning
    (B, N, P, C) (channels last). feat: (B, C, H, W); grid: (B, N, P, 2) in [-1, 1] (x, y)."""
    b, c, h, w = feat.shape
    n, p = grid.shape[1], grid.shape[2]
    x = (grid[..., 0] + 1.0) * (0.5 * (w - 1))
    y = (grid[..., 1] + 1.0) * (0.5 * (h - 1))
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    rows = feat.permute(0, 2, 3, 1).reshape(b * h * w, c)
    base = (torch.arange(b, device=feat.device) * (h * w)).view(b, 1, 1)
    out = None
    for dy, wy in ((0.0, 1.0 - fy), (1.0, fy)):
        for dx, wx in ((0.0, 1.0 - fx), (1.0, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long() + base
            weight = (wx * wy * inside.to(wx.dtype)).unsqueeze(-1)
            term = rows.index_select(0, index.reshape(-1)).view(b, n, p, c) * weight.to(rows.dtype)
            out = term if out is None else out + term
    return out


def sample_levels(
    features: list[torch.Tensor], grid: torch.Tensor, level_weights: torch.Tensor, num_groups: int,
    impl: str = "grid_sample",
) -> torch.Tensor:
    """Bilinear multi-level sampling, channels split into groups.

    features: L maps (B, C, H_l, W_l); grid: (B, N, G, P, 2) in [-1, 1];
    level_weights: (B, N, G, P, L) summing to 1 over L. Returns (B, N, G, P, C/G).
    """
    b, n, g, p, _ = grid.shape
    grid_g = grid.permute(0, 2, 1, 3, 4).reshape(b * g, n, p, 2)
    out = None
    for lvl, feat in enumerate(features):
        c, h, w = feat.shape[1:]
        if impl == "gather":
            sampled = gather_bilinear(feat.reshape(b * g, c // g, h, w), grid_g)  # (B*G, N, P, C/G)
            sampled = sampled.reshape(b, g, n, p, c // g).permute(0, 2, 1, 3, 4)  # (B, N, G, P, C/G)
        else:
            sampled = F.grid_sample(feat.reshape(b * g, c // g, h, w), grid_g, mode="bilinear",
                                    padding_mode="zeros", align_corners=True)  # (B*G, C/G, N, P)
            sampled = sampled.reshape(b, g, c // g, n, p).permute(0, 3, 1, 4, 2)  # (B, N, G, P, C/G)
        term = sampled * level_weights[..., lvl : lvl + 1]
        out = term if out is None else out + term
    return out


class AdaptiveSampling(nn.Module):
    """Query-conditioned sampling offsets and level weights; returns sampled features (B,N,G,P,C/G)."""

    def __init__(self, embed_dims: int, num_groups: int, num_points: int, num_levels: int) -> None:
        super().__init__()
        self.num_groups, self.num_points, self.num_levels = num_groups, num_points, num_levels
        self.impl = "grid_sample"  # or "gather": see set_sampling_impl
        self.offsets = nn.Linear(embed_dims, num_groups * num_points * 3)
        self.level_weights = nn.Linear(embed_dims, num_groups * num_points * num_levels)
        nn.init.zeros_(self.offsets.weight)
        # fixed initial spread of the sampling points, in units of the point-set std
        with torch.no_grad():
            self.offsets.bias.uniform_(-1.0, 1.0)
        # level_weights keeps nn.Linear's default init, as the reference's scale_weights does: each group
        # and point starts with its own random softmax over the levels

    def sampling_points(self, query: torch.Tensor, prev_points: torch.Tensor) -> torch.Tensor:
        """(B,N,D), (B,N,R,3) -> sampling points (B,N,G,P,3) in normalised grid coordinates."""
        b, n = query.shape[:2]
        prev_points = prev_points.float()  # sampling locations stay float32 under FP16 autocast
        center = prev_points.mean(dim=2)  # (B, N, 3)
        scale = self.point_scale(prev_points, center)  # (B, N, 3)
        offsets = self.offsets(query).float().reshape(b, n, self.num_groups, self.num_points, 3)
        return center[:, :, None, None] + offsets * scale[:, :, None, None]

    def point_scale(self, prev_points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Per-axis spread (B,N,3) of the previous points (B,N,R,3) about their centre: the biased std, 0 for R = 1."""
        return (prev_points - center.unsqueeze(2)).square().mean(dim=2).sqrt()

    def forward(
        self,
        query: torch.Tensor,
        prev_points: torch.Tensor,
        features: list[torch.Tensor],
        grid2img: torch.Tensor,
        image_hw: tuple[int, int],
    ) -> torch.Tensor:
        b, n = query.shape[:2]
        points = self.sampling_points(query, prev_points)
        uv, depth = project_points(grid2img, points)  # (B,N,G,P,2), (B,N,G,P,1)
        grid = pixels_to_grid(uv, image_hw)
        weights = self.level_weights(query).reshape(b, n, self.num_groups, self.num_points, self.num_levels)
        weights = weights.softmax(dim=-1)
        sampled = sample_levels(features, grid, weights, self.num_groups, self.impl)
        return sampled * (depth > MIN_DEPTH).to(sampled.dtype)


def set_sampling_impl(model: nn.Module, impl: str) -> int:
    """Switch every ``AdaptiveSampling`` in ``model`` to ``impl``; returns how many were switched."""
    if impl not in SAMPLING_IMPLS:
        raise ValueError(f"unknown sampling implementation '{impl}'; choose one of {SAMPLING_IMPLS}")
    count = 0
    for module in model.modules():
        if isinstance(module, AdaptiveSampling):
            module.impl = impl
            count += 1
    return count
