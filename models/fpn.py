"""Feature pyramid network over the ResNet C2..C5 maps (lateral 1x1, top-down sum, 3x3 output)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_STRIDES = (4, 8, 16, 32)  # C2..C5


class FPN(nn.Module):
    """Top-down FPN; with ``num_levels < 4`` it uses the coarsest levels (C5 is always included)."""

    def __init__(self, in_channels: list[int], out_channels: int, num_levels: int = 4) -> None:
        super().__init__()
        if not 1 <= num_levels <= len(in_channels):
            raise ValueError(f"num_levels must be 1..{len(in_channels)}, got {num_levels}")
        self.start = len(in_channels) - num_levels
        self.strides = list(BACKBONE_STRIDES[self.start:])
        used = in_channels[self.start:]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in used)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in used)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[self.start:], strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]
