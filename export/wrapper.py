"""Export view of ``DiSceneNet``: positional tensor inputs in, last-layer points and sigmoid scores out.

Both the ONNX exporter and the torch backend run the network through this module, so ONNX, TensorRT
and eager PyTorch compute exactly the same function.
"""
from __future__ import annotations

import torch
from torch import nn


class ExportWrapper(nn.Module):
    """``(image, grid2img[, depth]) -> (points (B,Q,R,3), scores (B,Q,R,C))`` of the last decoder layer."""

    def __init__(self, model: nn.Module, use_depth: bool):
        super().__init__()
        self.model = model
        self.use_depth = use_depth

    def forward(self, image: torch.Tensor, grid2img: torch.Tensor,
                depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_depth and depth is None:
            raise ValueError("this model was built with use_depth=True and needs a depth input")
        out = self.model(image, grid2img, depth=depth if self.use_depth else None)
        last = out["layers"][-1]
        return last["points"], torch.sigmoid(last["logits"])
