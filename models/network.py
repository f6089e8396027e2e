"""DiSceneNet: ResNet + FPN image encoder and the sparse query decoder (docs/architecture.md)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import ResNet
from .config import ModelConfig
from .decoder import SparseDecoder
from .fpn import FPN


class DiSceneNet(nn.Module):
    """Image + grid2img (+ depth) -> per-layer point sets with class logits.

    Submodules: ``backbone`` (torchvision names), ``neck`` (FPN), ``query_init`` (Embedding(Q, 3) of
    learned initial positions in [0, 1]^3), ``decoder`` (layers, heads, depth branch).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.backbone = ResNet(config.backbone)
        self.neck = FPN(self.backbone.out_channels, config.fpn_channels, config.num_levels)
        self.query_init = nn.Embedding(config.decoder.num_queries, 3)
        nn.init.uniform_(self.query_init.weight, 0.0, 1.0)
        self.decoder = SparseDecoder(config, config.num_levels)

    def init_positions(self) -> torch.Tensor:
        """Learned initial query positions (num_queries, 3) in normalised grid coordinates."""
        return self.query_init.weight

    def extract_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) normalised RGB -> FPN maps, finest first."""
        if not torch.jit.is_tracing() and (image.dim() != 4 or image.shape[1] != 3):
            raise ValueError(f"image must be (B,3,H,W), got {tuple(image.shape)}")
        return self.neck(self.backbone(image))

    def decode(
        self,
        features: list[torch.Tensor],
        grid2img: torch.Tensor,
        depth: torch.Tensor | None = None,
        init_points: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Run the decoder on FPN maps; returns {"init_points", "layers"}."""
        b = features[0].shape[0]
        h, w = features[0].shape[-2:]
        image_hw = (int(h) * self.neck.strides[0], int(w) * self.neck.strides[0])
        if init_points is None:
            init_points = self.query_init.weight.unsqueeze(0).expand(b, -1, -1)
        if not self.config.use_depth:
            depth = None  # depth is only read by the depth branch
        if not torch.jit.is_tracing():  # shapes are fixed while tracing for export
            self._check_inputs(b, image_hw, grid2img, depth, init_points)
        layers = self.decoder(features, grid2img, init_points, image_hw, depth)
        return {"init_points": init_points, "layers": layers}

    def _check_inputs(self, b: int, image_hw: tuple[int, int], grid2img: torch.Tensor,
                      depth: torch.Tensor | None, init_points: torch.Tensor) -> None:
        if tuple(grid2img.shape) != (b, 4, 4):
            raise ValueError(f"grid2img must be ({b},4,4), got {tuple(grid2img.shape)}")
        if self.config.use_depth:
            if depth is None:
                raise ValueError(f"config '{self.config.name}' uses the depth branch: depth (B,1,H,W) is required")
            if tuple(depth.shape) != (b, 1, *image_hw):
                raise ValueError(f"depth must be ({b},1,{image_hw[0]},{image_hw[1]}), got {tuple(depth.shape)}")
        if init_points.dim() != 3 or init_points.shape[0] != b or init_points.shape[-1] != 3:
            raise ValueError(f"init_points must be ({b},N,3), got {tuple(init_points.shape)}")

    def forward(
        self,
        image: torch.Tensor,
        grid2img: torch.Tensor,
        depth: torch.Tensor | None = None,
        init_points: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        features = self.extract_features(image)
        out = self.decode(features, grid2img, depth, init_points)
        return {"features": features, **out}
